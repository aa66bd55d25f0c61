"""sageattn inside real models, on a GPU: the torch ops under opcheck, torch.compile (fullgraph,
default and reduce-overhead) and CUDA graphs bit for bit against eager, launches on the
current stream, the SDPA drop-in in a small transformer, training inputs, the LSE merge
example, and per-call host time.

Run with ``pytest -m gpu -s tests/gpu/test_integration.py``: the accuracy rows join the error
table printed at the end; the host times print as a table (and go to ``$SAGEATTN_GPU_TIMINGS``
when set). Bit-for-bit comparisons hold because compiled code, graph replays and eager calls
launch the same kernels with the same arguments on the same inputs.
"""

import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import sageattn
from sageattn import dispatch, ops, reference, sdpa

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
SM80_BOUND = 0.02       # rel-L1 of the sm80 path against torch's bf16 attention, per output
LSE_VS_REF = 0.06       # max |LSE - reference| (tests/gpu/test_sm80.py)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod     # Dynamo looks a traced function's globals up by module name
    spec.loader.exec_module(mod)
    return mod


sdpa_model = _load("_sageattn_sdpa_model", ROOT / "tests" / "sdpa_model.py")
EXAMPLE = ROOT / "examples" / "lse_merge.py"


@pytest.fixture(autouse=True)
def fresh_stats():
    sdpa.reset_sdpa_stats()
    yield
    sdpa.reset_sdpa_stats()


@pytest.fixture
def sm80(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "sm80")


def make(B=2, H=4, Sq=256, Sk=None, D=128, Hkv=None, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Sk, Hkv = Sk or Sq, Hkv or H
    q = torch.randn(B, H, Sq, D, generator=g, device="cuda")
    k = torch.randn(B, Hkv, Sk, D, generator=g, device="cuda")
    k = k + 2 * torch.randn(B, Hkv, 1, D, generator=g, device="cuda")    # channel outliers
    v = torch.randn(B, Hkv, Sk, D, generator=g, device="cuda")
    return tuple(x.to(dtype) for x in (q, k, v))


def rel_l1(a, b):
    return reference.compare(a, b)["rel_l1"]


def _path_runs(path) -> bool:
    try:
        dispatch.resolve(torch.cuda.current_device(), path)
    except (dispatch.PathUnavailableError, dispatch.UnsupportedDeviceError):
        return False
    return True


# ---- opcheck on every registered op ------------------------------------------------------

def _registered_ops():
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sageattn::"))


def _attention_samples():
    q, k, v = make(B=2, H=4, Sq=130, Sk=200, D=64)
    qg, kg, vg = make(B=1, H=8, Hkv=2, Sq=77, D=128, seed=1)
    nhd = [x.transpose(1, 2) for x in (q, k, v)]
    yield (q, k, v, "HND", False, 0.125, False, "", "", "", "", -1)
    yield (q, k, v, "HND", True, 0.125, True, "", "", "", "", -1)
    yield (qg, kg, vg, "HND", True, 0.09, True, "sm80", "sageattn_qk_int8_pv_fp16_cuda",
           "per_warp", "fp16+fp32", 0)
    yield (*nhd, "NHD", False, 0.1, True, "sm80", "", "", "", 1)
    if _path_runs("sm89"):
        yield (qg, kg, vg, "HND", True, 0.09, True, "sm89", "", "", "fp32+fp32", -1)


def _sparse_samples():
    q, k, v = make(B=2, H=4, Sq=130, Sk=200, D=64)
    keep = (torch.rand(1, 4, 2, 4, device="cuda") < 0.5).to(torch.int8).expand(2, 4, 2, 4)
    yield (q, k, v, keep, "HND", False, 0.125, True, "")
    yield (q, k, v, keep, "HND", True, 0.125, False, "sm80")


def _varlen_samples():
    q = torch.randn(300, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(260, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu_q = torch.tensor([0, 100, 101, 300], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 60, 200, 260], device="cuda", dtype=torch.int32)
    yield (q, k, v, cu_q, cu_k, 199, 140, False, 0.125, -1, True, "")
    yield (q, k, v, cu_q, cu_k, 199, 140, True, 0.125, 0, False, "sm80")


def _fp4_samples():
    if not _path_runs("sm120_fp4"):
        pytest.skip("the sm120 FP4 tree does not run here")
    q, k, v = make(B=1, H=4, Hkv=2, Sq=130, Sk=200, D=64)
    yield (q, k, v, "HND", False, 0.125, True, True, True)
    yield (q, k, v, "HND", True, 0.125, False, False, False)


OPCHECK_SAMPLES = {"sageattn::attention": _attention_samples,
                   "sageattn::fp4_attention": _fp4_samples,
                   "sageattn::sparse_attention": _sparse_samples,
                   "sageattn::varlen_attention": _varlen_samples}


def test_every_op_has_opcheck_samples():
    missing = [name for name in _registered_ops() if name not in OPCHECK_SAMPLES]
    assert _registered_ops(), "no sageattn op is registered"
    assert not missing, f"ops without opcheck samples in this file: {missing}"


@pytest.mark.parametrize("name", sorted(OPCHECK_SAMPLES))
def test_opcheck(name):
    namespace, op_name = name.split("::")
    op = getattr(getattr(torch.ops, namespace), op_name).default
    for args in OPCHECK_SAMPLES[name]():
        torch.library.opcheck(op, args)


# ---- torch.compile and CUDA graphs: bit for bit against eager ----------------------------

def _inputs(seed):
    q, k, v = make(seed=seed)
    _, kg, vg = make(Hkv=2, seed=seed + 100)
    return q, k, v, kg, vg


def _calls(q, k, v, kg, vg):
    """Every entry point, in the ways models call them (all take the quantized path)."""
    out_c, lse_c = sageattn.sageattn(q, k, v, is_causal=True, return_lse=True)
    nhd = [x.transpose(1, 2) for x in (q, k, v)]
    return (sageattn.sageattn(q, k, v), out_c, lse_c,
            sageattn.sageattn(q, kg, vg, is_causal=True),
            sageattn.sageattn(*nhd, tensor_layout="NHD"),
            sageattn.sageattn_qk_int8_pv_fp16_cuda(q, k, v, qk_quant_gran="per_warp",
                                                   pv_accum_dtype="fp16+fp32"),
            sdpa.scaled_dot_product_attention(q, k, v, is_causal=True),
            sdpa.scaled_dot_product_attention(q, kg, vg, enable_gqa=True, scale=0.1),
            sdpa.scaled_dot_product_attention(q, k.narrow(2, 0, 100), v.narrow(2, 0, 100),
                                              is_causal=True))


def _calls_fp8(q, k, v, kg, vg):
    """``_calls`` plus the sm89 path's entry point (where that path runs)."""
    fp8 = sageattn.sageattn_qk_int8_pv_fp8_cuda
    return (*_calls(q, k, v, kg, vg), fp8(q, kg, vg, is_causal=True),
            fp8(q, k, v, pv_accum_dtype="fp32+fp32", smooth_v=True))


def _entry_points():
    return _calls_fp8 if _path_runs("sm89") else _calls


def _assert_same(got, expect, what):
    assert len(got) == len(expect)
    for i, (a, b) in enumerate(zip(got, expect)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: output {i}"
        assert torch.equal(a, b), f"{what}: output {i} differs from eager"


def test_eager_calls_are_quantized_and_deterministic():
    fn = _entry_points()
    args = _inputs(0)
    first = fn(*args)
    assert sdpa.sdpa_stats()["quantized"] == 3 and sdpa.sdpa_stats()["fallback"] == 0
    _assert_same(fn(*args), first, "second eager run")


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compile_fullgraph_equals_eager(mode):
    torch._dynamo.reset()
    counters.clear()
    fn = _entry_points()
    compiled = torch.compile(fn, fullgraph=True, mode=mode)
    for seed in range(5):       # reduce-overhead: warm-up, record, then replays
        args = _inputs(seed)
        got = [t.clone() for t in compiled(*args)]
        _assert_same(got, fn(*args), f"mode={mode}, call {seed}")
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch._dynamo.reset()


def test_compile_dynamic_lengths_equal_eager_without_recompiling():
    torch._dynamo.reset()

    def fn(q, k, v):
        return (sageattn.sageattn(q, k, v, is_causal=True),
                sdpa.scaled_dot_product_attention(q, k, v))

    compiled = torch.compile(fn, fullgraph=True)
    q, k, v = make(Sq=256)
    for x in (q, k, v):
        torch._dynamo.mark_dynamic(x, 2)
    _assert_same(compiled(q, k, v), fn(q, k, v), "dynamic, S=256")
    # (Length 1 would recompile: Dynamo specializes sizes 0 and 1.)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for S in (100, 700, 1000):
            args = make(Sq=S, seed=S)
            _assert_same(compiled(*args), fn(*args), f"dynamic, S={S}")
    torch._dynamo.reset()


def test_cuda_graph_capture_and_replay():
    fn = _entry_points()
    static = list(_inputs(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):           # warm-up (loads the kernels) off the capture
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn(*static)
    for seed in (1, 2, 3):
        fresh = _inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        _assert_same([t.clone() for t in outs], fn(*fresh), f"replay {seed}")


def test_launches_on_the_current_stream():
    """On a side stream: a long sleep, then new inputs copied in, then the calls. Launches
    on another stream (the legacy default stream does not wait for torch's non-blocking
    streams) would read the old inputs during the sleep."""
    fn = _entry_points()
    old, new = _inputs(0), _inputs(1)
    expect = fn(*new)
    buffers = [x.clone() for x in old]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)     # ~50 ms at 2 GHz
        for dst, src in zip(buffers, new):
            dst.copy_(src)
        got = fn(*buffers)
    torch.cuda.synchronize()
    _assert_same(got, expect, "side stream")


# ---- the drop-in in a model ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["sm80", "auto"])
def test_transformer_patched_vs_unpatched(path, monkeypatch, record):
    if path == "auto":
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, path)
    resolved = dispatch.resolve(torch.cuda.current_device()).path
    model = sdpa_model.build("cuda", torch.bfloat16)
    x, context, key_padding = sdpa_model.inputs("cuda", torch.bfloat16, seq=256)
    with torch.no_grad():
        ref = model(x, context, key_padding)
        ref_attn = model.attention_outputs()
        assert sdpa.sdpa_stats()["calls"] == 0
        with sageattn.patch_sdpa():
            out = model(x, context, key_padding)
        attn = model.attention_outputs()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    errors = [rel_l1(a, b) for a, b in zip(attn, ref_attn)] + [rel_l1(out, ref)]
    names = [f"layer {i} ({layer['expect']})" for i, layer in enumerate(sdpa_model.LAYERS)]
    print(f"\ndrop-in vs torch SDPA, path {resolved}, rel-L1 per output:")
    for name, err in zip(names + ["model output"], errors):
        print(f"  {name:>24}: {err:.6f}")
    record(f"sdpa drop-in transformer ({resolved}) vs unpatched", rel_l1=max(errors),
           cos=reference.compare(out, ref)["cos"])
    stats = sdpa.sdpa_stats()
    paths = stats.pop("paths")
    assert stats == sdpa_model.expected_stats()
    assert paths == {resolved: stats["quantized"]}
    if resolved == "sm80":
        assert max(errors) <= SM80_BOUND, dict(zip(names + ["model output"], errors))


def test_transformer_compiled_with_the_patch(sm80):
    torch._dynamo.reset()
    model = sdpa_model.build("cuda", torch.bfloat16)
    x, context, key_padding = sdpa_model.inputs("cuda", torch.bfloat16, seq=256)
    with torch.no_grad():
        ref = model(x, context, key_padding)
        with sageattn.patch_sdpa():
            eager = model(x, context, key_padding)
            compiled = torch.compile(model, fullgraph=True)
            got = [compiled(x, context, key_padding).clone() for _ in range(2)]
    # Inductor fuses the layers' other ops differently (fp32 inside fused kernels), so the
    # model's output is compared within the path's bound, not bit for bit.
    print(f"\ncompiled patched model: rel-L1 {rel_l1(got[0], eager):.6f} vs eager patched, "
          f"{rel_l1(got[0], ref):.6f} vs unpatched")
    assert torch.equal(got[0], got[1])
    assert rel_l1(got[0], eager) <= SM80_BOUND and rel_l1(got[0], ref) <= SM80_BOUND
    torch._dynamo.reset()


# ---- training inputs ----------------------------------------------------------------------

def test_strict_api_refuses_inputs_that_require_grad():
    q, k, v = make()
    q.requires_grad_()
    with pytest.raises(ValueError, match="q requires grad"):
        sageattn.sageattn(q, k, v)
    with torch.no_grad():
        sageattn.sageattn(q, k, v)


def test_drop_in_falls_back_and_gradients_flow():
    leaves = [x.requires_grad_() for x in make(seed=3)]
    refs = [x.detach().clone().requires_grad_() for x in leaves]
    out = sdpa.scaled_dot_product_attention(*leaves, is_causal=True)
    ref = TORCH_SDPA(*refs, is_causal=True)
    assert out.requires_grad and out.grad_fn is not None
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    for x, r in zip(leaves, refs):
        assert x.grad is not None
        assert rel_l1(x.grad, r.grad) < 1e-2
    assert sdpa.sdpa_stats()["reasons"] == {"requires_grad": 1}


# ---- LSE merge (sequence parallelism) -------------------------------------------------------

@pytest.mark.parametrize("path", ["sm80", "auto"])
def test_lse_merge_example(path, monkeypatch, record):
    if path == "auto":
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_VAR, path)
    resolved = dispatch.resolve(torch.cuda.current_device()).path
    example = _load("_sageattn_lse_merge", EXAMPLE)
    errors = example.main(device="cuda", B=1, H=8, Sq=4096, D=128)
    record(f"LSE merge of two K/V halves ({resolved}) vs reference",
           rel_l1=errors["merged_vs_ref"], lse_err=errors["lse_merged_vs_ref"])
    assert errors["merged_vs_ref"] <= 1.25 * errors["full_vs_ref"] + 1e-3
    assert errors["lse_merged_vs_ref"] <= LSE_VS_REF
    assert errors["lse_merged_vs_full"] <= LSE_VS_REF
    if resolved == "sm80":
        assert errors["merged_vs_full"] <= SM80_BOUND and errors["merged_vs_ref"] <= SM80_BOUND


def test_lse_merge_example_runs_as_a_script():
    done = subprocess.run([sys.executable, str(EXAMPLE), "--seq", "512", "--heads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "merged_vs_full" in done.stdout


# ---- per-call host time ---------------------------------------------------------------------

def _host_us(fn, calls=50, repeats=21):
    """Median host time of one call: ``calls`` calls back to back, no synchronization inside
    (the tiny kernels finish long before the next launch is issued)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def test_host_time_per_call(monkeypatch):
    q, k, v = make(B=1, H=1, Sq=64, D=64)
    mask = torch.ones(64, 64, dtype=torch.bool, device="cuda")
    cases = {
        "sageattn.sageattn (eager, direct)": lambda: sageattn.sageattn(q, k, v),
        "sageattn.scaled_dot_product_attention (quantized)":
            lambda: sdpa.scaled_dot_product_attention(q, k, v),
        "sageattn.scaled_dot_product_attention (fallback: attn_mask)":
            lambda: sdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "torch SDPA": lambda: TORCH_SDPA(q, k, v),
        "torch SDPA with attn_mask": lambda: TORCH_SDPA(q, k, v, attn_mask=mask),
    }
    with torch.no_grad():
        results = {name: _host_us(fn) for name, fn in cases.items()}
        monkeypatch.setattr(ops, "ALWAYS_USE_OP", True)
        results["sageattn.sageattn through the torch op (ALWAYS_USE_OP)"] = _host_us(
            cases["sageattn.sageattn (eager, direct)"])
    lines = [f"host time per eager call, B=1 H=1 S=64 D=64 bf16, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, path {dispatch.resolve(q.device.index).path}:",
             "| call | host us |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in results.items()]
    text = "\n".join(lines)
    print("\n" + text)
    if os.environ.get("SAGEATTN_GPU_TIMINGS"):
        with open(os.environ["SAGEATTN_GPU_TIMINGS"], "a") as f:
            f.write(text + "\n")
