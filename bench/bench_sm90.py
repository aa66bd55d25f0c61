"""The Hopper benchmark of issue 3: ``bench_paths.py`` (one timing code path), every method and
the full matrix by default (B=4, H=32, head dims 64 and 128, S = 1k..16k, causal and not), or
``--quick`` for iteration runs (hd128, S 4k and 16k, sm90 + kernel alone + cuDNN + flash).

    python bench/bench_sm90.py --out bench_sm90.md --plot bench_sm90.png
    python bench/bench_sm90.py --quick
"""

from __future__ import annotations

import sys

from bench_paths import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
