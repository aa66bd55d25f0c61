"""ops.py against the kernel contract, on the CPU.

A stand-in for ``sageattn._ext`` runs each launched kernel as the emulator's matching step,
reading and writing raw memory through the pointers, strides and sizes that ops.py packs
into the parameter structs, and checks every launch against docs/ARCHITECTURE.md (kernel
names from tools/kernel_table.py, grids, block sizes, shared memory, buffer bounds). The
result must equal the emulator's bit for bit, so a wrong pointer, stride, layout, offset or
flag in ops.py fails here before any GPU time is spent.
"""

import ctypes
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sageattn import _abi, _loader, dispatch, emulate, ops

ROOT = Path(__file__).resolve().parents[1]


def _kernel_table():
    name = "_sageattn_tools_kernel_table"
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "kernel_table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod      # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


class Memory:
    """Registered allocations, so a fake kernel can refuse out-of-bounds views."""

    def __init__(self):
        self.ranges = []
        self.strict = True

    def add(self, t):
        start = t.untyped_storage().data_ptr()
        self.ranges.append((start, start + t.untyped_storage().nbytes()))

    def view(self, ptr, dtype, shape, strides=None):
        assert ptr, "null pointer where the kernel needs a buffer"
        if strides is None:
            strides = [1] * len(shape)
            for i in range(len(shape) - 2, -1, -1):
                strides[i] = strides[i + 1] * shape[i + 1]
        item = torch.empty((), dtype=dtype).element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
        nbytes = extent * item
        assert ptr % item == 0
        assert not self.strict or any(lo <= ptr and ptr + nbytes <= hi for lo, hi in self.ranges), \
            f"view {ptr:#x}+{nbytes} is outside every allocation"
        buf = (ctypes.c_char * nbytes).from_address(ptr)
        flat = torch.frombuffer(buf, dtype=dtype)
        return flat.as_strided(tuple(shape), tuple(strides))


_DT = {_abi.DTYPE_FP16: torch.float16, _abi.DTYPE_BF16: torch.bfloat16}
_GRAN = {_abi.GRAN_PER_THREAD: "per_thread", _abi.GRAN_PER_WARP: "per_warp"}


def _check_vec(flag, ptr, strides, head_dim):
    if flag:   # the kernel would issue misaligned 16-byte loads otherwise
        assert ptr % 16 == 0 and all(s % 8 == 0 for s in strides) and head_dim % 8 == 0


class FakeExt:
    """Implements the host-layer calls ops.py and _loader.py use."""

    def __init__(self, manifest, mem):
        self.kernels = manifest["trees"]["sm80"]["kernels"]
        self.mem = mem
        self.functions, self.smem_limits, self.launches = {}, {}, []

    def load_module(self, ordinal, image):
        assert image == b"fatbin"
        return 1000 + ordinal

    def read_global_u32(self, module, name):
        assert name == "sageattn_abi_version"
        return _abi.ABI_VERSION

    def get_function(self, module, name):
        handle = 2000 + len(self.functions)
        self.functions[handle] = name
        return handle

    def set_max_dynamic_smem(self, function, nbytes):
        self.smem_limits[self.functions[function]] = nbytes

    def launch(self, ordinal, function, grid, block, smem, stream, params):
        name = self.functions[function]
        meta = self.kernels[name]
        assert block == (meta["threads"], 1, 1) and smem == meta["smem"]
        if smem > 48 * 1024:
            assert self.smem_limits.get(name) == smem
        assert stream == 0
        self.launches.append(name)
        getattr(self, meta["kind"])(name, grid, params)

    def channel_stats(self, name, grid, raw):
        p = _abi.ChannelStatsParams.from_buffer_copy(raw)
        assert grid == (p.head_dim_padded // 64, p.heads, p.batch)
        assert p.minimum == 0 and p.maximum == 0
        strides = (p.src_stride_b, p.src_stride_h, p.src_stride_s)
        _check_vec(p.vectorized, p.src, strides, p.head_dim)
        k = self.mem.view(p.src, _DT[p.in_dtype], (p.batch, p.heads, p.seq, p.head_dim),
                          strides + (1,))
        out = self.mem.view(p.mean, torch.float32, (p.batch, p.heads, p.head_dim_padded))
        out.copy_(emulate.k_channel_mean(k, p.head_dim_padded))

    def quantize(self, name, grid, raw):
        p = _abi.QuantParams.from_buffer_copy(raw)
        B, Hq, Hkv, D, Dp = p.batch, p.heads_q, p.heads_kv, p.head_dim, p.head_dim_padded
        assert name.endswith(f"_hd{Dp}") and Dp == emulate.padded_head_dim(D)
        assert p.q_blocks == -(-p.seq_q // 128) and p.k_blocks == -(-p.seq_k // 64)
        assert grid == (B * Hq * p.q_blocks + 2 * B * Hkv * p.k_blocks, 1, 1)
        assert p.v_fp8 == p.v_scale == p.v_mean == p.v_min == p.v_max == 0
        s2 = torch.tensor(p.sm_scale_log2e, dtype=torch.float32)
        assert p.sm_scale_log2e == ctypes.c_float(p.sm_scale * math.log2(math.e)).value
        dt, m = _DT[p.in_dtype], self.mem
        views = {}
        for x, seq, heads in (("q", p.seq_q, Hq), ("k", p.seq_k, Hkv), ("v", p.seq_k, Hkv)):
            strides = tuple(getattr(p, f"{x}_stride_{d}") for d in "bhs")
            ptr = getattr(p, x)
            _check_vec(getattr(p, f"vec_{x}"), ptr, strides, D)
            views[x] = m.view(ptr, dt, (B, heads, seq, D), strides + (1,))
        mean = m.view(p.k_mean, torch.float32, (B, Hkv, Dp)) if p.k_mean else None
        gran = _GRAN[p.granularity]
        q_i8, q_scale = emulate.quantize_q(views["q"], s2, gran, Dp)
        k_i8, k_scale = emulate.quantize_k(views["k"], mean, gran, Dp)
        m.view(p.q_int8, torch.int8, q_i8.shape).copy_(q_i8)
        m.view(p.q_scale, torch.float32, q_scale.shape).copy_(q_scale)
        m.view(p.k_int8, torch.int8, k_i8.shape).copy_(k_i8)
        m.view(p.k_scale, torch.float32, k_scale.shape).copy_(k_scale)
        v16 = emulate.convert_v(views["v"], Dp)
        m.view(p.v_fp16, torch.float16, v16.shape).copy_(v16)
        if p.lse_correction:
            assert mean is not None
            corr = emulate.lse_correction(views["q"], mean, p.sm_scale)
            m.view(p.lse_correction, torch.float32, corr.shape).copy_(corr)

    def attention(self, name, grid, raw):
        p = _abi.AttnParams.from_buffer_copy(raw)
        meta = self.kernels[name]
        B, Hq, Hkv, m = p.batch, p.heads_q, p.heads_kv, self.mem
        Dp = meta["head_dim"]
        q_rows = meta.get("q_rows") or 128
        assert 128 % q_rows == 0 and grid == (p.q_blocks * 128 // q_rows, Hq, B)
        assert p.v_scale == 0 and p.v_mean == 0
        assert p.causal in (0, 1) and (p.causal or p.causal_offset == 0)
        qt = emulate.Quantized(
            q_int8=m.view(p.q_int8, torch.int8, (B, Hq, p.q_blocks * 128, Dp)),
            q_scale=m.view(p.q_scale, torch.float32, (B, Hq, p.q_blocks, 64)),
            k_int8=m.view(p.k_int8, torch.int8, (B, Hkv, p.k_blocks * 64, Dp)),
            k_scale=m.view(p.k_scale, torch.float32, (B, Hkv, p.k_blocks, 4)),
            v_fp16=m.view(p.v, torch.float16, (B, Hkv, p.k_blocks * 64, Dp)),
            k_mean=None,
            lse_correction=(m.view(p.lse_correction, torch.float32, (B, Hq, p.seq_q))
                            if p.lse_correction else None))
        out, lse = emulate.attention(
            qt, seq_q=p.seq_q, seq_k=p.seq_k, head_dim=p.head_dim_out, causal=bool(p.causal),
            causal_offset=p.causal_offset, pv_accum=meta["pv_accum"],
            out_dtype=_DT[p.out_dtype], return_lse=bool(p.lse))
        m.view(p.out, _DT[p.out_dtype], out.shape,
               (p.out_stride_b, p.out_stride_h, p.out_stride_s, 1)).copy_(out)
        if p.lse:
            m.view(p.lse, torch.float32, lse.shape).copy_(lse)


@pytest.fixture
def fake_ext(tmp_path, monkeypatch):
    table = _kernel_table()
    tree = next(t for t in table.TREES if t.name == "sm80")
    manifest = {"abi_version": _abi.ABI_VERSION, "toolkit": "fake", "git_revision": "test",
                "trees": {"sm80": {"fatbin": "sm80.fatbin", "sass": list(tree.sass),
                                   "ptx": list(tree.ptx),
                                   "kernels": {k.name: {"kind": k.kind, "head_dim": k.head_dim,
                                                        "pv_accum": k.pv_accum,
                                                        "threads": k.threads, "smem": k.smem,
                                                        "q_rows": getattr(k, "q_rows", 0)}
                                               for k in tree.kernels}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "sm80.fatbin").write_bytes(b"fatbin")
    monkeypatch.setattr(_loader, "KERNELS_DIR", tmp_path)
    monkeypatch.setattr(_loader, "_modules", {})
    monkeypatch.setattr(_loader, "_kernels", {})
    dispatch.clear_caches()
    mem = Memory()
    ext = FakeExt(manifest, mem)
    monkeypatch.setattr(_loader, "ext", lambda: ext)
    monkeypatch.setattr(ops, "_current_stream", lambda device: 0)
    monkeypatch.setattr(ops, "POISON", True)     # every buffer must be written by a kernel
    real_empty = ops._empty

    def tracked_empty(shape, dtype, device):
        t = real_empty(shape, dtype, device)
        mem.add(t)
        return t

    monkeypatch.setattr(ops, "_empty", tracked_empty)
    yield ext
    dispatch.clear_caches()


def run_ops(ext, q, k, v, layout="HND", causal=False, lse=False, gran="per_thread",
            acc="fp32", smooth_k=True, sm_scale=None):
    for x in (q, k, v):
        ext.mem.add(x)
    D = q.shape[-1]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    saved = [x.clone() for x in (q, k, v)]
    out, out_lse = ops.sm80_forward(q, k, v, tensor_layout=layout, is_causal=causal,
                                    sm_scale=scale, return_lse=lse, qk_quant_gran=gran,
                                    pv_accum_dtype=acc, smooth_k=smooth_k)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v))), "inputs modified"
    expect = emulate.sm80_attention(q, k, v, tensor_layout=layout, is_causal=causal,
                                    sm_scale=scale, qk_quant_gran=gran, pv_accum_dtype=acc,
                                    smooth_k=smooth_k, return_lse=lse)
    exp_out, exp_lse = expect if lse else (expect, None)
    assert out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out, exp_out)
    if lse:
        assert out_lse.shape == exp_lse.shape and torch.equal(out_lse, exp_lse)
    else:
        assert out_lse is None
    return out, out_lse


def rand(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("acc", ["fp32", "fp16+fp32"])
def test_configs(fake_ext, dtype, gran, acc):
    q, k, v = (rand(2, 4, 130, 64, dtype=dtype, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, gran=gran, acc=acc, lse=True)
    hd = "hd64"
    tag = {"fp32": "acc32", "fp16+fp32": "acc16x32"}[acc]
    assert fake_ext.launches == ["sm80_channel_stats", f"sm80_quantize_qk_int8_v_fp16_{hd}",
                                 f"sm80_qkint8_pvfp16_{tag}_{hd}"]


@pytest.mark.parametrize("D", [1, 36, 64, 72, 128])
def test_head_dims(fake_ext, D):
    q, k, v = (rand(1, 2, 70, D, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, lse=True)


def test_nhd_layout(fake_ext):
    q, k, v = (rand(2, 100, 4, 64, seed=i) for i in range(3))
    out, _ = run_ops(fake_ext, q, k, v, layout="NHD", causal=True, lse=True)
    assert out.shape == (2, 100, 4, 64)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 200), (65, 129), (200, 63), (129, 127)])
def test_causal_offsets(fake_ext, Sq, Sk):
    q = rand(1, 2, Sq, 64, seed=1)
    k, v = rand(1, 2, Sk, 64, seed=2), rand(1, 2, Sk, 64, seed=3)
    run_ops(fake_ext, q, k, v, causal=True, lse=True)


def test_gqa_and_mqa(fake_ext):
    q = rand(1, 8, 90, 64, seed=1)
    for hkv in (2, 1):
        k, v = rand(1, hkv, 150, 64, seed=2), rand(1, hkv, 150, 64, seed=3)
        run_ops(fake_ext, q, k, v, causal=True, lse=True)


def test_fused_qkv_slices(fake_ext):
    # (B, S, 3, H, D) projection output: q, k, v are NHD views with a non-unit head stride.
    qkv = rand(2, 77, 3, 4, 64)
    q, k, v = qkv.unbind(2)
    run_ops(fake_ext, q, k, v, layout="NHD", lse=True)


def test_transposed_and_expanded_views(fake_ext):
    q = rand(2, 50, 4, 64).transpose(1, 2)          # HND view of NHD storage
    k = rand(2, 1, 80, 64, seed=1).expand(2, 4, 80, 64)   # stride-0 kv heads
    v = rand(2, 80, 1, 64, seed=2).transpose(1, 2).expand(2, 4, 80, 64)
    run_ops(fake_ext, q, k, v, causal=True)


def test_unaligned_storage_offset(fake_ext):
    # A pointer 2 bytes past a 16-byte boundary must take the non-vectorized path.
    big = rand(1, 2, 40, 65)
    q = big[..., 1:]
    k, v = rand(1, 2, 40, 64, seed=1), rand(1, 2, 40, 64, seed=2)
    assert q.data_ptr() % 16 != 0
    run_ops(fake_ext, q, k, v, lse=True)


def test_size_one_dims_with_odd_strides(fake_ext):
    q = torch.as_strided(rand(1000), (1, 1, 5, 64), (3, 7, 64, 1))
    k = torch.as_strided(rand(1000, seed=1), (1, 1, 9, 64), (5, 11, 72, 1))
    v = rand(1, 1, 9, 64, seed=2)
    run_ops(fake_ext, q, k, v, lse=True)


def test_no_smoothing_skips_the_stats_kernel(fake_ext):
    q, k, v = (rand(1, 2, 64, 128, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, smooth_k=False, lse=True)
    assert fake_ext.launches == ["sm80_quantize_qk_int8_v_fp16_hd128",
                                 "sm80_qkint8_pvfp16_acc32_hd128"]
    smem = fake_ext.kernels["sm80_qkint8_pvfp16_acc32_hd128"]["smem"]
    assert fake_ext.smem_limits == ({"sm80_qkint8_pvfp16_acc32_hd128": smem}
                                    if smem > 48 * 1024 else {})


def test_sm_scale(fake_ext):
    q, k, v = (rand(1, 1, 64, 64, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, sm_scale=0.3, lse=True)


def test_fatbin_loaded_once_per_device(fake_ext):
    q, k, v = (rand(1, 1, 64, 64, seed=i) for i in range(3))
    calls = []
    real = fake_ext.load_module
    fake_ext.load_module = lambda o, img: calls.append(o) or real(o, img)
    for _ in range(3):
        run_ops(fake_ext, q, k, v)
    assert calls == [0]


def test_abi_mismatch_refused(fake_ext, monkeypatch):
    monkeypatch.setattr(fake_ext, "read_global_u32", lambda m, n: _abi.ABI_VERSION + 7)
    q = rand(1, 1, 64, 64)
    with pytest.raises(_loader.PackageError, match="sageattn_abi_version"):
        ops.sm80_forward(q, q, q, tensor_layout="HND", is_causal=False, sm_scale=0.125,
                         return_lse=False, qk_quant_gran="per_thread", pv_accum_dtype="fp32",
                         smooth_k=True)


def _choice(path="sm80"):
    return dispatch.Choice(path, "sm80", (9, 0), "SASS sm_90", "auto", "default table", "test")


def test_op_defaults_and_opcheck(fake_ext, monkeypatch):
    """The registered custom op runs the implementation (path defaults filled in) and passes
    torch.library.opcheck (schema, fake implementation vs real, no mutation)."""
    seen = []

    def resolve(index, path=None, entry=None):
        seen.append((index, path, entry))
        return _choice()

    monkeypatch.setattr(dispatch, "resolve", resolve)
    q, k, v = (rand(1, 2, 70, 64, seed=i) for i in range(3))
    for x in (q, k, v):
        fake_ext.mem.add(x)
    out, lse = torch.ops.sageattn.attention(q, k, v, "HND", True, 0.125, True, "", "", "", "",
                                            -1)
    exp, exp_lse = emulate.sm80_attention(q, k, v, is_causal=True, sm_scale=0.125,
                                          return_lse=True)
    assert torch.equal(out, exp) and torch.equal(lse, exp_lse)
    assert seen[-1] == (0, None, None)
    fake_ext.mem.strict = False     # opcheck runs the op on copies of the inputs
    for args in ((q, k, v, "HND", True, 0.125, True, "", "", "", "", -1),
                 (q, k, v, "HND", False, 0.125, False, "sm80", "entry", "per_warp",
                  "fp16+fp32", 0),
                 (*(x.transpose(1, 2) for x in (q, k, v)), "NHD", False, 0.1, True, "", "", "",
                  "", 1)):
        torch.library.opcheck(torch.ops.sageattn.attention.default, args)


def test_always_use_op_matches_direct(fake_ext, monkeypatch):
    monkeypatch.setattr(dispatch, "resolve", lambda index, path=None, entry=None: _choice())
    q, k, v = (rand(1, 2, 70, 64, seed=i) for i in range(3))
    for x in (q, k, v):
        fake_ext.mem.add(x)
    kw = dict(tensor_layout="HND", is_causal=True, sm_scale=0.125, return_lse=True)
    direct = ops.attention(q, k, v, **kw)
    monkeypatch.setattr(ops, "ALWAYS_USE_OP", True)
    through_op = ops.attention(q, k, v, **kw)
    assert all(torch.equal(a, b) for a, b in zip(direct, through_op))
    out, lse = ops.attention(q, k, v, **{**kw, "return_lse": False})
    assert lse is None


def test_preload_loads_every_kernel(fake_ext, monkeypatch):
    import sageattn

    monkeypatch.setattr(dispatch, "resolve", lambda index, path=None, entry=None: _choice())
    sageattn.preload(0)
    assert sorted(fake_ext.functions.values()) == sorted(fake_ext.kernels)
