"""The SDPA drop-in on the CPU: routing, torch semantics, counters, logging and the patch.

Three ways to reach the quantized branch without a GPU:

* CPU tensors: always torch's function (the "device" fallback).
* ``emulated``: CPU tensors count as eligible and the sm80 path runs as the emulator behind
  the real ``ops.attention`` and the ``sageattn::attention`` op (dispatch mocked), so
  results can be compared with torch's function, the emulator and the fp32 reference.
* fake CUDA tensors (``torch._subclasses.FakeTensorMode``): the real device checks see
  "cuda"; the op's fake implementation gives the result's shape, and ``torch.export``
  (strict: Dynamo with fullgraph) shows which op each call becomes.
"""

import inspect
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import sageattn
import sdpa_model
from sageattn import dispatch, emulate, reference, sdpa

TORCH_SDPA = torch._C._nn.scaled_dot_product_attention
BOUND = 0.02          # rel-L1 of the sm80 path against torch's function (fp32 reference ~0.01)


def _choice():
    return dispatch.Choice("sm80", "sm80", (9, 0), "SASS sm_90", "auto", "default table", "test")


@pytest.fixture(autouse=True)
def fresh_stats():
    sdpa.reset_sdpa_stats()
    yield
    sdpa.reset_sdpa_stats()


@pytest.fixture
def resolve_sm80(monkeypatch):
    monkeypatch.setattr(dispatch, "resolve", lambda index, path=None, entry=None: _choice())


@pytest.fixture
def emulated(monkeypatch, resolve_sm80):
    """CPU tensors take the quantized branch; the sm80 runner is the emulator. Returns the
    list of runner calls (dicts of the kernel arguments)."""
    calls = []

    def runner(q, k, v, *, tensor_layout, is_causal, sm_scale, return_lse, qk_quant_gran,
               pv_accum_dtype, smooth_k, **kw):
        calls.append(dict(shape_q=tuple(q.shape), shape_k=tuple(k.shape), causal=is_causal,
                          sm_scale=sm_scale))
        res = emulate.sm80_attention(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                                     sm_scale=sm_scale, qk_quant_gran=qk_quant_gran,
                                     pv_accum_dtype=pv_accum_dtype, smooth_k=smooth_k,
                                     return_lse=return_lse)
        return res if return_lse else (res, None)

    monkeypatch.setattr(sdpa, "_QUANTIZED_DEVICE_TYPE", "cpu")
    monkeypatch.setitem(dispatch.RUNNERS, "sm80", runner)
    return calls


def rand(*shape, dtype=torch.bfloat16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad)


def qkv(B=1, H=2, Sq=96, Sk=None, D=64, Hkv=None, dtype=torch.bfloat16, seed=0):
    Sk, Hkv = Sk or Sq, Hkv or H
    return (rand(B, H, Sq, D, dtype=dtype, seed=seed),
            rand(B, Hkv, Sk, D, dtype=dtype, seed=seed + 1),
            rand(B, Hkv, Sk, D, dtype=dtype, seed=seed + 2))


def rel_l1(a, b):
    return reference.compare(a, b)["rel_l1"]


def stats_without_paths():
    s = sdpa.sdpa_stats()
    del s["paths"]
    return s


# ---- signature and patching ------------------------------------------------------------

def test_signature_is_torchs():
    params = inspect.signature(sageattn.scaled_dot_product_attention).parameters
    assert [(p.name, p.kind, p.default) for p in params.values()] == [
        ("query", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("key", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("value", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        ("attn_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, None),
        ("dropout_p", inspect.Parameter.POSITIONAL_OR_KEYWORD, 0.0),
        ("is_causal", inspect.Parameter.POSITIONAL_OR_KEYWORD, False),
        ("scale", inspect.Parameter.KEYWORD_ONLY, None),
        ("enable_gqa", inspect.Parameter.KEYWORD_ONLY, False),
    ]
    # torch's own function: the same names, scale and enable_gqa keyword-only as well.
    assert TORCH_SDPA.__doc__.lstrip().startswith(
        "scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,")
    q, k, v = qkv(Sq=8, D=16)
    for fn in (TORCH_SDPA, sageattn.scaled_dot_product_attention):
        fn(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.2,
           enable_gqa=False)
        with pytest.raises(TypeError):
            fn(q, k, v, None, 0.0, False, 0.2)


def test_patch_installs_and_restores():
    original = F.scaled_dot_product_attention
    assert original is TORCH_SDPA
    with sageattn.patch_sdpa() as fn:
        assert fn is sageattn.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is fn
        assert torch.nn.functional.scaled_dot_product_attention is fn
    assert F.scaled_dot_product_attention is original


def test_patch_restores_when_an_exception_escapes():
    original = F.scaled_dot_product_attention
    with pytest.raises(KeyError, match="boom"):
        with sageattn.patch_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is original


def test_patch_nests_and_decorates():
    original = F.scaled_dot_product_attention
    with sageattn.patch_sdpa():
        with sageattn.patch_sdpa():
            assert F.scaled_dot_product_attention is sdpa.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is sdpa.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is original

    @sageattn.patch_sdpa()
    def run():
        return F.scaled_dot_product_attention

    assert run() is sdpa.scaled_dot_product_attention
    assert run() is sdpa.scaled_dot_product_attention    # the decorator works more than once
    assert F.scaled_dot_product_attention is original


def test_patch_restores_a_previous_patch(monkeypatch):
    def theirs(*args, **kwargs):
        return TORCH_SDPA(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", theirs)
    with sageattn.patch_sdpa():
        assert F.scaled_dot_product_attention is sdpa.scaled_dot_product_attention
    assert F.scaled_dot_product_attention is theirs


def test_patch_reaches_torch_functional_internals():
    # nn.MultiheadAttention (no fast path in training mode) calls the module-global name.
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).train()
    x = torch.randn(2, 10, 32)
    with sageattn.patch_sdpa():
        mha(x, x, x, need_weights=False)
    assert sdpa.sdpa_stats()["reasons"] == {"device": 1}


# ---- fallbacks -------------------------------------------------------------------------

def _cases():
    """(id, reason, args, kwargs) of calls torch's function must serve."""
    q, k, v = qkv()
    q32, k32, v32 = qkv(dtype=torch.float32)
    mask = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(3)) > 0.3
    qt = rand(1, 2, 64, 96).transpose(-1, -2)                    # last dim not contiguous
    sparse = q.to(torch.float32).to_sparse()
    return [
        ("mask", "attn_mask", (q, k, v), dict(attn_mask=mask)),
        ("additive-mask", "attn_mask", (q, k, v),
         dict(attn_mask=torch.zeros(96, 96, dtype=q.dtype))),
        ("dropout", "dropout", (q, k, v), dict(dropout_p=0.1)),
        ("fp32", "dtype", (q32, k32, v32), {}),
        ("mixed-dtypes", "dtype", (q, k.half(), v), {}),
        ("3-d", "not 4-D", (q[0], k[0], v[0]), {}),
        ("5-d", "not 4-D", (q[None], k[None], v[None]), {}),
        ("head-dim-256", "head dim", qkv(D=256), {}),
        ("value-head-dim", "head dim", (q, k, rand(1, 2, 96, 32)), {}),
        ("batch-broadcast", "shape", (rand(2, 2, 96, 64), k, v), {}),
        ("heads-broadcast", "shape", qkv(H=4, Hkv=1), {}),
        ("gqa-not-divisible", "shape", qkv(H=3, Hkv=2), dict(enable_gqa=True)),
        ("empty", "shape", qkv(Sq=0, Sk=5), {}),
        ("strides", "strides", (qt, k, v), {}),
        ("scale-inf", "scale", (q, k, v), dict(scale=math.inf)),
        ("subclass", "tensor type", (q.as_subclass(_Sub), k, v), {}),
        ("sparse", "layout", (sparse, k32, v32), {}),
        ("requires-grad", "requires_grad", (rand(1, 2, 96, 64, requires_grad=True), k, v), {}),
    ]


class _Sub(torch.Tensor):
    pass


_CASES = _cases()


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_fallbacks_call_torch(emulated, case):
    _, reason, args, kwargs = case
    torch.manual_seed(5)
    try:
        expect = TORCH_SDPA(*args, **kwargs)
    except Exception as exc:          # torch refuses it: the drop-in must refuse it the same way
        with pytest.raises(type(exc)):
            sageattn.scaled_dot_product_attention(*args, **kwargs)
    else:
        torch.manual_seed(5)
        out = sageattn.scaled_dot_product_attention(*args, **kwargs)
        assert type(out) is type(expect) and out.dtype == expect.dtype
        torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)
    assert emulated == [], "the quantized path ran"
    assert stats_without_paths() == {"calls": 1, "quantized": 0, "fallback": 1,
                                     "reasons": {reason: 1}}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_nested_jagged_tensors_fall_back(emulated):
    nt = torch.nested.nested_tensor([rand(5, 2, 16), rand(7, 2, 16, seed=1)],
                                    layout=torch.jagged).transpose(1, 2)
    out = sageattn.scaled_dot_product_attention(nt, nt, nt)
    assert out.is_nested
    assert sdpa.sdpa_stats()["reasons"] == {"tensor type": 1}


def test_cpu_tensors_fall_back_without_mocks():
    q, k, v = qkv()
    for kwargs in ({}, dict(is_causal=True), dict(scale=0.3)):
        assert torch.equal(sageattn.scaled_dot_product_attention(q, k, v, **kwargs),
                           TORCH_SDPA(q, k, v, **kwargs))
    assert stats_without_paths()["reasons"] == {"device": 3}


def _torch_sdpa_runs_on_fake_cuda() -> bool:
    """Some torch builds pick an SDPA backend for fake CUDA tensors by asking the driver (seen:
    2.9.1+cu128 on a machine with no driver: cudaErrorInsufficientDriver); 2.13 CPU and
    2.14.1+cu130 do not. Tests that need torch's own SDPA on fake CUDA tensors skip there."""
    try:
        with FakeTensorMode():
            x = torch.empty(1, 1, 8, 8, dtype=torch.float16, device="cuda")
            TORCH_SDPA(x, x, x)
        return True
    except Exception:  # noqa: BLE001 (any failure means: not in this environment)
        return False


needs_torch_sdpa_on_fake_cuda = pytest.mark.skipif(
    not _torch_sdpa_runs_on_fake_cuda(),
    reason="this torch build's SDPA needs a CUDA driver even for fake CUDA tensors")


@needs_torch_sdpa_on_fake_cuda
def test_unsupported_gpu_falls_back(monkeypatch, caplog):
    def resolve(index, path=None, entry=None):
        raise dispatch.UnsupportedDeviceError("cuda:0 (Tesla T4) has compute capability 7.5")

    monkeypatch.setattr(dispatch, "resolve", resolve)
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 2, 64, 64, dtype=torch.float16, device="cuda")
                   for _ in range(3))
        with caplog.at_level(logging.WARNING, logger="sageattn.sdpa"):
            out = sageattn.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 64, 64)
    assert sdpa.sdpa_stats()["reasons"] == {"unsupported gpu": 1}
    assert "compute capability 7.5" in caplog.text


def test_each_reason_logged_once(emulated, caplog):
    q, k, v = qkv()
    mask = torch.ones(96, 96, dtype=torch.bool)
    with caplog.at_level(logging.WARNING, logger="sageattn.sdpa"):
        for _ in range(3):
            sageattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        sageattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        sageattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    records = [r for r in caplog.records if r.name == "sageattn.sdpa"]
    assert len(records) == 2
    assert "attn_mask" in records[0].getMessage() and "dropout_p=0.5" in records[1].getMessage()
    assert sdpa.sdpa_stats()["reasons"] == {"attn_mask": 3, "dropout": 2}
    sdpa.reset_sdpa_stats()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sageattn.sdpa"):
        sageattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert len([r for r in caplog.records if r.name == "sageattn.sdpa"]) == 1


# ---- the quantized branch --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "causal", "gqa", "mqa", "scale", "cross", "d40",
                                  "fp16", "views"])
def test_quantized_calls_match_emulator_and_torch(emulated, kind):
    kwargs, sm_scale = {}, None
    if kind == "gqa":
        q, k, v = qkv(H=8, Hkv=2)
        kwargs = dict(enable_gqa=True)
    elif kind == "mqa":
        q, k, v = qkv(H=4, Hkv=1)
        kwargs = dict(enable_gqa=True)
    elif kind == "causal":
        q, k, v = qkv(Sq=130)
        kwargs = dict(is_causal=True)
    elif kind == "scale":
        q, k, v = qkv()
        kwargs, sm_scale = dict(scale=0.05), 0.05
    elif kind == "cross":
        q, k, v = qkv(Sq=100, Sk=77)
    elif kind == "d40":
        q, k, v = qkv(D=40)
    elif kind == "fp16":
        q, k, v = qkv(dtype=torch.float16)
    else:
        q, k, v = qkv(B=2)
        if kind == "views":   # (B, S, H, D) storage seen as (B, H, S, D), as models do
            q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    saved = [x.clone() for x in (q, k, v)]
    out = sageattn.scaled_dot_product_attention(q, k, v, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v))), "inputs modified"
    assert len(emulated) == 1
    D = q.shape[-1]
    assert emulated[0]["sm_scale"] == (sm_scale if sm_scale is not None else 1 / math.sqrt(D))
    expect = emulate.sm80_attention(q, k, v, is_causal=kwargs.get("is_causal", False),
                                    sm_scale=emulated[0]["sm_scale"])
    assert torch.equal(out, expect)
    torch_out = TORCH_SDPA(q, k, v, **kwargs)
    assert out.shape == torch_out.shape and out.dtype == torch_out.dtype
    assert rel_l1(out, torch_out) < BOUND
    assert stats_without_paths() == {"calls": 1, "quantized": 1, "fallback": 0, "reasons": {}}
    assert sdpa.sdpa_stats()["paths"] == {"sm80": 1}


@pytest.mark.parametrize("Sq,Sk", [(1, 200), (40, 100), (64, 65), (100, 40), (129, 64),
                                   (65, 1)])
def test_causal_is_top_left_like_torch(emulated, Sq, Sk):
    q, k, v = qkv(Sq=Sq, Sk=Sk, H=4, Hkv=2)
    out = sageattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = reference.attention(q, k, v, is_causal=True, causal_offset=0)
    torch_out = TORCH_SDPA(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_l1(out, ref) < BOUND and rel_l1(out, torch_out) < BOUND
    # The test can tell the alignments apart: bottom-right differs from torch's result.
    bottom_right = reference.attention(q, k, v, is_causal=True)
    assert rel_l1(bottom_right, ref) > 0.05
    assert sdpa.sdpa_stats()["quantized"] == 1
    expect_calls = 1 if Sq <= Sk else 2
    assert len(emulated) == expect_calls
    assert all(c["shape_q"][2] == c["shape_k"][2] for c in emulated if c["causal"])


def test_requires_grad_without_grad_mode_is_quantized(emulated):
    q, k, v = (rand(1, 2, 64, 64, seed=i, requires_grad=True) for i in range(3))
    with torch.no_grad():
        sageattn.scaled_dot_product_attention(q, k, v)
    with torch.inference_mode():
        sageattn.scaled_dot_product_attention(q, k, v)
    assert sdpa.sdpa_stats()["quantized"] == 2


def test_requires_grad_falls_back_and_gradients_flow(emulated):
    leaves = [rand(1, 2, 64, 64, seed=i, requires_grad=True) for i in range(3)]
    ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = sageattn.scaled_dot_product_attention(*leaves, is_causal=True)
    out.float().square().sum().backward()
    ref = TORCH_SDPA(*ref_leaves, is_causal=True)
    ref.float().square().sum().backward()
    assert torch.equal(out, ref)
    for x, r in zip(leaves, ref_leaves):
        assert x.grad is not None and torch.equal(x.grad, r.grad)
    assert sdpa.sdpa_stats()["reasons"] == {"requires_grad": 1}


def test_strict_api_refuses_inputs_that_require_grad():
    with FakeTensorMode():
        q = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        k, v = (torch.empty(1, 2, 64, 64, dtype=torch.bfloat16, device="cuda")
                for _ in range(2))
        with pytest.raises(ValueError, match="q requires grad"):
            sageattn.sageattn(q, k, v)
        sageattn.sageattn(q.detach(), k, v)
        with torch.no_grad():
            sageattn.sageattn(q, k, v)


# ---- CUDA routing without a GPU: fake CUDA tensors ---------------------------------------

@needs_torch_sdpa_on_fake_cuda
def test_fake_cuda_tensors_take_the_quantized_op(resolve_sm80):
    with FakeTensorMode():
        q, k, v = (torch.empty(2, 4, 100, 64, dtype=torch.bfloat16, device="cuda")
                   for _ in range(3))
        out = sageattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert out.shape == (2, 4, 100, 64) and out.device.type == "cuda"
        q32 = torch.empty(2, 4, 100, 64, device="cuda")
        sageattn.scaled_dot_product_attention(q32, q32, q32)
    assert stats_without_paths() == {"calls": 2, "quantized": 1, "fallback": 1,
                                     "reasons": {"dtype": 1}}


class _Model(torch.nn.Module):
    def forward(self, q, k, v, kg, vg, mask):
        F_ = sageattn.scaled_dot_product_attention
        return (F_(q, k, v, is_causal=True),                          # quantized
                F_(q, kg, vg, enable_gqa=True, scale=0.3),            # quantized (GQA)
                F_(q, k.narrow(2, 0, 50), v.narrow(2, 0, 50), is_causal=True),  # 2 ops (Sq > Sk)
                F_(q, k, v, attn_mask=mask),                          # torch
                F_(q, kg, vg))                                        # torch (heads broadcast)


def _exported_targets(**patches):
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 4, 64, 64, dtype=torch.bfloat16, device="cuda")
                   for _ in range(3))
        kg, vg = (torch.empty(1, 1, 64, 64, dtype=torch.bfloat16, device="cuda")
                  for _ in range(2))
        mask = torch.ones(64, 64, dtype=torch.bool, device="cuda")
        ep = torch.export.export(_Model(), (q, k, v, kg, vg, mask), strict=True)
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"
            and "getitem" not in str(n.target)]


@needs_torch_sdpa_on_fake_cuda
def test_export_fullgraph_routes_each_call(resolve_sm80):
    targets = _exported_targets()
    assert targets.count("sageattn.attention.default") == 4
    assert targets.count("aten.scaled_dot_product_attention.default") == 2
    assert sdpa.sdpa_stats()["calls"] == 0       # traced calls are not counted


@needs_torch_sdpa_on_fake_cuda
def test_export_on_an_unsupported_gpu_keeps_torchs_op(monkeypatch):
    # Dispatch has no path for the device, so every call stays torch's (decided once, while
    # tracing; no device query in the graph).
    def resolve(index, path=None, entry=None):
        raise dispatch.UnsupportedDeviceError("compute capability 7.5")

    monkeypatch.setattr(dispatch, "resolve", resolve)
    targets = _exported_targets()
    assert "sageattn.attention.default" not in targets
    assert targets.count("aten.scaled_dot_product_attention.default") == 5


# ---- torch.compile on the CPU (emulated kernels) ---------------------------------------

def test_compile_fullgraph_equals_eager(emulated):
    torch._dynamo.reset()
    mask = torch.ones(1, 1, 96, 96, dtype=torch.bool).tril()

    def fn(q, k, v, kg, vg):
        f = sageattn.scaled_dot_product_attention
        return (f(q, k, v, is_causal=True), f(q, kg, vg, enable_gqa=True),
                f(q, k.narrow(2, 0, 40), v.narrow(2, 0, 40), is_causal=True),
                f(q, k, v, attn_mask=mask))

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        q, k, v = qkv(H=4, seed=10 * seed)
        _, kg, vg = qkv(H=4, Hkv=2, seed=10 * seed + 5)
        got = compiled(q, k, v, kg, vg)
        sdpa.reset_sdpa_stats()
        expect = fn(q, k, v, kg, vg)
        assert stats_without_paths()["quantized"] == 3
        for a, b in zip(got[:3], expect[:3]):
            assert torch.equal(a, b)
        torch.testing.assert_close(got[3], expect[3])
    torch._dynamo.reset()


# ---- a model, patched --------------------------------------------------------------------

def test_transformer_patched_matches_unpatched(emulated):
    model = sdpa_model.build("cpu", torch.bfloat16)
    x, context, key_padding = sdpa_model.inputs("cpu", torch.bfloat16)
    with torch.no_grad():
        ref = model(x, context, key_padding)
        ref_attn = model.attention_outputs()
        assert sdpa.sdpa_stats()["calls"] == 0
        with sageattn.patch_sdpa():
            out = model(x, context, key_padding)
        attn = model.attention_outputs()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    errors = [rel_l1(a, b) for a, b in zip(attn, ref_attn)] + [rel_l1(out, ref)]
    assert max(errors) < BOUND, errors
    stats = sdpa.sdpa_stats()
    assert stats_without_paths() == sdpa_model.expected_stats()
    assert stats["paths"] == {"sm80": stats["quantized"]}


def test_compile_dynamic_lengths_do_not_recompile(emulated):
    torch._dynamo.reset()

    def fn(q, k, v):
        f = sageattn.scaled_dot_product_attention
        return f(q, k, v, is_causal=True), f(q, k, v)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, k, v = qkv(Sq=100)
    for x in (q, k, v):
        torch._dynamo.mark_dynamic(x, 2)
    for a, b in zip(compiled(q, k, v), fn(q, k, v)):
        assert torch.equal(a, b)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for S in (37, 64, 129):
            q, k, v = qkv(Sq=S, seed=S)
            for a, b in zip(compiled(q, k, v), fn(q, k, v)):
                assert torch.equal(a, b)
    torch._dynamo.reset()


def test_transformer_compiled_fullgraph(emulated):
    torch._dynamo.reset()
    model = sdpa_model.build("cpu", torch.bfloat16)
    x, context, key_padding = sdpa_model.inputs("cpu", torch.bfloat16)
    with torch.no_grad(), sageattn.patch_sdpa():
        eager = model(x, context, key_padding)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(
            x, context, key_padding)
    assert rel_l1(compiled, eager) < 1e-3
    assert sdpa.sdpa_stats()["calls"] == len(sdpa_model.LAYERS)     # the eager pass only
    torch._dynamo.reset()


def test_quantized_calls_pass_the_strict_validation(resolve_sm80, monkeypatch):
    # The drop-in calls ops.attention directly (no second validation), so everything it
    # routes to the quantized path must be what sageattn.sageattn accepts.
    from sageattn import api

    checked = []

    def quantized(q, k, v, is_causal, sm_scale):
        checked.append(api._validate(q, k, v, "HND", is_causal, sm_scale, False))
        return torch.empty_like(q)

    monkeypatch.setattr(sdpa, "_quantized", quantized)
    with FakeTensorMode():
        def t(*shape, dtype=torch.bfloat16):
            return torch.empty(shape, dtype=dtype, device="cuda")

        q, kv, kg = t(2, 8, 100, 128), t(2, 8, 70, 128), t(2, 2, 70, 128)
        strided = t(2, 100, 8, 128).transpose(1, 2)
        f = sageattn.scaled_dot_product_attention
        f(q, kv, kv)
        f(q, kg, kg, enable_gqa=True, scale=0.3)
        f(q, kv, kv, is_causal=True)                  # Sq > Sk: two calls
        f(t(1, 1, 1, 1), t(1, 1, 5, 1), t(1, 1, 5, 1), is_causal=True)
        f(strided, strided, strided, is_causal=True)
        f(t(1, 4, 9, 40, dtype=torch.float16), t(1, 4, 9, 40, dtype=torch.float16),
          t(1, 4, 9, 40, dtype=torch.float16))
    assert len(checked) == 7 and sdpa.sdpa_stats()["quantized"] == 6


def test_device_path_is_marked_constant_like_torch_does():
    """sdpa marks _device_path constant by hand (so importing sageattn does not import
    torch._dynamo); this fails if torch's decorator ever does more than set that attribute."""
    import torch._dynamo  # noqa: F401  (the test may import it; sageattn must not)

    from sageattn import sdpa

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe) == {"_dynamo_marked_constant": True}
    assert sdpa._device_path._dynamo_marked_constant is True
