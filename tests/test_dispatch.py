"""The dispatch table with mocked devices and manifests; overrides; explain(); import hygiene."""

import json
import subprocess
import sys

import pytest

from sageattn import _abi, _loader, dispatch
from sageattn.dispatch import (PathUnavailableError, UnsupportedDeviceError, arch_runs_on,
                               choose)

SM80_TREE = {"fatbin": "sm80.fatbin", "sass": ["sm_80", "sm_86", "sm_89", "sm_90", "sm_120"],
             "ptx": ["compute_80"],
             "kernels": {"sm80_qkint8_pvfp16_acc32_hd128": {"kind": "attention", "threads": 256,
                                                            "smem": 65536}}}
# A package as the design card describes it when every tree is built.
FULL = {
    "sm80": SM80_TREE,
    "sm89": {"fatbin": "sm89.fatbin", "sass": ["sm_89", "sm_90", "sm_120"], "ptx": ["compute_89"],
             "kernels": {}},
    "sm90": {"fatbin": "sm90.fatbin", "sass": ["sm_90a"], "ptx": [], "kernels": {}},
    "sm120": {"fatbin": "sm120.fatbin", "sass": ["sm_120a"], "ptx": [], "kernels": {}},
}
ONLY_SM80 = {"sm80": SM80_TREE}


# ---- the pure choice ---------------------------------------------------------------------

@pytest.mark.parametrize("cap,runs_as,fallback", [
    ((8, 0), "SASS sm_80", None),
    ((8, 6), "SASS sm_86", None),          # the newest SASS that runs, as the driver picks
    ((8, 7), "SASS sm_86", None),          # sm_86 SASS runs on 8.7 (same major, higher minor)
    ((8, 9), "SASS sm_89", "sm89"),
    ((9, 0), "SASS sm_90", "sm90"),
    ((10, 0), "PTX compute_80", "sm89"),
    ((12, 0), "SASS sm_120", "sm89"),
    ((12, 1), "SASS sm_120", "sm89"),
])
def test_only_sm80_built(cap, runs_as, fallback):
    c = choose(cap, ONLY_SM80)
    assert (c.path, c.tree, c.requested, c.source) == ("sm80", "sm80", "auto", "default table")
    assert c.runs_as.startswith(runs_as)
    if fallback:
        assert f"{fallback} is the intended path for {cap[0]}.{cap[1]} but is not built in this " \
               "package" in c.reason
        assert "using sm80 instead" in c.reason
    else:
        assert "not built" not in c.reason
    if cap == (10, 0):
        assert "JIT" in c.runs_as


@pytest.mark.parametrize("cap,path,runs_as", [
    ((8, 0), "sm80", "SASS sm_80"),
    ((8, 6), "sm80", "SASS sm_86"),
    ((8, 9), "sm89", "SASS sm_89"),
    ((9, 0), "sm90", "SASS sm_90a"),
    ((10, 0), "sm89", "PTX compute_89"),
    ((12, 0), "sm89", "SASS sm_120"),
    ((12, 1), "sm89", "SASS sm_120"),
])
def test_full_package(cap, path, runs_as):
    c = choose(cap, FULL)
    assert c.path == path and c.runs_as.startswith(runs_as)
    assert "not built" not in c.reason


@pytest.mark.parametrize("cap", [(7, 5), (7, 0), (6, 1), (11, 0), (13, 0)])
def test_unsupported_capability(cap):
    with pytest.raises(UnsupportedDeviceError) as e:
        choose(cap, FULL, device="cuda:0 (Tesla T4)")
    msg = str(e.value)
    assert "cuda:0 (Tesla T4)" in msg and f"{cap[0]}.{cap[1]}" in msg
    assert "8.0, 8.6, 8.7, 8.9, 9.0, 10.x, 12.0, 12.1" in msg
    assert isinstance(e.value, ValueError)


def test_unsupported_even_when_forced():
    with pytest.raises(UnsupportedDeviceError):
        choose((7, 5), ONLY_SM80, "sm80", "path= argument")


def test_forced_path():
    c = choose((9, 0), FULL, "sm80", "path= argument")
    assert (c.path, c.source, c.requested) == ("sm80", "path= argument", "sm80")
    assert c.runs_as == "SASS sm_90" and "forced by path= argument" in c.reason


def test_forced_path_not_built():
    with pytest.raises(PathUnavailableError, match="'sm90' .* is not built in this package; "
                                                   "it carries sm80"):
        choose((9, 0), ONLY_SM80, "sm90", "path= argument")


def test_forced_path_cannot_run():
    with pytest.raises(PathUnavailableError, match="cannot run on .*compute capability 12.1"):
        choose((12, 1), FULL, "sm120_fp4", "path= argument")
    assert choose((12, 0), FULL, "sm120_fp4", "path= argument").tree == "sm120"


def test_fp4_only_by_explicit_choice():
    assert choose((12, 0), FULL).path != "sm120_fp4"
    row = dispatch.table_row((12, 0))
    assert "sm120_fp4" in row.explicit and "sm120_fp4" not in row.prefer


def test_unknown_path_name():
    with pytest.raises(ValueError, match="^path must be 'auto' or one of"):
        choose((8, 0), FULL, "fast", "path= argument")
    with pytest.raises(ValueError, match="^SAGEATTN_PATH must be"):
        choose((8, 0), FULL, "fast", "SAGEATTN_PATH")


def test_no_trees():
    with pytest.raises(UnsupportedDeviceError, match="no path of this package runs"):
        choose((8, 0), {})


@pytest.mark.parametrize("arch,cap,runs", [
    ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_86", (8, 0), False),
    ("sm_80", (9, 0), False), ("sm_90a", (9, 0), True), ("sm_90a", (9, 1), False),
    ("sm_120", (12, 1), True), ("sm_120a", (12, 1), False), ("sm_100f", (10, 3), True),
    ("compute_80", (10, 0), True), ("compute_80", (7, 5), False), ("compute_90a", (10, 0), False),
    ("bogus", (8, 0), False),
])
def test_arch_runs_on(arch, cap, runs):
    assert arch_runs_on(arch, cap) is runs


def test_table_is_consistent():
    for row in dispatch.TABLE:
        for name in row.prefer + row.explicit:
            assert name in dispatch.PATHS, name
        assert row.reason
    for spec in dispatch.PATHS.values():
        assert spec.summary and spec.tree


# ---- probe, resolve, overrides, explain (mocked device and manifest) ----------------------

@pytest.fixture
def package(tmp_path, monkeypatch):
    """Install a manifest in a temporary kernels dir; returns a setter for its trees."""
    def install(trees):
        (tmp_path / "manifest.json").write_text(json.dumps(
            {"abi_version": _abi.ABI_VERSION, "toolkit": "nvcc 13.0.88",
             "git_revision": "abc123", "trees": trees}))
        dispatch.clear_caches()

    monkeypatch.setattr(_loader, "KERNELS_DIR", tmp_path)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    install(ONLY_SM80)
    yield install
    dispatch.clear_caches()


@pytest.fixture
def device(monkeypatch):
    """Mock the device query; returns a setter and counts queries."""
    state = {"cap": (9, 0), "name": "NVIDIA H100 80GB HBM3", "queries": 0}

    def query(index):
        state["queries"] += 1
        return dispatch.DeviceInfo(index, state["name"], state["cap"])

    def set_cap(cap, name="GPU"):
        state.update(cap=cap, name=name)
        dispatch.clear_caches()

    monkeypatch.setattr(dispatch, "_query_device", query)
    set_cap.state = state
    return set_cap


def test_probe_cached_per_device(package, device):
    for _ in range(3):
        dispatch.resolve(0)
        dispatch.resolve(1)
    assert device.state["queries"] == 2


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), (12, 1)])
def test_resolve_mocked(package, device, cap):
    device(cap)
    c = dispatch.resolve(0)
    assert c.path == "sm80" and c.capability == cap


def test_resolve_unsupported_names_device(package, device):
    device((7, 5), "Tesla T4")
    with pytest.raises(UnsupportedDeviceError, match=r"cuda:0 \(Tesla T4\) has compute "
                                                     r"capability 7.5.*supported: 8.0"):
        dispatch.resolve(0)


def test_env_override(package, device, monkeypatch):
    monkeypatch.setenv("SAGEATTN_PATH", "sm80")
    c = dispatch.resolve(0)
    assert (c.path, c.source) == ("sm80", "SAGEATTN_PATH")
    monkeypatch.setenv("SAGEATTN_PATH", "sm90")
    with pytest.raises(PathUnavailableError, match="SAGEATTN_PATH"):
        dispatch.resolve(0)
    monkeypatch.setenv("SAGEATTN_PATH", "turbo")
    with pytest.raises(ValueError, match="^SAGEATTN_PATH must be"):
        dispatch.resolve(0)
    monkeypatch.setenv("SAGEATTN_PATH", "auto")
    assert dispatch.resolve(0).source == "default table"


def test_argument_beats_env(package, device, monkeypatch):
    monkeypatch.setenv("SAGEATTN_PATH", "sm90")
    c = dispatch.resolve(0, "sm80")
    assert (c.path, c.source) == ("sm80", "path= argument")
    assert dispatch.resolve(0, "auto").source == "default table"


def test_entry_point_fixes_path(package, device, monkeypatch):
    monkeypatch.setenv("SAGEATTN_PATH", "sm90")
    c = dispatch.resolve(0, "sm80", "sageattn_qk_int8_pv_fp16_cuda")
    assert (c.path, c.source) == ("sm80", "sageattn_qk_int8_pv_fp16_cuda")


def test_full_package_resolve(package, device, monkeypatch):
    package(FULL)
    device((9, 0))
    monkeypatch.setattr(dispatch, "RUNNERS", {p: None for p in dispatch.PATHS})
    assert dispatch.resolve(0).path == "sm90"
    assert dispatch.resolve(0, "sm80").path == "sm80"


def test_built_tree_without_runner_is_skipped(package, device, monkeypatch):
    # A tree in the package that this Python version cannot drive is passed over, said so.
    package(FULL)
    device((9, 0))
    monkeypatch.delitem(dispatch.RUNNERS, "sm90")
    c = dispatch.resolve(0)
    assert c.path == "sm80"       # not sm89: its E4M3 MMA is emulated on 9.0
    assert "sm90 is the intended path for 9.0; its kernels are in this package but this " \
           "version of sageattn has no runner for them yet" in c.reason
    with pytest.raises(PathUnavailableError, match="no runner"):
        dispatch.resolve(0, "sm90")


def test_hopper_resolves_to_sm90(package, device):
    package(FULL)
    device((9, 0))
    c = dispatch.resolve(0)
    assert (c.path, c.tree) == ("sm90", "sm90")
    assert c.defaults == {"qk_quant_gran": "per_thread", "pv_accum_dtype": "fp32+fp32",
                          "smooth_k": True, "smooth_v": False}


@pytest.mark.parametrize("cap,gran,runs_as", [((8, 9), "per_thread", "SASS sm_89"),
                                              ((12, 0), "per_warp", "SASS sm_120"),
                                              ((12, 1), "per_warp", "SASS sm_120")])
def test_sm89_devices_resolve_to_sm89(package, device, cap, gran, runs_as):
    # The real runners (sm80, sm89): Ada and Blackwell consumer GPUs get the FP8 PV path with
    # fp16 in-block accumulation (2++), per-warp Q/K scales on 12.x.
    package(FULL)
    device(cap)
    c = dispatch.resolve(0)
    assert (c.path, c.tree, c.runs_as) == ("sm89", "sm89", runs_as)
    assert "no runner" not in c.reason and "not built" not in c.reason
    assert c.defaults == {"qk_quant_gran": gran, "pv_accum_dtype": "fp32+fp16",
                          "smooth_k": True, "smooth_v": False}
    # The table's row configuration does not leak into other paths or devices.
    assert dispatch.resolve(0, "sm80").defaults == dispatch.PATHS["sm80"].defaults


def test_sm89_forced_on_h100(package, device, monkeypatch):
    package(FULL)
    device((9, 0))
    c = dispatch.resolve(0, "sm89")
    assert (c.path, c.runs_as, c.source) == ("sm89", "SASS sm_90", "path= argument")
    assert c.defaults["qk_quant_gran"] == "per_thread"
    monkeypatch.setenv("SAGEATTN_PATH", "sm89")
    assert dispatch.resolve(0).path == "sm89"
    c = dispatch.resolve(0, "sm89", "sageattn_qk_int8_pv_fp8_cuda")
    assert c.source == "sageattn_qk_int8_pv_fp8_cuda"


def test_sm89_not_built_falls_back_to_sm80(package, device):
    device((8, 9))
    c = dispatch.resolve(0)
    assert c.path == "sm80" and "sm89 is the intended path for 8.9 but is not built" in c.reason
    with pytest.raises(PathUnavailableError, match="'sm89' .* is not built in this package"):
        dispatch.resolve(0, "sm89")


def test_choose_runnable():
    assert choose((8, 9), FULL, runnable={"sm80"}).path == "sm80"
    assert choose((8, 9), FULL, runnable={"sm80", "sm89"}).path == "sm89"
    with pytest.raises(PathUnavailableError, match="no runner"):
        choose((8, 9), FULL, "sm89", "path= argument", runnable={"sm80"})


def test_explain_h100(package, device):
    device((9, 0), "NVIDIA H100 80GB HBM3")
    r = dispatch.explain(0, head_dim=72)
    assert r["device"] == "cuda:0 (NVIDIA H100 80GB HBM3)" and r["capability"] == "9.0"
    assert r["path"] == "sm80" and r["runs_as"] == "SASS sm_90"
    assert r["kernel"] == "sm80_qkint8_pvfp16_acc32_hd128"
    assert "sm90 is the intended path for 9.0 but is not built" in r["reason"]
    assert r["config"] == {"qk_quant_gran": "per_thread", "pv_accum_dtype": "fp32",
                           "smooth_k": True}
    pkg = r["package"]
    assert pkg["toolkit"] == "nvcc 13.0.88" and pkg["abi_version"] == _abi.ABI_VERSION
    assert pkg["trees"]["sm80"]["sass"] == SM80_TREE["sass"] and pkg["error"] is None
    text = str(r)
    for needle in ("cuda:0 (NVIDIA H100 80GB HBM3)", "sm80", "SASS sm_90", "nvcc 13.0.88",
                   "sm_80 sm_86 sm_89 sm_90 sm_120", "compute_80", "abc123"):
        assert needle in text, needle


@pytest.mark.parametrize("cap,name,gran", [((8, 9), "NVIDIA L40S", "per_thread"),
                                           ((12, 0), "NVIDIA GeForce RTX 5090", "per_warp")])
def test_explain_sm89_devices(package, device, cap, name, gran):
    package(FULL)
    device(cap, name)
    r = dispatch.explain(0)
    assert r["path"] == "sm89" and r["kernel"] == "sm89_qkint8_pvfp8_acc16x32_hd128"
    assert r["config"] == {"qk_quant_gran": gran, "pv_accum_dtype": "fp32+fp16",
                           "smooth_k": True, "smooth_v": False}
    assert "2++" in r["reason"] and "no runner" not in r["reason"]
    text = str(r)
    for needle in (name, "path: sm89", "sm89_qkint8_pvfp8_acc16x32_hd128", "fp32+fp16",
                   f"qk_quant_gran={gran}", "sm_89 sm_90 sm_120"):
        assert needle in text, needle
    r = dispatch.explain(0, head_dim=64, pv_accum_dtype="fp32+fp32")
    assert r["kernel"] == "sm89_qkint8_pvfp8_acc32x32_hd64"


def test_explain_sm90_kernel_by_causality_and_length(package, device):
    package(FULL)
    device((9, 0), "NVIDIA H100 80GB HBM3")
    from sageattn import ops
    n = ops.SM90_CAUSAL_Q192_MIN_ROWS
    kernels = {(causal, S): dispatch.explain(0, is_causal=causal, seq_len=S)["kernel"]
               for causal in (False, True) for S in (0, n - 1, n)}
    assert kernels == {(False, 0): "sm90_qkint8_pvfp8_acc32x32_q192_hd128",
                       (False, n - 1): "sm90_qkint8_pvfp8_acc32x32_q192_hd128",
                       (False, n): "sm90_qkint8_pvfp8_acc32x32_q192_hd128",
                       (True, 0): "sm90_qkint8_pvfp8_acc32x32_hd128",
                       (True, n - 1): "sm90_qkint8_pvfp8_acc32x32_hd128",
                       (True, n): "sm90_qkint8_pvfp8_acc32x32_q192_hd128"}
    assert dispatch.explain(0, head_dim=64, is_causal=True, seq_len=n)["kernel"] == \
        "sm90_qkint8_pvfp8_acc32x32_hd64"


def test_explain_forced_sm89_on_h100(package, device):
    package(FULL)
    device((9, 0), "NVIDIA H100 80GB HBM3")
    r = dispatch.explain(0, path="sm89", pv_accum_dtype="fp32")
    assert (r["path"], r["kernel"], r["runs_as"]) == ("sm89", "sm89_qkint8_pvfp8_acc32_hd128",
                                                      "SASS sm_90")
    assert "forced by path= argument" in r["reason"]
    # A mode of another path: no kernel, and the reason says why.
    r = dispatch.explain(0, path="sm89", pv_accum_dtype="fp16+fp32")
    assert r["kernel"] is None and "pv_accum_dtype must be one of" in r["reason"]


def test_explain_options(package, device):
    device((8, 0))
    r = dispatch.explain("cuda:0", head_dim=64, pv_accum_dtype="fp16+fp32")
    assert r["kernel"] == "sm80_qkint8_pvfp16_acc16x32_hd64"
    assert r["config"]["pv_accum_dtype"] == "fp16+fp32"


def test_explain_unsupported_does_not_raise(package, device):
    device((7, 5), "Tesla T4")
    r = dispatch.explain(0)
    assert r["path"] is None and "7.5" in r["reason"] and "Tesla T4" in r["reason"]


def test_explain_forced_unavailable(package, device):
    r = dispatch.explain(0, path="sm90")
    assert r["path"] is None and "not built in this package" in r["reason"]


def test_explain_no_gpu(package, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = dispatch.explain()
    assert r["device"] is None and r["path"] is None
    assert "no CUDA device" in r["reason"] and "8.0" in r["reason"]
    assert "sm80" in str(r)


def test_explain_no_manifest(tmp_path, monkeypatch, device):
    monkeypatch.setattr(_loader, "KERNELS_DIR", tmp_path)
    dispatch.clear_caches()
    try:
        r = dispatch.explain(0)
        assert r["path"] is None and "manifest.json is missing" in r["reason"]
        assert "manifest.json is missing" in r["package"]["error"]
    finally:
        dispatch.clear_caches()


def test_manifest_abi_mismatch(package, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"abi_version": _abi.ABI_VERSION + 1,
                                                        "trees": {}}))
    dispatch.clear_caches()
    with pytest.raises(_loader.PackageError, match="ABI"):
        _loader.manifest()


def test_import_touches_no_gpu_triton_or_host_layer():
    code = ("import sys, sageattn, torch; "
            "print(sorted(m for m in ('triton', 'sageattn._ext') if m in sys.modules), "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[] False"


def test_sm120_fp4_on_hopper_is_the_forced_verification_build():
    # The sm120 tree's sm_90 SASS (software FP4) runs on 9.0 only when forced, and says so.
    trees = {**FULL, "sm120": {**FULL["sm120"], "sass": ["sm_90", "sm_120a"]}}
    assert choose((9, 0), trees).path != "sm120_fp4"
    c = choose((9, 0), trees, "sm120_fp4", "path= argument")
    assert (c.tree, c.runs_as) == ("sm120", "SASS sm_90") and "verification build" in c.reason
    assert "sm120_fp4" in dispatch.table_row((9, 0)).explicit
    assert "verification" not in choose((12, 0), trees, "sm120_fp4", "path= argument").reason
    with pytest.raises(PathUnavailableError, match="cannot run"):
        choose((8, 9), trees, "sm120_fp4", "path= argument")


def test_sm120_fp4_on_dgx_spark_needs_the_sm121a_image():
    # sm_120a SASS does not run on 12.1; the cu130 build carries sm_121a, the cu128 one cannot.
    with_121 = {**FULL, "sm120": {**FULL["sm120"], "sass": ["sm_90", "sm_120a", "sm_121a"]}}
    c = choose((12, 1), with_121, "sm120_fp4", "path= argument")
    assert (c.tree, c.runs_as) == ("sm120", "SASS sm_121a")
    without = {**FULL, "sm120": {**FULL["sm120"], "sass": ["sm_90", "sm_120a"]}}
    with pytest.raises(PathUnavailableError, match="cannot run"):
        choose((12, 1), without, "sm120_fp4", "path= argument")
