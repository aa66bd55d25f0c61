"""Whole-call speed of the sm80 path (forced) against torch SDPA's cuDNN and flash backends, in
one run on one GPU: ``bench_paths.py`` restricted to those three methods (same options).

    python bench/bench_sm80.py --out bench.md [--seqlens 1024 4096] [--heads 32] [--batch 4]
"""

from __future__ import annotations

import sys

from bench_paths import main

if __name__ == "__main__":
    sys.exit(main(["--methods", "sm80", "cudnn", "flash", *sys.argv[1:]]))
