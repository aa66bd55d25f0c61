"""ops.py against the kernel contract, on the CPU, for the sm80 and sm89 trees.

A stand-in for ``sageattn._ext`` runs each launched kernel as the emulator's matching step,
reading and writing raw memory through the pointers, strides and sizes that ops.py packs
into the parameter structs, and checks every launch against docs/ARCHITECTURE.md (kernel
names from tools/kernel_table.py, grids, block sizes, shared memory, buffer bounds). The
result must equal the emulator's bit for bit, so a wrong pointer, stride, layout, offset or
flag in ops.py fails here before any GPU time is spent.

The sm89 stand-in writes the FP8 V^T tile itself, key by key at the slot the contract states
(``_slot`` below, written from docs/ARCHITECTURE.md, not taken from the emulator), while its
attention step reads the tile through the emulator: a layout disagreement between the
two shows up as a wrong result.
"""

import ctypes
import json
import math

import pytest
import torch

from sageattn import _abi, _loader, dispatch, emulate, ops
from repo_files import load_file


def _kernel_table():
    return load_file("_sageattn_tools_kernel_table", "tools/kernel_table.py")


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


def _slot(p):
    """Slot of key p of a 64-key block in the FP8 V^T tile (docs/ARCHITECTURE.md)."""
    step, half, j, c, e = p // 32, (p % 32) // 16, (p % 16) // 8, (p % 8) // 2, p % 2
    return 32 * step + 16 * half + 4 * c + 2 * j + e


class FakeExt:
    """Implements the host-layer calls ops.py and _loader.py use."""

    def __init__(self, manifest, mem):
        self.trees = manifest["trees"]
        self.kernels = {name: meta for tree in self.trees.values()
                        for name, meta in tree["kernels"].items()}
        self.mem = mem
        self.modules, self.functions, self.smem_limits, self.launches = {}, {}, {}, []
        self.v_scale_max = self.v_tile = None     # of the last FP8 quantize launch
        self.stats_calls = []                     # (sample_tokens, mean?, min/max?) per launch
        self.requantizes = 0                      # V requantize launches

    def load_module(self, ordinal, image):
        tree = image.decode().removeprefix("fatbin:")
        assert tree in self.trees
        handle = 1000 + 10 * len(self.modules) + ordinal
        self.modules[handle] = tree
        return handle

    def read_global_u32(self, module, name):
        assert name == "sageattn_abi_version"
        return _abi.ABI_VERSION

    def get_function(self, module, name):
        assert name in self.trees[self.modules[module]]["kernels"], (name, self.modules[module])
        handle = 2000 + len(self.functions)
        self.functions[handle] = name
        return handle

    def set_max_dynamic_smem(self, function, nbytes):
        self.smem_limits[self.functions[function]] = nbytes

    def launch(self, ordinal, function, grid, block, smem, stream, params, programmatic=False):
        name = self.functions[function]
        # Only the sm90 kernels wait for their predecessor (griddepcontrol.wait).
        assert not programmatic, f"{name}: a programmatic launch of a kernel that does not wait"
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
        assert (p.minimum == 0) == (p.maximum == 0)
        assert name.startswith("sm89") or p.minimum == 0    # min/max: FP8 V scales only
        strides = (p.src_stride_b, p.src_stride_h, p.src_stride_s)
        _check_vec(p.vectorized, p.src, strides, p.head_dim)
        x = self.mem.view(p.src, _DT[p.in_dtype], (p.batch, p.heads, p.seq, p.head_dim),
                          strides + (1,))
        shape = (p.batch, p.heads, p.head_dim_padded)
        # Samples: the K mean, and V's statistics (sm89: min/max, mean with smooth_v).
        assert p.sample_tokens in (0, emulate.K_MEAN_SAMPLE_TOKENS, emulate.V_AMAX_SAMPLE_TOKENS)
        self.stats_calls.append((p.sample_tokens, bool(p.mean), bool(p.minimum)))
        mean, lo, hi = emulate.channel_stats(x, p.head_dim_padded, mean=bool(p.mean),
                                             minmax=bool(p.minimum), sample=p.sample_tokens)
        for ptr, value in ((p.mean, mean), (p.minimum, lo), (p.maximum, hi)):
            if ptr:
                self.mem.view(ptr, torch.float32, shape).copy_(value)

    def quantize(self, name, grid, raw):
        p = _abi.QuantParams.from_buffer_copy(raw)
        B, Hq, Hkv, D, Dp = p.batch, p.heads_q, p.heads_kv, p.head_dim, p.head_dim_padded
        assert name.endswith(f"_hd{Dp}") and Dp == emulate.padded_head_dim(D)
        assert p.q_blocks == -(-p.seq_q // 128) and p.k_blocks == -(-p.seq_k // 64)
        fp8 = name.startswith("sm89_")
        if fp8:
            assert p.v_fp16 == 0 and p.v_fp8 and p.v_scale and p.v_min and p.v_max
            assert p.v_scale_max in (448.0, 2.25)
            # A margin (sampled statistics) in the full-range modes only, with its flags.
            exact = p.v_scale_max == 2.25 or p.v_mean      # "fp32+fp16", smooth_v
            assert p.v_amax_margin == (0.0 if exact else emulate.V_AMAX_MARGIN)
            assert bool(p.v_overflow) == (p.v_amax_margin > 0)
        else:
            assert p.v_fp8 == p.v_scale == p.v_mean == p.v_min == p.v_max == 0
            assert p.v_scale_max == 0 and p.v_amax_margin == 0 and p.v_overflow == 0
        assert grid == (B * Hq * p.q_blocks + 2 * B * Hkv * p.k_blocks, 1, 1)
        s2 = torch.tensor(p.sm_scale_log2e, dtype=torch.float32)
        assert p.sm_scale_log2e == ctypes.c_float(p.sm_scale * math.log2(math.e)).value
        m = self.mem
        views = {x: self._source(p, x, seq, heads)
                 for x, seq, heads in (("q", p.seq_q, Hq), ("k", p.seq_k, Hkv), ("v", p.seq_k, Hkv))}
        mean = m.view(p.k_mean, torch.float32, (B, Hkv, Dp)) if p.k_mean else None
        gran = _GRAN[p.granularity]
        q_i8, q_scale = emulate.quantize_q(views["q"], s2, gran, Dp)
        k_i8, k_scale = emulate.quantize_k(views["k"], mean, gran, Dp)
        m.view(p.q_int8, torch.int8, q_i8.shape).copy_(q_i8)
        m.view(p.q_scale, torch.float32, q_scale.shape).copy_(q_scale)
        m.view(p.k_int8, torch.int8, k_i8.shape).copy_(k_i8)
        m.view(p.k_scale, torch.float32, k_scale.shape).copy_(k_scale)
        if fp8:
            self._quantize_v_fp8(p, views["v"])
        else:
            v16 = emulate.convert_v(views["v"], Dp)
            m.view(p.v_fp16, torch.float16, v16.shape).copy_(v16)
        if p.lse_correction:
            assert mean is not None
            corr = emulate.lse_correction(views["q"], mean, p.sm_scale)
            m.view(p.lse_correction, torch.float32, corr.shape).copy_(corr)

    def _source(self, p, x, seq, heads):
        strides = tuple(getattr(p, f"{x}_stride_{d}") for d in "bhs")
        ptr = getattr(p, x)
        _check_vec(getattr(p, f"vec_{x}"), ptr, strides, p.head_dim)
        return self.mem.view(ptr, _DT[p.in_dtype], (p.batch, heads, seq, p.head_dim), strides + (1,))

    def _v_stats(self, p, shape):
        m = self.mem
        lo, hi = m.view(p.v_min, torch.float32, shape), m.view(p.v_max, torch.float32, shape)
        mean = m.view(p.v_mean, torch.float32, shape) if p.v_mean else torch.zeros(shape)
        return lo, hi, mean

    def requantize(self, name, grid, raw):
        """Heads with a flagged V block again, from the exact amax of |V - mean|."""
        p = _abi.QuantParams.from_buffer_copy(raw)
        B, H, Dp = p.batch, p.heads_kv, p.head_dim_padded
        assert name == f"sm89_requantize_v_fp8_hd{Dp}" and self.launches[-2].startswith("sm89_quantize")
        assert p.v_amax_margin == emulate.V_AMAX_MARGIN and p.v_overflow
        assert grid == (min(B * H, 256), 1, 1)
        self.requantizes += 1
        v = self._source(p, "v", p.seq_k, H)
        S, D = v.shape[2:]
        flagged = self.mem.view(p.v_overflow, torch.uint8, (B, H, p.k_blocks)).bool().any(dim=-1)
        _, _, mean = self._v_stats(p, (B, H, p.head_dim_padded))
        xf = v.float() - mean[:, :, None, :D]
        exact = torch.zeros(B, H, p.head_dim_padded)
        exact[:, :, :D] = xf.abs().amax(dim=2) if S else 0.0
        bound = self._v_bound(p, B, H)
        self._quantize_v_fp8(p, v, torch.where(flagged[..., None], exact, bound))

    def _v_bound(self, p, B, H):
        lo, hi, mean = self._v_stats(p, (B, H, p.head_dim_padded))
        amax = torch.maximum(hi - mean, mean - lo).clamp(min=0)
        if p.v_amax_margin == 0:
            return amax
        bound = amax * torch.tensor(p.v_amax_margin, dtype=torch.float32)
        return torch.where(bound <= 3.4028234663852886e38, bound, amax)

    def _quantize_v_fp8(self, p, v, amax=None):
        """V^T tiles key by key: (B, Hkv, k_blocks, D_pad, 64) bytes, key p at _slot(p), from
        ``amax`` (the requantize launch's) or the bound; the quantize launch also flags each
        block where a code saturates (magnitude 0x7e: 448, or 0x7f: NaN)."""
        B, H, S, D = v.shape
        Dp, m = p.head_dim_padded, self.mem
        stats = (B, H, Dp)
        _, _, mean = self._v_stats(p, stats)
        bound = self._v_bound(p, B, H)
        flag = amax is None and p.v_overflow
        amax = bound if amax is None else amax
        scale_max = torch.tensor(p.v_scale_max, dtype=torch.float32)
        inv = torch.where(amax > 0, scale_max / amax, torch.tensor(0.0))
        codes = emulate.e4m3_bits((v.float() - mean[:, :, None, :D]) * inv[:, :, None, :D])
        if flag:
            flags = torch.zeros(B, H, p.k_blocks * 64, dtype=torch.bool)
            flags[:, :, :S] = ((codes & 0x7F) >= 0x7E).any(-1)
            m.view(p.v_overflow, torch.uint8, (B, H, p.k_blocks)).copy_(
                flags.view(B, H, p.k_blocks, 64).any(-1))
        tile = m.view(p.v_fp8, torch.uint8, (B, H, p.k_blocks, Dp, 64))
        tile.zero_()
        for key in range(S):
            tile[:, :, key // 64, :D, _slot(key % 64)] = codes[:, :, key]
        m.view(p.v_scale, torch.float32, stats).copy_(amax / scale_max)
        self.v_scale_max = p.v_scale_max
        self.v_tile = tile.clone()

    def attention(self, name, grid, raw):
        p = _abi.AttnParams.from_buffer_copy(raw)
        meta = self.kernels[name]
        B, Hq, Hkv, m = p.batch, p.heads_q, p.heads_kv, self.mem
        Dp = meta["head_dim"]
        q_rows = meta.get("q_rows") or 128
        assert 128 % q_rows == 0 and grid == (p.q_blocks * 128 // q_rows, Hq, B)
        assert p.causal in (0, 1) and (p.causal or p.causal_offset == 0)
        common = dict(
            q_int8=m.view(p.q_int8, torch.int8, (B, Hq, p.q_blocks * 128, Dp)),
            q_scale=m.view(p.q_scale, torch.float32, (B, Hq, p.q_blocks, 64)),
            k_int8=m.view(p.k_int8, torch.int8, (B, Hkv, p.k_blocks * 64, Dp)),
            k_scale=m.view(p.k_scale, torch.float32, (B, Hkv, p.k_blocks, 4)),
            k_mean=None,
            lse_correction=(m.view(p.lse_correction, torch.float32, (B, Hq, p.seq_q))
                            if p.lse_correction else None))
        kw = dict(seq_q=p.seq_q, seq_k=p.seq_k, head_dim=p.head_dim_out, causal=bool(p.causal),
                  causal_offset=p.causal_offset, pv_accum=meta["pv_accum"],
                  out_dtype=_DT[p.out_dtype], return_lse=bool(p.lse))
        if name.startswith("sm89_"):
            assert p.v_scale and self.v_scale_max == emulate.v_scale_max(meta["pv_accum"])
            stats = (B, Hkv, Dp)
            qt = emulate.QuantizedFp8(
                v_fp8=m.view(p.v, torch.uint8, (B, Hkv, p.k_blocks, Dp, 64)),
                v_scale=m.view(p.v_scale, torch.float32, stats),
                v_mean=m.view(p.v_mean, torch.float32, stats) if p.v_mean else None, **common)
            out, lse = emulate.attention_fp8(qt, **kw)
        else:
            assert p.v_scale == 0 and p.v_mean == 0
            qt = emulate.Quantized(
                v_fp16=m.view(p.v, torch.float16, (B, Hkv, p.k_blocks * 64, Dp)), **common)
            out, lse = emulate.attention(qt, **kw)
        m.view(p.out, _DT[p.out_dtype], out.shape,
               (p.out_stride_b, p.out_stride_h, p.out_stride_s, 1)).copy_(out)
        if p.lse:
            m.view(p.lse, torch.float32, lse.shape).copy_(lse)


@pytest.fixture
def fake_ext(tmp_path, monkeypatch):
    trees = {}
    for tree in _kernel_table().TREES:
        if tree.name not in ("sm80", "sm89"):
            continue
        trees[tree.name] = {
            "fatbin": f"{tree.name}.fatbin", "sass": list(tree.sass), "ptx": list(tree.ptx),
            "kernels": {k.name: {"kind": k.kind, "head_dim": k.head_dim, "pv_accum": k.pv_accum,
                                 "threads": k.threads, "smem": k.smem,
                                 "q_rows": getattr(k, "q_rows", 0)} for k in tree.kernels}}
        (tmp_path / f"{tree.name}.fatbin").write_bytes(f"fatbin:{tree.name}".encode())
    manifest = {"abi_version": _abi.ABI_VERSION, "toolkit": "fake", "git_revision": "test",
                "trees": trees}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
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


_FORWARD = {"sm80": (ops.sm80_forward, emulate.sm80_attention, "fp32"),
            "sm89": (ops.sm89_forward, emulate.sm89_attention, "fp32+fp16")}
TREES = list(_FORWARD)


def run_ops(ext, q, k, v, layout="HND", causal=False, lse=False, gran="per_thread",
            acc=None, smooth_k=True, sm_scale=None, tree="sm80", smooth_v=False):
    forward, emulator, default_acc = _FORWARD[tree]
    acc = acc or default_acc
    for x in (q, k, v):
        ext.mem.add(x)
    D = q.shape[-1]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    saved = [x.clone() for x in (q, k, v)]
    extra = {"smooth_v": smooth_v} if tree == "sm89" else {}
    out, out_lse = forward(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale,
                           return_lse=lse, qk_quant_gran=gran, pv_accum_dtype=acc,
                           smooth_k=smooth_k, **extra)
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v))), "inputs modified"
    expect = emulator(q, k, v, tensor_layout=layout, is_causal=causal, sm_scale=scale,
                      qk_quant_gran=gran, pv_accum_dtype=acc, smooth_k=smooth_k,
                      return_lse=lse, **extra)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gran", ["per_thread", "per_warp"])
@pytest.mark.parametrize("acc", ["fp32", "fp32+fp32", "fp32+fp16"])
@pytest.mark.parametrize("smooth_v", [False, True], ids=["v", "smooth_v"])
def test_configs_sm89(fake_ext, dtype, gran, acc, smooth_v):
    q, k, v = (rand(2, 4, 130, 64, dtype=dtype, seed=i) for i in range(3))
    v = v + 3 * rand(2, 4, 1, 64, dtype=dtype, seed=7)     # channels offset from zero
    run_ops(fake_ext, q, k, v, gran=gran, acc=acc, lse=True, tree="sm89", smooth_v=smooth_v)
    tag = {"fp32": "acc32", "fp32+fp32": "acc32x32", "fp32+fp16": "acc16x32"}[acc]
    # K mean, then V min/max (and mean), then the fused quantize (and, where V's scales take
    # a margin, the requantize launch) and the attention.
    quant = ["sm89_quantize_qk_int8_v_fp8_hd64"] + (
        [] if acc == "fp32+fp16" or smooth_v else ["sm89_requantize_v_fp8_hd64"])
    assert fake_ext.launches == ["sm89_channel_stats", "sm89_channel_stats", *quant,
                                 f"sm89_qkint8_pvfp8_{tag}_hd64"]
    assert fake_ext.v_scale_max == (2.25 if acc == "fp32+fp16" else 448.0)


def test_sm89_no_smoothing_runs_only_the_v_stats(fake_ext):
    q, k, v = (rand(1, 2, 64, 128, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, smooth_k=False, lse=True, tree="sm89", acc="fp32")
    assert fake_ext.launches == ["sm89_channel_stats", "sm89_quantize_qk_int8_v_fp8_hd128",
                                 "sm89_requantize_v_fp8_hd128",
                                 "sm89_qkint8_pvfp8_acc32_hd128"]
    smem = fake_ext.kernels["sm89_qkint8_pvfp8_acc32_hd128"]["smem"]
    assert smem == 320 * 128 + 256  # Q + 2 stages of K and V^T + the block-sparse mask window
    assert fake_ext.smem_limits == ({"sm89_qkint8_pvfp8_acc32_hd128": smem}
                                    if smem > 48 * 1024 else {})


@pytest.mark.parametrize("smooth_v", [False, True])
def test_sm89_v_tile_is_the_emulators(fake_ext, smooth_v):
    # The stand-in writes the V^T tile key by key from the contract's slot formula; the
    # emulator builds it with tensor ops: the bytes must agree (padding included).
    q, k = rand(1, 2, 50, 72, seed=1), rand(1, 2, 150, 72, seed=2)
    v = rand(1, 2, 150, 72, seed=3) * 40
    run_ops(fake_ext, q, k, v, tree="sm89", acc="fp32+fp32", smooth_v=smooth_v)
    mean, lo, hi = emulate.channel_stats(v, 128, mean=smooth_v, minmax=True)
    tile, _ = emulate.quantize_v_fp8(v, mean, lo, hi, 448.0, 128,
                                     emulate.v_amax_margin("fp32+fp32", smooth_v))
    assert tile.shape == (1, 2, 3, 128, 64) and torch.equal(tile, fake_ext.v_tile)


@pytest.mark.parametrize("D", [64, 100])
def test_sm89_v_scales_from_a_sample_and_the_requantize_launch(fake_ext, D):
    # Sk = 1000 > 256: V's statistics launch takes the sample; head 1 has a value off the sample
    # at 50x its head's largest (beyond the 16x bound): the quantize launch flags its block, the
    # requantize launch redoes that head from exact statistics, and the output is the
    # emulator's (which models both) to the bit. Head 0 keeps 16x its sample's amax.
    q, k, v = (rand(1, 2, 1000, D, seed=i) for i in range(3))
    sample = set(emulate.sampled_tokens(1000, emulate.V_AMAX_SAMPLE_TOKENS).tolist())
    token = next(t for t in range(500, 1000) if t not in sample)
    v[0, 1, token, 3] = 50 * v[0, 1].abs().max()
    run_ops(fake_ext, q, k, v, lse=True, tree="sm89", acc="fp32+fp32")
    assert fake_ext.stats_calls[1] == (emulate.V_AMAX_SAMPLE_TOKENS, False, True)
    assert fake_ext.requantizes == 1
    Dp = emulate.padded_head_dim(D)
    _, lo, hi = emulate.channel_stats(v, Dp, mean=False, minmax=True, sample=256)
    amax, exact = emulate.v_channel_amax(v, None, lo, hi, 448.0, Dp, emulate.V_AMAX_MARGIN)
    assert exact.tolist() == [[False, True]]
    assert torch.equal(amax[0, 0], 16 * torch.maximum(hi, -lo)[0, 0])
    assert torch.equal(amax[0, 1, :D], v[0, 1].float().abs().amax(0))
    # smooth_v takes exact statistics (its mean centres V): no sample, no requantize launch.
    fake_ext.launches.clear()
    run_ops(fake_ext, q, k, v, lse=True, tree="sm89", acc="fp32+fp32", smooth_v=True)
    assert fake_ext.stats_calls[-1] == (0, True, True) and fake_ext.requantizes == 1
    assert not any("requantize" in name for name in fake_ext.launches)


def test_sm80_refuses_smooth_v(fake_ext):
    q = rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match="smooth_v=True is not offered on the sm80 path"):
        ops.sm80_forward(q, q, q, tensor_layout="HND", is_causal=False, sm_scale=0.125,
                         return_lse=False, qk_quant_gran="per_thread", pv_accum_dtype="fp32",
                         smooth_k=True, smooth_v=True)


@pytest.mark.parametrize("tree", ["sm80", "sm89"])
def test_quantized_operands_launches_only_the_quantization(fake_ext, tree):
    # The test/bench aid goes through the path's own runner and stops after the quantize launch.
    q, k, v = rand(1, 2, 100, 64, seed=1), rand(1, 2, 150, 64, seed=2), rand(1, 2, 150, 64, seed=3)
    for x in (q, k, v):
        fake_ext.mem.add(x)
    buf = ops.quantized_operands(q, k, v, path=tree)
    stats, quant, _ = ops.kernel_names(tree, 64, "fp32+fp32" if tree == "sm89" else "fp32")
    # sm89 ("fp32+fp32" here): K mean, V statistics, quantize and requantize.
    assert fake_ext.launches == ([stats, quant] if tree == "sm80" else
                                 [stats] * 2 + [quant, "sm89_requantize_v_fp8_hd64"])
    assert buf["q_int8"].shape == (1, 2, 128, 64) and buf["k_int8"].shape == (1, 2, 192, 64)
    assert (buf["v_fp16"] is None) == (tree == "sm89") and (buf["v_fp8"] is None) == (tree == "sm80")
    qt = emulate.quantize(q, k, v, sm_scale=64 ** -0.5)
    assert torch.equal(buf["q_int8"], qt.q_int8) and torch.equal(buf["k_int8"], qt.k_int8)


def test_quantized_operands_refuses_what_the_path_does_not_offer(fake_ext):
    q = rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match="path must be one of"):
        ops.quantized_operands(q, q, q, path="sm120")
    with pytest.raises(ValueError, match="smooth_v=True is not offered on the sm80 path"):
        ops.quantized_operands(q, q, q, path="sm80", smooth_v=True)


def test_kernel_names_refuse_other_paths_modes():
    assert ops.kernel_names("sm89", 72, "fp32+fp16")[-1] == "sm89_qkint8_pvfp8_acc16x32_hd128"
    assert ops.kernel_names("sm80", 64, "fp16+fp32")[-1] == "sm80_qkint8_pvfp16_acc16x32_hd64"
    assert ops.kernel_names("sm90", 64, "fp32+fp32")[-1] == "sm90_qkint8_pvfp8_acc32x32_hd64"
    assert ops.kernel_names("sm90", 96, "fp32")[-1] == "sm90_qkint8_pvfp8_acc32_hd128"
    assert ops.kernel_names("nonexistent", 64, "fp32") is None
    with pytest.raises(ValueError, match="on the sm90 path"):
        ops.kernel_names("sm90", 64, "fp32+fp16")
    with pytest.raises(ValueError, match="pv_accum_dtype must be one of .* on the sm89 path"):
        ops.kernel_names("sm89", 64, "fp16+fp32")
    with pytest.raises(ValueError, match="on the sm80 path"):
        ops.kernel_names("sm80", 64, "fp32+fp16")


def test_sm90_kernel_choice_matches_the_table():
    # Dense non-causal "fp32+fp32" hd128 calls take the 192-row kernel (3 consumers), causal ones
    # too from SM90_CAUSAL_Q192_MIN_ROWS query rows; shorter causal, block-sparse and "fp32"
    # calls the 128-row ones; hd64 kernels are 192-row either way.
    rows = {k.name: k for t in _kernel_table().TREES if t.name == "sm90" for k in t.kernels}
    cases = {(128, "fp32+fp32", False, False): ("acc32x32_q192_hd128", 192),
             (128, "fp32+fp32", False, True): ("acc32x32_hd128", 128),
             (128, "fp32+fp32", True, False): ("acc32x32_sparse_hd128", 128),
             (128, "fp32", False, False): ("acc32_hd128", 128),
             (64, "fp32+fp32", False, False): ("acc32x32_hd64", 192),
             (64, "fp32+fp32", False, True): ("acc32x32_hd64", 192),
             (64, "fp32+fp32", True, True): ("acc32x32_sparse_hd64", 128)}
    for (D, acc, sparse, causal), (tag, q_rows) in cases.items():
        name = ops.sm90_kernel_names(D, acc, sparse, causal)[-1]
        assert name == f"sm90_qkint8_pvfp8_{tag}", (D, acc, sparse, causal, name)
        assert rows[name].q_rows == q_rows and rows[name].threads == 128 + 2 * q_rows
    assert ops.kernel_names("sm90", 128, "fp32+fp32")[-1].endswith("_q192_hd128")
    assert ops.kernel_names("sm90", 128, "fp32+fp32", is_causal=True)[-1].endswith("x32_hd128")
    long = ops.SM90_CAUSAL_Q192_MIN_ROWS
    for seq_q, tag in ((long - 1, "acc32x32_hd128"), (long, "acc32x32_q192_hd128")):
        assert ops.sm90_kernel_names(128, "fp32+fp32", False, True, seq_q)[-1].endswith(tag)
    assert ops.sm90_kernel_names(128, "fp32+fp32", True, True, long)[-1].endswith("sparse_hd128")
    assert ops.sm90_kernel_names(128, "fp32", False, True, long)[-1].endswith("acc32_hd128")


@pytest.mark.parametrize("D", [1, 36, 64, 72, 128])
@pytest.mark.parametrize("tree", TREES)
def test_head_dims(fake_ext, tree, D):
    q, k, v = (rand(1, 2, 70, D, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, lse=True, tree=tree)


@pytest.mark.parametrize("tree", TREES)
def test_nhd_layout(fake_ext, tree):
    q, k, v = (rand(2, 100, 4, 64, seed=i) for i in range(3))
    out, _ = run_ops(fake_ext, q, k, v, layout="NHD", causal=True, lse=True, tree=tree)
    assert out.shape == (2, 100, 4, 64)


@pytest.mark.parametrize("Sq,Sk", [(1, 1), (1, 200), (65, 129), (200, 63), (129, 127)])
@pytest.mark.parametrize("tree", TREES)
def test_causal_offsets(fake_ext, tree, Sq, Sk):
    q = rand(1, 2, Sq, 64, seed=1)
    k, v = rand(1, 2, Sk, 64, seed=2), rand(1, 2, Sk, 64, seed=3)
    run_ops(fake_ext, q, k, v, causal=True, lse=True, tree=tree)


@pytest.mark.parametrize("tree", TREES)
def test_gqa_and_mqa(fake_ext, tree):
    q = rand(1, 8, 90, 64, seed=1)
    for hkv in (2, 1):
        k, v = rand(1, hkv, 150, 64, seed=2), rand(1, hkv, 150, 64, seed=3)
        run_ops(fake_ext, q, k, v, causal=True, lse=True, tree=tree)


@pytest.mark.parametrize("tree", TREES)
def test_fused_qkv_slices(fake_ext, tree):
    # (B, S, 3, H, D) projection output: q, k, v are NHD views with a non-unit head stride.
    qkv = rand(2, 77, 3, 4, 64)
    q, k, v = qkv.unbind(2)
    run_ops(fake_ext, q, k, v, layout="NHD", lse=True, tree=tree)


@pytest.mark.parametrize("tree", TREES)
def test_transposed_and_expanded_views(fake_ext, tree):
    q = rand(2, 50, 4, 64).transpose(1, 2)          # HND view of NHD storage
    k = rand(2, 1, 80, 64, seed=1).expand(2, 4, 80, 64)   # stride-0 kv heads
    v = rand(2, 80, 1, 64, seed=2).transpose(1, 2).expand(2, 4, 80, 64)
    run_ops(fake_ext, q, k, v, causal=True, tree=tree)


@pytest.mark.parametrize("tree", TREES)
def test_unaligned_storage_offset(fake_ext, tree):
    # A pointer 2 bytes past a 16-byte boundary must take the non-vectorized path.
    big = rand(1, 2, 40, 65)
    q = big[..., 1:]
    k, v = rand(1, 2, 40, 64, seed=1), rand(1, 2, 40, 64, seed=2)
    assert q.data_ptr() % 16 != 0
    run_ops(fake_ext, q, k, v, lse=True, tree=tree)


@pytest.mark.parametrize("tree", TREES)
def test_size_one_dims_with_odd_strides(fake_ext, tree):
    q = torch.as_strided(rand(1000), (1, 1, 5, 64), (3, 7, 64, 1))
    k = torch.as_strided(rand(1000, seed=1), (1, 1, 9, 64), (5, 11, 72, 1))
    v = rand(1, 1, 9, 64, seed=2)
    run_ops(fake_ext, q, k, v, lse=True, tree=tree)


def test_no_smoothing_skips_the_stats_kernel(fake_ext):
    q, k, v = (rand(1, 2, 64, 128, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, smooth_k=False, lse=True)
    assert fake_ext.launches == ["sm80_quantize_qk_int8_v_fp16_hd128",
                                 "sm80_qkint8_pvfp16_acc32_hd128"]
    smem = fake_ext.kernels["sm80_qkint8_pvfp16_acc32_hd128"]["smem"]
    assert fake_ext.smem_limits == ({"sm80_qkint8_pvfp16_acc32_hd128": smem}
                                    if smem > 48 * 1024 else {})


@pytest.mark.parametrize("tree", TREES)
def test_k_mean_from_a_sample_of_a_long_sequence(fake_ext, tree):
    # Sk = 1000 > 256 keys: the K statistics launch takes the sample (the emulator's K mean
    # samples the same keys, so a launch over every key would not match it bit for bit), V's
    # statistics (sm89, "fp32+fp16" by default here: exact, no margin) see every token.
    q, k, v = (rand(1, 2, 1000, 64, seed=i) for i in range(3))
    k = k + 3 * rand(1, 2, 1, 64, seed=9)   # a channel bias, so the mean matters
    run_ops(fake_ext, q, k, v, lse=True, tree=tree)
    assert fake_ext.stats_calls[0] == (emulate.K_MEAN_SAMPLE_TOKENS, True, False)
    assert all(sample == 0 and minmax for sample, _, minmax in fake_ext.stats_calls[1:])
    assert len(fake_ext.stats_calls) == (2 if tree == "sm89" else 1)


def test_channel_stats_sample_range():
    x = torch.zeros(1, 1, 300, 64, dtype=torch.float16)
    for kw in ({"sample_tokens": -1}, {"sample_tokens": (1 << 16) + 1}):
        with pytest.raises(ValueError, match="sample_tokens"):
            ops._channel_stats(None, 0, 0, x, (1, 1, 300), (0, 0, 64), 64, 64, 0, mean=1, **kw)


@pytest.mark.parametrize("tree", TREES)
def test_sm_scale(fake_ext, tree):
    q, k, v = (rand(1, 1, 64, 64, seed=i) for i in range(3))
    run_ops(fake_ext, q, k, v, sm_scale=0.3, lse=True, tree=tree)


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


def _choice(path="sm80", capability=(9, 0)):
    return dispatch.Choice(path, path, capability, "SASS", "auto", "default table", "test")


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


@pytest.mark.parametrize("tree", TREES)
def test_preload_loads_every_kernel(fake_ext, monkeypatch, tree):
    import sageattn

    monkeypatch.setattr(dispatch, "resolve",
                        lambda index, path=None, entry=None: _choice(tree))
    sageattn.preload(0)
    assert sorted(fake_ext.functions.values()) == sorted(fake_ext.trees[tree]["kernels"])


@pytest.mark.parametrize("capability,gran", [((8, 9), "per_thread"), ((12, 0), "per_warp"),
                                             ((12, 1), "per_warp")])
def test_op_sm89_device_defaults(fake_ext, monkeypatch, capability, gran):
    """sageattn() on an sm89-path device: "fp32+fp16", smooth_k, no smooth_v, and the row's
    Q/K granularity (per-warp on 12.x), through the direct call and the custom op alike."""
    monkeypatch.setattr(dispatch, "resolve",
                        lambda index, path=None, entry=None: _choice("sm89", capability))
    q, k, v = (rand(1, 2, 200, 64, seed=i) for i in range(3))
    q = q * torch.exp(rand(1, 2, 200, 1, seed=5).float()).half()   # per_warp != per_thread
    for x in (q, k, v):
        fake_ext.mem.add(x)
    kw = dict(tensor_layout="HND", is_causal=True, sm_scale=0.125, return_lse=True)
    out, lse = ops.attention(q, k, v, **kw)
    assert fake_ext.launches[-1] == "sm89_qkint8_pvfp8_acc16x32_hd64"
    exp, exp_lse = emulate.sm89_attention(q, k, v, is_causal=True, sm_scale=0.125,
                                          return_lse=True, qk_quant_gran=gran)
    assert torch.equal(out, exp) and torch.equal(lse, exp_lse)
    other = "per_warp" if gran == "per_thread" else "per_thread"
    assert not torch.equal(out, emulate.sm89_attention(q, k, v, is_causal=True, sm_scale=0.125,
                                                       qk_quant_gran=other))
    monkeypatch.setattr(ops, "ALWAYS_USE_OP", True)
    through_op = ops.attention(q, k, v, **kw)
    assert torch.equal(through_op[0], out) and torch.equal(through_op[1], lse)


def test_op_sm89_smooth_v_and_opcheck(fake_ext, monkeypatch):
    monkeypatch.setattr(dispatch, "resolve",
                        lambda index, path=None, entry=None: _choice("sm89", (8, 9)))
    q, k, v = (rand(1, 2, 70, 64, seed=i) for i in range(3))
    v = v + 5
    for x in (q, k, v):
        fake_ext.mem.add(x)
    out, lse = torch.ops.sageattn.attention(q, k, v, "HND", False, 0.125, True, "sm89",
                                            "entry", "per_warp", "fp32+fp32", 1, 1)
    exp, exp_lse = emulate.sm89_attention(q, k, v, sm_scale=0.125, return_lse=True,
                                          qk_quant_gran="per_warp", pv_accum_dtype="fp32+fp32",
                                          smooth_v=True)
    assert torch.equal(out, exp) and torch.equal(lse, exp_lse)
    assert not torch.equal(out, emulate.sm89_attention(q, k, v, sm_scale=0.125,
                                                       qk_quant_gran="per_warp",
                                                       pv_accum_dtype="fp32+fp32"))
    fake_ext.mem.strict = False     # opcheck runs the op on copies of the inputs
    for args in ((q, k, v, "HND", True, 0.125, True, "", "", "", "", -1, -1),
                 (q, k, v, "HND", False, 0.125, False, "sm89", "entry", "per_thread", "fp32",
                  0, 1)):
        torch.library.opcheck(torch.ops.sageattn.attention.default, args)
