#!/usr/bin/env python3
"""A wheel directory for offline, hash-pinned installs, and its lock file.

    python tools/lock_wheelhouse.py --dest wheelhouse dist/sageattn_cu128-...-cp311-*.whl torch==2.13.0

downloads (`pip download`, binary wheels only, for the interpreter running this script) the given
requirements with every dependency into a fresh folder, moves them to DEST and writes
DEST/requirements.lock: one `name==version --hash=sha256:...` line per file fetched, exactly that
set. Installing from it needs no index and no network:

    pip install --no-index --find-links wheelhouse --require-hashes -r wheelhouse/requirements.lock

pip then refuses any file whose hash differs, and any dependency the lock does not pin.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def dist_of(path: Path) -> tuple[str, str]:
    """(normalized name, version) of a wheel or sdist file name."""
    if path.suffix == ".whl":
        name, version = path.name.split("-")[:2]
    else:
        m = re.fullmatch(r"(.+)-([^-]+)\.(tar\.gz|zip)", path.name)
        if not m:
            raise SystemExit(f"error: cannot read a name and version from {path.name}")
        name, version = m.group(1), m.group(2)
    return re.sub(r"[-_.]+", "-", name).lower(), version


def lock_lines(files: list[Path]) -> list[str]:
    hashes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in sorted(files):
        hashes[dist_of(f)].append(hashlib.sha256(f.read_bytes()).hexdigest())
    names = defaultdict(list)
    for name, version in hashes:
        names[name].append(version)
    twice = {n: v for n, v in names.items() if len(v) > 1}
    if twice:
        raise SystemExit(f"error: several versions of one distribution: {twice}")
    return [f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in sorted(hs))
            for (name, version), hs in sorted(hashes.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, required=True)
    ap.add_argument("requirements", nargs="+", help="wheel files or requirement specifiers")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--only-binary", ":all:",
                        "--dest", tmp, *args.requirements], check=True)
        fetched = sorted(Path(tmp).iterdir())
        args.dest.mkdir(parents=True, exist_ok=True)
        for f in fetched:
            shutil.copy2(f, args.dest / f.name)
    files = [args.dest / f.name for f in fetched]
    lock = args.dest / "requirements.lock"
    lock.write_text("# pip install --no-index --find-links . --require-hashes -r requirements.lock\n"
                    + "\n".join(lock_lines(files)) + "\n")
    print(f"{lock}: {len(files)} files pinned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
