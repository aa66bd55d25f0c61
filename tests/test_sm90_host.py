"""The sm90 launch sequence's host pieces on the CPU: the scratch allocation, the tensor maps
(what reaches the driver's encoder, and the cache in front of it) and when the kernel is asked
to quantize Q itself. The GPU side of each is in tests/gpu/test_sm90.py."""

import ctypes

import pytest
import torch

from sageattn import _abi, ops


class RecordingEncoder:
    """Stands in for the extension's encode_tensor_map: records each call, returns 128 bytes."""

    def __init__(self):
        self.calls = []

    def encode_tensor_map(self, dtype, address, dims, strides, box, swizzle):
        self.calls.append(dict(dtype=dtype, address=address, dims=dims, strides=strides, box=box,
                               swizzle=swizzle))
        return bytes([len(self.calls) % 256]) * 128


@pytest.fixture
def encoder(monkeypatch):
    enc = RecordingEncoder()
    monkeypatch.setattr(ops._loader, "ext", lambda: enc)
    monkeypatch.setattr(ops, "_TMAP_CACHE", {})
    return enc


def test_scratch_layout():
    specs = {"q_int8": ((2, 3, 128, 64), torch.int8), "q_scale": ((2, 3, 1, 64), torch.float32),
             "k_mean": None, "v_fp16": ((1, 3, 64, 100), torch.float16)}
    s = ops._Scratch(torch.device("cpu"), specs)
    spans = []
    for name, (shape, dtype) in ((n, v) for n, v in specs.items() if v is not None):
        view = s.view(name)
        assert view.shape == shape and view.dtype == dtype
        assert s[name] == view.data_ptr() and (s[name] - s.buffer.data_ptr()) % 256 == 0
        spans.append((s[name], s[name] + view.numel() * view.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "buffers overlap"
    assert spans[-1][1] <= s.buffer.data_ptr() + s.buffer.numel()
    assert s["k_mean"] == 0 and s.view("k_mean") is None and s["lse_correction"] == 0


def test_scratch_poison(monkeypatch):
    monkeypatch.setattr(ops, "POISON", True)
    s = ops._Scratch(torch.device("cpu"), {"a": ((5,), torch.int8), "b": ((3,), torch.float32)})
    assert bool((s.view("a") == -128).all()) and bool(s.view("b").isnan().all())


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("D", [64, 128])
def test_q_source_map(encoder, layout, D):
    B, H, S = 2, 3, 300
    q = torch.empty((B, H, S, D) if layout == "HND" else (B, S, H, D), dtype=torch.bfloat16)
    qh = ops._hnd(q, layout)
    ops._q_source_map(qh, ops._strides(qh), 192)
    call = encoder.calls[-1]
    assert call["dtype"] == ops._TMAP_UINT16 and call["swizzle"] == 0
    assert call["dims"] == [D, S, H, B] and call["box"] == [D, 192, 1, 1]
    want = [2 * qh.stride(2), 2 * qh.stride(1), 2 * qh.stride(0)]
    assert call["strides"] == want and all(s % 16 == 0 for s in want)


def test_q_source_map_size_one_dims(encoder):
    # B = H = 1 and a single query row: _strides passes 0 for size-1 dims; the map gets the
    # contiguous strides instead (a multiple of 16 bytes, as the copy engine requires).
    q = torch.empty(1, 1, 1, 128, dtype=torch.float16)
    ops._q_source_map(q, ops._strides(q), 128)
    assert encoder.calls[-1]["strides"] == [256, 256, 256]


def test_tensor_map_cache(encoder):
    a = ops._tensor_map(4096, (64, 256, 8), (64, 128, 1), 2)
    b = ops._tensor_map(4096, (64, 256, 8), (64, 128, 1), 2)
    assert len(encoder.calls) == 1 and bytes(a) == bytes(b)
    assert encoder.calls[0]["strides"] == [64, 64 * 256]  # contiguous 1-byte elements
    ops._tensor_map(8192, (64, 256, 8), (64, 128, 1), 2)   # another address: encoded again
    ops._tensor_map(4096, (64, 256, 8), (64, 192, 1), 2)   # another box: encoded again
    assert len(encoder.calls) == 3
    assert isinstance(a, _abi.TensorMap) and ctypes.sizeof(a) == 128
