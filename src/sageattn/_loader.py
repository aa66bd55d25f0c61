"""Kernel trees on demand: the manifest, fatbins loaded per (tree, device), kernel handles.

Nothing here runs at import. ``sageattn._ext`` (the nanobind host layer) is imported on the
first load, so the package imports, reports and emulates without it. Every fatbin is
checked against ``_abi.ABI_VERSION`` (its exported ``sageattn_abi_version``) before any of
its kernels is used.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import NamedTuple

from . import _abi

__all__ = ["PackageError", "KERNELS_DIR", "manifest", "trees", "build_info", "ext", "module",
           "kernel", "preload", "clear_caches", "Kernel"]

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
ABI_SYMBOL = "sageattn_abi_version"
# Above this, a kernel must opt in to more dynamic shared memory (cuFuncSetAttribute).
_DEFAULT_SMEM_LIMIT = 48 * 1024

_lock = threading.Lock()


class PackageError(RuntimeError):
    """The installed package is incomplete or inconsistent (no manifest, no host module,
    a fatbin built against another ABI)."""


class Kernel(NamedTuple):
    name: str
    function: int        # CUfunction handle from sageattn._ext
    threads: int
    smem: int            # dynamic shared memory bytes
    q_rows: int          # attention kernels: query rows per CTA (0: not an attention kernel)


@functools.cache
def manifest() -> dict:
    """The installed ``kernels/manifest.json`` (written by tools/build_kernels.py)."""
    path = KERNELS_DIR / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{path} is missing: this installation carries no kernels (a "
                           "source tree, or a build that skipped the kernels)") from None
    if data.get("abi_version") != _abi.ABI_VERSION:
        raise PackageError(f"{path} was built for kernel ABI {data.get('abi_version')}, but "
                           f"this package's Python side speaks ABI {_abi.ABI_VERSION}; "
                           "reinstall sageattn")
    return data


def trees() -> dict:
    """The manifest's trees, ``{name: {"fatbin", "sass", "ptx", "kernels"}}``."""
    return manifest().get("trees", {})


def build_info() -> dict:
    """What this installation carries: toolkit, git revision, ABI version, and per tree its
    SASS/PTX architectures and kernel count. Never raises; "error" says what is missing."""
    info = {"abi_version": _abi.ABI_VERSION, "toolkit": None, "git_revision": None,
            "trees": {}, "error": None}
    try:
        data = manifest()
    except PackageError as exc:
        info["error"] = str(exc)
        return info
    info["toolkit"] = data.get("toolkit")
    info["git_revision"] = data.get("git_revision")
    for name, tree in data.get("trees", {}).items():
        info["trees"][name] = {"sass": list(tree.get("sass", ())),
                               "ptx": list(tree.get("ptx", ())),
                               "kernels": len(tree.get("kernels", {}))}
    return info


@functools.cache
def ext():
    """The host layer module, imported on first use."""
    try:
        from . import _ext
    except ImportError as exc:
        raise PackageError(f"sageattn._ext (the compiled host layer) cannot be imported: "
                           f"{exc}. Install a built wheel of sageattn.") from exc
    if not hasattr(_ext, "launch"):
        # In a source tree, src/sageattn/_ext/ holds the module's C++ and imports as an empty
        # namespace package.
        raise PackageError(f"sageattn._ext resolves to {list(getattr(_ext, '__path__', []))}, "
                           "not the compiled host layer: running from a source tree? Install "
                           "the package (pip install .) and run from elsewhere.")
    return _ext


_modules: dict = {}
_kernels: dict = {}


def module(tree: str, device: int) -> int:
    """Load ``tree``'s fatbin on CUDA device ``device`` once and return the module handle."""
    key = (tree, device)
    handle = _modules.get(key)
    if handle is not None:
        return handle
    with _lock:
        handle = _modules.get(key)
        if handle is None:
            handle = _load_module(tree, device)
            _modules[key] = handle
    return handle


def _load_module(tree: str, device: int) -> int:
    spec = trees().get(tree)
    if spec is None:
        raise PackageError(f"kernel tree {tree!r} is not in this package (it carries "
                           f"{sorted(trees())})")
    image_path = KERNELS_DIR / spec["fatbin"]
    try:
        image = image_path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{image_path} is listed in the manifest but missing") from None
    lib = ext()
    handle = lib.load_module(device, image)
    found = lib.read_global_u32(handle, ABI_SYMBOL)
    if found != _abi.ABI_VERSION:
        raise PackageError(f"{image_path.name} exports {ABI_SYMBOL} = {found}, but this "
                           f"package packs kernel ABI {_abi.ABI_VERSION}; the wheel is "
                           "inconsistent: reinstall sageattn")
    return handle


def kernel(tree: str, name: str, device: int) -> Kernel:
    """Kernel ``name`` of ``tree`` on CUDA device ``device``, loaded and configured once."""
    key = (tree, name, device)
    k = _kernels.get(key)
    if k is not None:
        return k
    handle = module(tree, device)
    with _lock:
        k = _kernels.get(key)
        if k is None:
            meta = trees()[tree].get("kernels", {}).get(name)
            if meta is None:
                raise PackageError(f"kernel {name!r} is not in the {tree} tree's manifest")
            lib = ext()
            function = lib.get_function(handle, name)
            smem = int(meta.get("smem", 0))
            if smem > _DEFAULT_SMEM_LIMIT:
                lib.set_max_dynamic_smem(function, smem)
            k = Kernel(name, function, int(meta["threads"]), smem, int(meta.get("q_rows") or 0))
            _kernels[key] = k
    return k


def preload(tree: str, device: int) -> None:
    """Load every kernel of ``tree`` on ``device`` now (before CUDA graph capture, say)."""
    for name in trees()[tree].get("kernels", {}):
        kernel(tree, name, device)


def clear_caches() -> None:
    """Forget the manifest (tests). Loaded modules stay loaded for the process' life."""
    manifest.cache_clear()
