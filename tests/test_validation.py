"""Argument validation of the public API: every error, and the shapes of valid calls.

Runs on the CPU: valid CUDA-side calls use fake CUDA tensors (FakeTensorMode), which also
exercises the custom op's fake implementation the way torch.compile does.
"""

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sageattn
from sageattn import sageattn as attn
from sageattn import sageattn_qk_int8_pv_fp16_cuda as attn_fp16


@pytest.fixture
def fake():
    with FakeTensorMode():
        yield


def cuda(*shape, dtype=torch.float16, strides=None):
    # Fake CUDA tensors support few view ops on a CPU-only torch: make odd strides directly.
    if strides is not None:
        return torch.empty_strided(shape, strides, dtype=dtype, device="cuda")
    return torch.empty(shape, dtype=dtype, device="cuda")


def qkv(B=2, H=4, S=100, D=64, Hkv=None, Sk=None, dtype=torch.float16, layout="HND"):
    Hkv, Sk = Hkv or H, Sk or S
    if layout == "HND":
        return cuda(B, H, S, D, dtype=dtype), cuda(B, Hkv, Sk, D, dtype=dtype), \
            cuda(B, Hkv, Sk, D, dtype=dtype)
    return cuda(B, S, H, D, dtype=dtype), cuda(B, Sk, Hkv, D, dtype=dtype), \
        cuda(B, Sk, Hkv, D, dtype=dtype)


def raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


# ---- valid calls -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_shape_dtype_layout(fake, layout, dtype):
    q, k, v = qkv(B=2, H=8, S=77, D=72, Hkv=2, Sk=300, dtype=dtype, layout=layout)
    out, lse = attn(q, k, v, tensor_layout=layout, is_causal=True, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert out.is_contiguous()
    assert lse.shape == (2, 8, 77) and lse.dtype == torch.float32


def test_low_level_entry_point_valid(fake):
    q, k, v = qkv(D=128)
    for gran in ("per_thread", "per_warp"):
        for acc in ("fp32", "fp16+fp32"):
            out = attn_fp16(q, k, v, qk_quant_gran=gran, pv_accum_dtype=acc, smooth_k=False)
            assert out.shape == q.shape


def test_strided_views_accepted(fake):
    # Slices of a fused qkv projection (B, S, 3, H, D) and a transposed view.
    fused = cuda(2, 50, 3, 4, 64)
    q, k, v = fused.unbind(2)
    out = attn(q, k, v, tensor_layout="NHD")
    assert out.shape == (2, 50, 4, 64) and out.is_contiguous()
    t = cuda(2, 4, 64, 50).transpose(-1, -2)   # last-dim stride 50: rejected below
    with pytest.raises(ValueError, match="q must have a contiguous last"):
        attn(t, t, t)


def test_expanded_kv_accepted(fake):
    q = cuda(1, 8, 33, 64)
    k = cuda(1, 1, 40, 64).expand(1, 8, 40, 64)   # stride-0 head dim
    assert attn(q, k, k).shape == q.shape


def test_head_dim_one_any_last_stride(fake):
    q = cuda(1, 2, 10, 1, strides=(60, 30, 3, 3))
    assert attn(q, q, q).shape == (1, 2, 10, 1)


def test_grad_disabled_allows_requires_grad(fake):
    q, k, v = qkv()
    q.requires_grad_(True)
    with torch.no_grad():
        assert attn(q, k, v).shape == q.shape


def test_inputs_not_modified_cpu_side(fake):
    q, k, v = qkv()
    before = [(x.shape, x.stride(), x.dtype) for x in (q, k, v)]
    attn(q, k, v)
    assert before == [(x.shape, x.stride(), x.dtype) for x in (q, k, v)]


# ---- errors ------------------------------------------------------------------------------

def test_not_a_tensor(fake):
    q, k, v = qkv()
    raises(TypeError, "^k must be a torch.Tensor", attn, q, [1, 2], v)


def test_cpu_tensors():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    raises(ValueError, r"^q is on cpu.*scaled_dot_product_attention.*emulate", attn, q, q, q)


def test_cpu_k_with_cuda_q(fake):
    q, _, v = qkv()
    k = torch.empty(2, 4, 100, 64, dtype=torch.float16, device="cpu")
    raises(ValueError, "^k is on cpu", attn, q, k, v)


def test_mixed_cuda_devices(fake):
    q, k, _ = qkv()
    v = torch.empty(2, 4, 100, 64, dtype=torch.float16, device="cuda:1")
    raises(ValueError, "^v is on cuda:1 but q is on cuda:0", attn, q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_fp32_rejected(fake, name):
    t = dict(zip("qkv", qkv()))
    t[name] = cuda(2, 4, 100, 64, dtype=torch.float32)
    raises(TypeError, f"^{name} has dtype torch.float32.*float16 or torch.bfloat16", attn,
           t["q"], t["k"], t["v"])


def test_mixed_dtypes(fake):
    q, k, v = qkv()
    raises(TypeError, "^v has dtype torch.bfloat16 but q has torch.float16", attn, q, k,
           v.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_rank(fake, name):
    t = dict(zip("qkv", qkv()))
    t[name] = cuda(4, 100, 64)
    raises(ValueError, f"^{name} must have 4 dimensions", attn, t["q"], t["k"], t["v"])


@pytest.mark.parametrize("layout", ["hnd", "BHSD", None, 3])
def test_layout_string(fake, layout):
    raises(ValueError, "^tensor_layout must be 'HND'", attn, *qkv(), tensor_layout=layout)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_last_dim_stride(fake, name):
    t = dict(zip("qkv", qkv()))
    t[name] = cuda(2, 4, 100, 64, strides=(51200, 12800, 128, 2))
    raises(ValueError, f"^{name} must have a contiguous last", attn, t["q"], t["k"], t["v"])


def test_head_dims_differ(fake):
    q, k, v = qkv()
    raises(ValueError, "^k has head dim 32 but q has 64", attn, q, cuda(2, 4, 100, 32), v)
    raises(ValueError, "^v has head dim 128 but q has 64", attn, q, k, cuda(2, 4, 100, 128))


@pytest.mark.parametrize("D", [129, 160, 256, 512])
def test_head_dim_too_large(fake, D):
    raises(ValueError, f"^head dim {D} .*not supported yet", attn, *qkv(D=D))


def test_batch_mismatch(fake):
    q, k, v = qkv()
    raises(ValueError, "^k has batch 3 but q has 2", attn, q, cuda(3, 4, 100, 64), v)


def test_kv_heads_mismatch(fake):
    q, k, _ = qkv(H=8, Hkv=4)
    raises(ValueError, "^v has 2 heads but k has 4", attn, q, k, cuda(2, 2, 100, 64))


def test_kv_heads_mismatch_nhd(fake):
    q, k, _ = qkv(H=8, Hkv=4, layout="NHD")
    raises(ValueError, "^v has 2 heads but k has 4", attn, q, k, cuda(2, 100, 2, 64),
           tensor_layout="NHD")


@pytest.mark.parametrize("Hq,Hkv", [(8, 3), (4, 8), (6, 4)])
def test_gqa_ratio(fake, Hq, Hkv):
    raises(ValueError, f"^q has {Hq} heads, which is not a multiple of k's {Hkv}", attn,
           *qkv(H=Hq, Hkv=Hkv))


def test_kv_length_mismatch(fake):
    q, k, _ = qkv()
    raises(ValueError, "^v has sequence length 99 but k has 100", attn, q, k, cuda(2, 4, 99, 64))


@pytest.mark.parametrize("which", ["q", "k"])
def test_empty_sequence(fake, which):
    q, k, v = qkv()
    if which == "q":
        q = cuda(2, 4, 0, 64)
    else:
        k, v = cuda(2, 4, 0, 64), cuda(2, 4, 0, 64)
    raises(ValueError, f"^{which} has sequence length 0", attn, q, k, v)


def test_empty_batch(fake):
    raises(ValueError, "batch and head counts must be >= 1", attn, *qkv(B=0))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_requires_grad(fake, name):
    t = dict(zip("qkv", qkv()))
    t[name].requires_grad_(True)
    raises(ValueError, f"^{name} requires grad.*inference-only", attn, t["q"], t["k"], t["v"])
    raises(ValueError, f"^{name} requires grad", attn_fp16, t["q"], t["k"], t["v"])


@pytest.mark.parametrize("flag", ["is_causal", "return_lse"])
def test_flags_must_be_bool(fake, flag):
    raises(TypeError, f"^{flag} must be a bool", attn, *qkv(), **{flag: 1})


@pytest.mark.parametrize("scale,exc", [("0.1", TypeError), (True, TypeError),
                                       (math.inf, ValueError), (math.nan, ValueError)])
def test_sm_scale(fake, scale, exc):
    raises(exc, "^sm_scale must be", attn, *qkv(), sm_scale=scale)


def test_path_name(fake):
    raises(ValueError, "^path must be None, 'auto' or one of", attn, *qkv(), path="sm70")
    raises(ValueError, "^path must be", attn, *qkv(), path=["sm80"])


@pytest.mark.parametrize("gran", ["per_block", "per_tensor", "", None])
def test_qk_quant_gran(fake, gran):
    raises(ValueError, "^qk_quant_gran must be one of 'per_thread', 'per_warp'", attn_fp16,
           *qkv(), qk_quant_gran=gran)


def test_pv_accum_fp16_explained(fake):
    raises(ValueError, "^pv_accum_dtype='fp16' is not offered: .*overflows", attn_fp16, *qkv(),
           pv_accum_dtype="fp16")


@pytest.mark.parametrize("acc", ["fp32+fp32", "fp32+fp16", "bf16", None])
def test_pv_accum_other(fake, acc):
    raises(ValueError, "^pv_accum_dtype must be one of 'fp32', 'fp16\\+fp32'", attn_fp16, *qkv(),
           pv_accum_dtype=acc)


def test_smooth_flags(fake):
    raises(TypeError, "^smooth_k must be a bool", attn_fp16, *qkv(), smooth_k="yes")
    raises(ValueError, "^smooth_v=True is not offered", attn_fp16, *qkv(), smooth_v=True)


def test_unknown_keyword_not_ignored(fake):
    with pytest.raises(TypeError):
        attn(*qkv(), dropout_p=0.1)


def test_errors_are_raised_before_any_device_work(monkeypatch, fake):
    # Validation must not need the host layer or a probe: make both explode.
    from sageattn import _loader, dispatch

    monkeypatch.setattr(_loader, "ext", lambda: pytest.fail("host layer touched"))
    monkeypatch.setattr(dispatch, "probe", lambda i: pytest.fail("device probed"))
    raises(ValueError, "head dim", attn, *qkv(D=200))


def test_public_names():
    for name in ("sageattn", "sageattn_qk_int8_pv_fp16_cuda", "sageattn_qk_int8_pv_fp8_cuda",
                 "explain", "build_info", "preload", "UnsupportedDeviceError",
                 "PathUnavailableError", "PackageError"):
        assert hasattr(sageattn, name), name
    assert isinstance(sageattn.__version__, str)


# ---- the FP8-PV entry point (sm89 path) ---------------------------------------------------

from sageattn import sageattn_qk_int8_pv_fp8_cuda as attn_fp8  # noqa: E402


def test_fp8_entry_point_valid(fake):
    q, k, v = qkv(H=8, Hkv=2, D=72, Sk=130)
    for gran in ("per_thread", "per_warp"):
        for acc in ("fp32+fp16", "fp32+fp32", "fp32"):
            for smooth_v in (False, True):
                out, lse = attn_fp8(q, k, v, qk_quant_gran=gran, pv_accum_dtype=acc,
                                    smooth_v=smooth_v, is_causal=True, return_lse=True)
                assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
                assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32
    nhd = qkv(layout="NHD", dtype=torch.bfloat16)
    assert attn_fp8(*nhd, tensor_layout="NHD").shape == nhd[0].shape


def test_fp8_signature_matches_sageattention():
    # Positional order of SageAttention's sageattn_qk_int8_pv_fp8_cuda.
    import inspect

    params = list(inspect.signature(attn_fp8).parameters.items())
    assert [(n, p.default) for n, p in params[3:]] == [
        ("tensor_layout", "HND"), ("is_causal", False), ("qk_quant_gran", "per_thread"),
        ("sm_scale", None), ("pv_accum_dtype", "fp32+fp16"), ("smooth_k", True),
        ("smooth_v", False), ("return_lse", False)]


@pytest.mark.parametrize("acc", ["fp32+fp8", "fp16 ", "FP32", "bf16", None, 32])
def test_fp8_pv_accum_names_the_argument(fake, acc):
    raises(ValueError, "^pv_accum_dtype must be one of 'fp32\\+fp16', 'fp32\\+fp32', 'fp32'; "
           "got", attn_fp8, *qkv(), pv_accum_dtype=acc)


def test_fp8_pv_accum_fp16_refused(fake):
    raises(ValueError, "^pv_accum_dtype='fp16' is not offered: .*overflows.*'fp32\\+fp16'",
           attn_fp8, *qkv(), pv_accum_dtype="fp16")


def test_fp8_pv_accum_of_the_fp16_path_explained(fake):
    raises(ValueError, "^pv_accum_dtype='fp16\\+fp32' is a mode of the FP16-PV path "
           "\\(sageattn_qk_int8_pv_fp16_cuda\\)", attn_fp8, *qkv(), pv_accum_dtype="fp16+fp32")


@pytest.mark.parametrize("gran", ["per_block", "", None])
def test_fp8_qk_quant_gran(fake, gran):
    raises(ValueError, "^qk_quant_gran must be one of 'per_thread', 'per_warp'", attn_fp8,
           *qkv(), qk_quant_gran=gran)


@pytest.mark.parametrize("flag", ["smooth_k", "smooth_v", "is_causal", "return_lse"])
def test_fp8_flags_must_be_bool(fake, flag):
    raises(TypeError, f"^{flag} must be a bool", attn_fp8, *qkv(), **{flag: 1})


def test_fp8_shared_validation(fake):
    q, k, v = qkv()
    raises(ValueError, "^head dim 256", attn_fp8, *qkv(D=256))
    raises(ValueError, "^q has 6 heads, which is not a multiple", attn_fp8, *qkv(H=6, Hkv=4))
    raises(TypeError, "^v has dtype torch.bfloat16 but q has torch.float16", attn_fp8, q, k,
           v.to(torch.bfloat16))
    q.requires_grad_(True)
    raises(ValueError, "^q requires grad", attn_fp8, q, k, v)


def test_fp8_cpu_tensors():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    raises(ValueError, r"^q is on cpu.*sm89_attention", attn_fp8, q, q, q)


def test_sageattn_path_sm89_accepted(fake):
    assert attn(*qkv(), path="sm89").shape == (2, 4, 100, 64)


# ---- sageattn3_blackwell (the sm120 FP4 path) ---------------------------------------------------

@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_fp4_entry_point_shapes_through_its_op(fake, layout):
    q, k, v = qkv(Hkv=2, Sk=70, layout=layout, dtype=torch.bfloat16)
    out, lse = sageattn.sageattn3_blackwell(q, k, v, tensor_layout=layout, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 100)


def test_fp4_entry_point_validates_like_sageattn(fake):
    q, k, v = qkv()
    raises(TypeError, "per_block_mean must be a bool", sageattn.sageattn3_blackwell, q, k, v,
           per_block_mean=1)
    raises(TypeError, "smooth_k must be a bool", sageattn.sageattn3_blackwell, q, k, v,
           smooth_k=None)
    raises(ValueError, "tensor_layout must be", sageattn.sageattn3_blackwell, q, k, v,
           tensor_layout="BHSD")
    raises(ValueError, "head dim 200", sageattn.sageattn3_blackwell, *qkv(D=200))


def test_fp4_entry_point_rejects_cpu_tensors():
    q = torch.zeros(1, 1, 8, 64, dtype=torch.float16)
    raises(ValueError, "CUDA devices only", sageattn.sageattn3_blackwell, q, q, q)


def test_fp4_runner_refuses_what_it_does_not_offer():
    from sageattn.ops_fp4 import sm120_forward

    q = torch.zeros(1, 1, 8, 64, dtype=torch.float16)
    kw = dict(tensor_layout="HND", is_causal=False, sm_scale=0.1, return_lse=False)
    raises(ValueError, "qk_quant_gran='per_warp' is not an option of the sm120_fp4 path",
           sm120_forward, q, q, q, qk_quant_gran="per_warp", **kw)
    raises(ValueError, "not offered on the sm120_fp4 path", sm120_forward, q, q, q,
           block_mask=q, **kw)
