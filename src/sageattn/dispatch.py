"""Which kernel path runs on which GPU, and why: the table as data (DESIGN.md section 4).

Three layers, kept apart so the choice can be tested without a GPU and so nothing here runs
inside a region ``torch.compile`` traces (the op implementation calls ``resolve`` at run time):

* ``TABLE`` and ``PATHS``: data.
* ``choose(capability, trees, requested)``: a pure function of a capability, the trees the
  installed package carries (from the manifest) and the requested path.
* ``probe(index)``: the device query, cached per device; ``resolve`` caches the choice too.

A path can be forced with the ``path=`` argument of ``sageattn`` or the ``SAGEATTN_PATH``
environment variable (the argument wins). ``explain()`` reports the choice and the package.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from . import _loader

__all__ = [
    "PATHS", "TABLE", "ENV_VAR", "PathSpec", "Row", "DeviceInfo", "Choice",
    "UnsupportedDeviceError", "PathUnavailableError", "RUNNERS", "choose", "probe", "resolve",
    "explain", "clear_caches", "supported_capabilities",
]

ENV_VAR = "SAGEATTN_PATH"


class UnsupportedDeviceError(ValueError):
    """The device cannot run any path of this package (compute capability, or no GPU)."""


class PathUnavailableError(ValueError):
    """A forced path is not built in this package or cannot run on the device."""


@dataclass(frozen=True)
class PathSpec:
    """A kernel path: the manifest tree holding its kernels and its default configuration."""

    name: str
    tree: str
    summary: str
    defaults: dict = field(default_factory=dict)


PATHS = {
    "sm80": PathSpec(
        "sm80", "sm80", "INT8 QK^T + FP16 PV via mma.sync (SageAttention2)",
        {"qk_quant_gran": "per_thread", "pv_accum_dtype": "fp32", "smooth_k": True}),
    "sm89": PathSpec(
        "sm89", "sm89", "INT8 QK^T + FP8 e4m3 PV via mma.sync, fp32+fp16 accumulation "
        "(SageAttention2++)",
        {"qk_quant_gran": "per_thread", "pv_accum_dtype": "fp32+fp16", "smooth_k": True,
         "smooth_v": False}),
    "sm90": PathSpec(
        "sm90", "sm90", "INT8 QK^T + FP8 e4m3 PV via wgmma + TMA, warp-specialized, fp32+fp32 "
        "accumulation (Hopper)",
        {"qk_quant_gran": "per_thread", "pv_accum_dtype": "fp32+fp32", "smooth_k": True,
         "smooth_v": False}),
    "sm120_fp4": PathSpec(
        "sm120_fp4", "sm120", "NVFP4 block-scaled mma.sync (SageAttention3)",
        {"per_block_mean": True}),
}


@dataclass(frozen=True)
class Row:
    """One line of the table. ``minor=None`` matches every minor of ``major``."""

    major: int
    minor: Optional[int]
    prefer: tuple            # paths of the default choice, best first
    reason: str
    explicit: tuple = ()     # paths this device runs only when asked for by name
    # path -> configuration that replaces the path's defaults on this device
    config: dict = field(default_factory=dict, hash=False, compare=False)
    # path -> what running it on this device means, added to the reason when it is forced
    notes: dict = field(default_factory=dict, hash=False, compare=False)


TABLE = (
    Row(8, 0, ("sm80",), "A100/A30: the sm80 tree (INT8 QK per-thread, FP16 PV, fp32 "
        "accumulation) is the design's path for 8.0"),
    Row(8, 6, ("sm80",), "Ampere GA10x (RTX 30xx, A10, A40): the sm80 tree"),
    Row(8, 7, ("sm80",), "Jetson Orin: the sm80 tree"),
    Row(8, 9, ("sm89", "sm80"), "Ada (L4, L40, RTX 40xx): FP8 PV with fp16 in-block "
        "accumulation (2++) is the design's path for 8.9"),
    # The sm89 tree runs on 9.0 (SASS sm_90) but its E4M3 MMA is emulated there with fp16
    # MMAs: no faster than sm80 and less accurate (NOTES.md), so only when forced (tests).
    # The sm120 tree's sm_90 SASS is its verification build: exact software FP4 in place of the
    # block-scaled MMA (kernels/sm120/fp4_numeric.cuh), checked against the emulator on an H100.
    Row(9, 0, ("sm90", "sm80"), "Hopper: only wgmma runs FP8 natively, so the sm90 tree is "
        "the design's path for 9.0", explicit=("sm89", "sm120_fp4"),
        notes={"sm120_fp4": "on 9.0 the sm120 tree is its verification build: the FP4 "
               "conversions and block-scaled MMA are exact software equivalents (slow; for "
               "testing the kernels against the emulator, not for speed)"}),
    Row(10, None, ("sm89", "sm80"), "Blackwell datacenter (10.x): no tree of its own yet; the "
        "best tree that runs there"),
    # per_warp Q/K scales on 12.x, as SageAttention 2.2.0 chooses for sm120 (DESIGN.md §4).
    Row(12, 0, ("sm89", "sm80"), "Blackwell consumer (RTX 50xx, RTX PRO): the sm89 tree "
        "(2++, per-warp); SageAttention3 FP4 by explicit choice", explicit=("sm120_fp4",),
        config={"sm89": {"qk_quant_gran": "per_warp"}}),
    Row(12, 1, ("sm89", "sm80"), "DGX Spark (12.1): the sm89 tree (2++, per-warp); "
        "SageAttention3 FP4 by explicit choice", explicit=("sm120_fp4",),
        config={"sm89": {"qk_quant_gran": "per_warp"}}),
)


def supported_capabilities() -> str:
    """The table's capabilities as text, e.g. '8.0, 8.6, ..., 10.x, 12.0, 12.1'."""
    return ", ".join(f"{r.major}.{'x' if r.minor is None else r.minor}" for r in TABLE)


def table_row(capability) -> Optional[Row]:
    major, minor = capability
    for row in TABLE:
        if row.major == major and (row.minor is None or row.minor == minor):
            return row
    return None


_ARCH = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


def arch_runs_on(arch: str, capability) -> bool:
    """Whether code for ``arch`` ("sm_90a", "sm_80", "compute_80", ...) runs on a device.

    SASS runs on the same major with an equal or higher minor; "a" (arch-specific) SASS or
    PTX only on exactly its capability; "f" (family) SASS on its major from its minor up; plain
    PTX on every capability at or above it (the driver JIT-compiles it).
    """
    m = _ARCH.match(arch)
    if not m:
        return False
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if suffix == "a":
        return (major, minor) == tuple(capability)
    if kind == "sm":
        return major == capability[0] and minor <= capability[1]
    return (major, minor) <= tuple(capability)


def tree_runs_on(tree: dict, capability) -> Optional[str]:
    """How a manifest tree runs on ``capability`` ("SASS sm_80", "PTX compute_80 (JIT ...)")
    or None when it cannot."""
    # Like the driver: the newest SASS that runs, else the newest PTX (JIT-compiled).
    sass = [a for a in tree.get("sass", ()) if arch_runs_on(a, capability)]
    if sass:
        return f"SASS {max(sass, key=_arch_key)}"
    ptx = [a for a in tree.get("ptx", ()) if arch_runs_on(a, capability)]
    if ptx:
        return f"PTX {max(ptx, key=_arch_key)} (JIT-compiled by the driver on first load)"
    return None


def _arch_key(arch: str) -> tuple:
    m = _ARCH.match(arch)
    return (int(m.group(2)), int(m.group(3)), m.group(4) == "a")


@dataclass(frozen=True)
class Choice:
    path: str
    tree: str
    capability: tuple
    runs_as: str             # "SASS sm_90" or "PTX compute_80 (JIT ...)"
    requested: str           # "auto" or a path name
    source: str              # "default table", "path= argument", "SAGEATTN_PATH", or an entry point
    reason: str

    @property
    def defaults(self) -> dict:
        """The path's configuration on this device: its defaults, updated by the table row."""
        row = table_row(self.capability)
        overrides = row.config.get(self.path, {}) if row is not None else {}
        return {**PATHS[self.path].defaults, **overrides}


def _cap_str(capability) -> str:
    return f"{capability[0]}.{capability[1]}"


# Paths this version of the Python package can run, filled in by ops.py: path -> runner.
RUNNERS: dict = {}


def choose(capability, trees: dict, requested: str = "auto", source: str = "default table",
           device: str = "the device", runnable=None) -> Choice:
    """The path for a device of ``capability``, given the package's ``trees`` (manifest
    ``trees`` dict), a requested path ("auto" or a name in ``PATHS``) and the paths the Python
    side can run (``runnable``; None: all).

    Raises UnsupportedDeviceError when the capability is not in the table, and
    PathUnavailableError when a forced path is not built or cannot run there.
    """
    capability = tuple(capability)
    cap = _cap_str(capability)
    if requested != "auto" and requested not in PATHS:
        raise ValueError(f"{'path' if source == 'path= argument' else source} must be 'auto' or "
                         f"one of {sorted(PATHS)}, got {requested!r}")
    row = table_row(capability)
    if row is None:
        raise UnsupportedDeviceError(
            f"{device} has compute capability {cap}, which sageattn does not support; "
            f"supported: {supported_capabilities()}. Use "
            "torch.nn.functional.scaled_dot_product_attention on this device.")
    if requested != "auto":
        spec = PATHS[requested]
        tree = trees.get(spec.tree)
        if tree is None:
            raise PathUnavailableError(
                f"path {requested!r} ({source}) is not built in this package; it carries "
                f"{_carried(trees)}")
        if runnable is not None and requested not in runnable:
            raise PathUnavailableError(
                f"path {requested!r} ({source}): its kernels are in this package, but this "
                f"version of sageattn has no runner for them yet (runs: {sorted(runnable)})")
        how = tree_runs_on(tree, capability)
        if how is None:
            raise PathUnavailableError(
                f"path {requested!r} ({source}) cannot run on {device} (compute capability "
                f"{cap}): the {spec.tree} tree has SASS {tree.get('sass')} and PTX "
                f"{tree.get('ptx')}")
        note = f"; {row.notes[requested]}" if requested in row.notes else ""
        return Choice(requested, spec.tree, capability, how, requested, source,
                      f"forced by {source}; {spec.summary}{note}")
    skipped = []
    for name in row.prefer:
        spec = PATHS[name]
        tree = trees.get(spec.tree)
        if tree is None:
            skipped.append(f"{name} is the intended path for {cap} but is not built in this "
                           "package")
            continue
        if runnable is not None and name not in runnable:
            skipped.append(f"{name} is the intended path for {cap}; its kernels are in this "
                           "package but this version of sageattn has no runner for them yet")
            continue
        how = tree_runs_on(tree, capability)
        if how is None:
            skipped.append(f"{name} is built but has no code for {cap}")
            continue
        fallback = f"; {'; '.join(skipped)}; using {name} instead" if skipped else ""
        return Choice(name, spec.tree, capability, how, "auto", source,
                      f"{row.reason}{fallback}; {spec.summary}")
    raise UnsupportedDeviceError(
        f"no path of this package runs on {device} (compute capability {cap}): "
        f"{'; '.join(skipped)}; the package carries {_carried(trees)}")


def _carried(trees: dict) -> str:
    if not trees:
        return "no kernel trees"
    return ", ".join(f"{n} ({' '.join(t.get('sass', ()))})" for n, t in sorted(trees.items()))


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    capability: tuple


def _query_device(index: int) -> DeviceInfo:
    import torch

    if not torch.cuda.is_available():
        raise UnsupportedDeviceError(
            "no CUDA device is available (torch.cuda.is_available() is False); sageattn "
            f"runs on NVIDIA GPUs of compute capability {supported_capabilities()}")
    return DeviceInfo(index, torch.cuda.get_device_name(index),
                      tuple(torch.cuda.get_device_capability(index)))


@functools.cache
def probe(index: int) -> DeviceInfo:
    """Name and capability of CUDA device ``index``, queried once per device."""
    return _query_device(index)


@functools.cache
def _resolve(index: int, requested: str, source: str) -> Choice:
    info = probe(index)
    return choose(info.capability, _loader.trees(), requested, source,
                  device=f"cuda:{index} ({info.name})", runnable=frozenset(RUNNERS))


def resolve(index: int, path: Optional[str] = None, entry: Optional[str] = None) -> Choice:
    """The path for a call on CUDA device ``index``.

    ``path`` (the argument) wins over ``$SAGEATTN_PATH``; ``entry`` names a low-level entry
    point that fixes the path (its ``path`` is then required).
    """
    if entry is not None:
        return _resolve(index, path, entry)
    if path is not None and path != "auto":
        return _resolve(index, path, "path= argument")
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto" and path is None:
        return _resolve(index, env, ENV_VAR)
    return _resolve(index, "auto", "default table")


def clear_caches() -> None:
    """Forget probed devices and choices (tests; a changed CUDA_VISIBLE_DEVICES)."""
    probe.cache_clear()
    _resolve.cache_clear()
    _loader.clear_caches()


def _device_index(device) -> Optional[int]:
    import torch

    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if isinstance(device, torch.Tensor):
        device = device.device
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {device}")
    if device.index is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    return device.index


class Explanation(dict):
    """``explain()``'s report: a dict, printed as readable lines."""

    def __str__(self) -> str:
        lines = []
        for key in ("device", "capability", "path", "kernel", "runs_as", "source", "reason"):
            if self.get(key) is not None:
                lines.append(f"{key:>10}: {self[key]}")
        if self.get("config"):
            cfg = ", ".join(f"{k}={v}" for k, v in self["config"].items())
            lines.append(f"{'config':>10}: {cfg}")
        pkg = self["package"]
        lines.append(f"{'toolkit':>10}: {pkg.get('toolkit')}  abi {pkg.get('abi_version')}  "
                     f"git {pkg.get('git_revision')}")
        if pkg.get("error"):
            lines.append(f"{'package':>10}: {pkg['error']}")
        for name, tree in sorted(pkg.get("trees", {}).items()):
            lines.append(f"{'tree':>10}: {name}: SASS {' '.join(tree['sass'])}; PTX "
                         f"{' '.join(tree['ptx']) or '-'}; {tree['kernels']} kernels")
        return "\n".join(lines)


def explain(device=None, *, path: Optional[str] = None, head_dim: int = 128,
            qk_quant_gran: Optional[str] = None, pv_accum_dtype: Optional[str] = None,
            is_causal: bool = False, seq_len: int = 0) -> Explanation:
    """Which path (and kernel, for a dense call with ``head_dim``, ``is_causal`` and ``seq_len``
    query rows) a call on ``device`` runs, and why, plus which trees and architectures the
    installed package carries. ``seq_len`` matters only where the kernel depends on it (sm90:
    causal hd128 calls of ``ops.SM90_CAUSAL_Q192_MIN_ROWS`` rows or more take the 192-row
    kernel); 0 names the kernel of a short call.

    ``device``: None (current CUDA device), an index, "cuda:N", a torch.device or a tensor.
    Never raises for a missing or unsupported GPU: the report says so in "reason".
    """
    report = Explanation(device=None, capability=None, path=None, kernel=None, runs_as=None,
                         source=None, reason=None, config=None, package=_loader.build_info())
    index = _device_index(device)
    if index is None:
        report["reason"] = ("no CUDA device is available (torch.cuda.is_available() is "
                            "False); sageattn needs an NVIDIA GPU of compute capability "
                            f"{supported_capabilities()}")
        return report
    try:
        info = probe(index)
        report["device"] = f"cuda:{index} ({info.name})"
        report["capability"] = _cap_str(info.capability)
        choice = resolve(index, path)
    except (UnsupportedDeviceError, PathUnavailableError, _loader.PackageError) as exc:
        report["reason"] = str(exc)
        return report
    config = dict(choice.defaults)
    if qk_quant_gran is not None:
        config["qk_quant_gran"] = qk_quant_gran
    if pv_accum_dtype is not None:
        config["pv_accum_dtype"] = pv_accum_dtype
    report.update(path=choice.path, runs_as=choice.runs_as, source=choice.source,
                  reason=choice.reason, config=config)
    from .ops import kernel_names

    try:
        names = kernel_names(choice.path, head_dim, config.get("pv_accum_dtype"), is_causal,
                             seq_len)
    except ValueError as exc:        # a pv_accum_dtype the path does not offer
        report["reason"] = f"{choice.reason}; {exc}"
        return report
    if names is not None:
        report["kernel"] = names[-1]
    return report
