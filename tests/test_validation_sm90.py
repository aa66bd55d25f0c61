"""Argument validation of the sm90 entry point, ``sageattn_qk_int8_pv_fp8_cuda_sm90``, on the
CPU (fake CUDA tensors, as tests/test_validation.py). Skipped until the package has the entry
point; the messages are matched loosely (the argument's name and the offered values), not
word for word.
"""

import inspect

import pytest
import torch

import sageattn
from test_validation import cuda, fake, qkv, raises  # noqa: F401  (fake: a fixture)

if not hasattr(sageattn, "sageattn_qk_int8_pv_fp8_cuda_sm90"):
    pytest.skip("sageattn has no sageattn_qk_int8_pv_fp8_cuda_sm90 yet", allow_module_level=True)

attn_sm90 = sageattn.sageattn_qk_int8_pv_fp8_cuda_sm90
MODES = ("fp32+fp32", "fp32")


def test_public_name():
    assert "sageattn_qk_int8_pv_fp8_cuda_sm90" in sageattn.__all__


def test_signature_matches_sageattention():
    # The interface of the sm90 entry point (SageAttention's positional order).
    params = list(inspect.signature(attn_sm90).parameters.items())
    assert [n for n, _ in params[:3]] == ["q", "k", "v"]
    assert [(n, p.default) for n, p in params[3:]] == [
        ("tensor_layout", "HND"), ("is_causal", False), ("qk_quant_gran", "per_thread"),
        ("sm_scale", None), ("pv_accum_dtype", "fp32+fp32"), ("smooth_k", True),
        ("smooth_v", False), ("return_lse", False)]


def test_valid_calls(fake):
    q, k, v = qkv(H=8, Hkv=2, D=72, Sk=130)
    for gran in ("per_thread", "per_warp"):
        for acc in MODES:
            for smooth_v in (False, True):
                out, lse = attn_sm90(q, k, v, qk_quant_gran=gran, pv_accum_dtype=acc,
                                     smooth_v=smooth_v, is_causal=True, return_lse=True)
                assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
                assert lse.shape == (2, 8, 100) and lse.dtype == torch.float32
    nhd = qkv(layout="NHD", dtype=torch.bfloat16, D=128)
    out = attn_sm90(*nhd, tensor_layout="NHD", smooth_k=False)
    assert out.shape == nhd[0].shape and out.is_contiguous()


def test_sageattn_path_sm90_accepted(fake):
    assert sageattn.sageattn(*qkv(), path="sm90").shape == (2, 4, 100, 64)


@pytest.mark.parametrize("acc", ["fp32+fp16", "fp16+fp32", "fp16", "bf16", "FP32", None, 32])
def test_pv_accum_names_the_argument_and_the_modes(fake, acc):
    with pytest.raises(ValueError) as info:
        attn_sm90(*qkv(), pv_accum_dtype=acc)
    text = str(info.value)
    assert "pv_accum_dtype" in text and "'fp32+fp32'" in text, text


@pytest.mark.parametrize("gran", ["per_block", "", None])
def test_qk_quant_gran(fake, gran):
    raises(ValueError, "^qk_quant_gran must be one of 'per_thread', 'per_warp'", attn_sm90,
           *qkv(), qk_quant_gran=gran)


@pytest.mark.parametrize("flag", ["smooth_k", "smooth_v", "is_causal", "return_lse"])
def test_flags_must_be_bool(fake, flag):
    raises(TypeError, f"^{flag} must be a bool", attn_sm90, *qkv(), **{flag: 1})


def test_shared_validation(fake):
    q, k, v = qkv()
    raises(ValueError, "^head dim 256", attn_sm90, *qkv(D=256))
    raises(ValueError, "^q has 6 heads, which is not a multiple", attn_sm90, *qkv(H=6, Hkv=4))
    raises(TypeError, "^v has dtype torch.bfloat16 but q has torch.float16", attn_sm90, q, k,
           v.to(torch.bfloat16))
    raises(ValueError, "^tensor_layout must be 'HND'", attn_sm90, q, k, v, tensor_layout="BHSD")
    raises(TypeError, "^sm_scale must be", attn_sm90, q, k, v, sm_scale="0.1")
    q.requires_grad_(True)
    raises(ValueError, "^q requires grad", attn_sm90, q, k, v)


def test_cpu_tensors():
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    raises(ValueError, "^q is on cpu", attn_sm90, q, q, q)


def test_errors_are_raised_before_any_device_work(monkeypatch, fake):
    from sageattn import _loader, dispatch

    monkeypatch.setattr(_loader, "ext", lambda: pytest.fail("host layer touched"))
    monkeypatch.setattr(dispatch, "probe", lambda i: pytest.fail("device probed"))
    raises(ValueError, "pv_accum_dtype", attn_sm90, *qkv(), pv_accum_dtype="fp32+fp16")
    raises(ValueError, "head dim", attn_sm90, *qkv(D=200))
