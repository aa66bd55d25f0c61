"""A small transformer for the SDPA drop-in tests (CPU with the emulator, GPU with the kernels).

Its attention calls ``torch.nn.functional.scaled_dot_product_attention`` the way model code
does (looked up at call time), so ``sageattn.patch_sdpa()`` reaches every layer. The layers
mix calls the quantized path takes (causal, GQA with ``enable_gqa``, cross-attention with
Sq != Sk, causal cross-attention with Sq > Sk, an explicit scale) with calls that need
torch's function (a key-padding mask, head dim 256); ``EXPECTED`` says how a forward pass
splits between them.
"""

import torch
import torch.nn.functional as F
from torch import nn

DIM = 256
CONTEXT = 77       # cross-attention keys (a text encoder's length)

# One dict per layer; "expect" is the drop-in's path for the layer's call.
LAYERS = (
    dict(heads=4, kv_heads=4, head_dim=64, causal=True, expect="quantized"),
    dict(heads=4, kv_heads=4, head_dim=64, masked=True, expect="attn_mask"),
    dict(heads=8, kv_heads=2, head_dim=32, expect="quantized"),                # GQA
    dict(heads=4, kv_heads=4, head_dim=64, cross=True, expect="quantized"),
    dict(heads=1, kv_heads=1, head_dim=256, expect="head dim"),
    dict(heads=4, kv_heads=2, head_dim=64, cross=True, causal=True, expect="quantized"),
    dict(heads=4, kv_heads=4, head_dim=64, causal=True, scale=0.1, expect="quantized"),
)


def expected_stats(passes: int = 1) -> dict:
    """``sageattn.sdpa_stats()`` after ``passes`` eager forward passes (paths not included)."""
    quantized = sum(layer["expect"] == "quantized" for layer in LAYERS) * passes
    reasons = {}
    for layer in LAYERS:
        if layer["expect"] != "quantized":
            reasons[layer["expect"]] = reasons.get(layer["expect"], 0) + passes
    fallback = sum(reasons.values())
    return {"calls": quantized + fallback, "quantized": quantized, "fallback": fallback,
            "reasons": reasons}


class Attention(nn.Module):
    def __init__(self, heads, kv_heads, head_dim, causal=False, masked=False, cross=False,
                 scale=None, expect=None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.causal, self.masked, self.cross, self.scale = causal, masked, cross, scale
        self.q = nn.Linear(DIM, heads * head_dim)
        self.k = nn.Linear(DIM, kv_heads * head_dim)
        self.v = nn.Linear(DIM, kv_heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, DIM)
        self.last = None

    def forward(self, x, context, key_padding):
        B, S, _ = x.shape
        src = context if self.cross else x
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(src).view(B, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(src).view(B, src.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        mask = key_padding[:, None, None, :] if self.masked else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                           scale=self.scale,
                                           enable_gqa=self.kv_heads != self.heads)
        self.last = o.detach()
        return self.proj(o.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, **attn):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = Attention(**attn)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, context, key_padding):
        x = x + self.attn(self.norm1(x), context, key_padding)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(**layer) for layer in LAYERS)

    def forward(self, x, context, key_padding):
        for block in self.blocks:
            x = block(x, context, key_padding)
        return x

    def attention_outputs(self) -> list:
        """Each layer's attention output of the last forward pass."""
        return [block.attn.last for block in self.blocks]


def build(device, dtype, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer().to(device=device, dtype=dtype).eval()


def inputs(device, dtype, batch: int = 2, seq: int = 128, seed: int = 1):
    """(x, context, key_padding): the second sequence's last quarter is padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, DIM, generator=g).to(device=device, dtype=dtype)
    context = torch.randn(batch, CONTEXT, DIM, generator=g).to(device=device, dtype=dtype)
    key_padding = torch.ones(batch, seq, dtype=torch.bool)
    key_padding[1, seq - seq // 4:] = False
    return x, context, key_padding.to(device)
