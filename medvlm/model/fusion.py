"""Fusion modules: patch tokens -> visual soft tokens in the LLM's embedding space.

Both are trained and sent every round, so they are small on purpose, and built only from
layers Opacus computes per-sample gradients for (Linear, LayerNorm, Embedding): attention is
written with Linear projections and ``scaled_dot_product_attention`` rather than
``nn.MultiheadAttention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medvlm.config import FusionConfig


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, Q, D) queries; context: (B, P, D) keys/values
        b, q_len, d = x.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)))
        return self.o(out.transpose(1, 2).reshape(b, q_len, d))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.norm_cross(queries), patches)
        return queries + self.mlp(self.norm_mlp(queries))


class ScaledOutput(nn.Module):
    """Linear projection into the LLM's embedding space, times a fixed scale.

    Visual tokens must start at the frozen LLM's embedding scale (default init makes them ~10x
    larger and the LLM learns to ignore them). Rather than initialising the weights tiny, which
    Adam's ~lr-sized steps (and DP noise) then swamp, the weights keep a normal scale and a
    constant, derived from the LLM's embeddings, scales the output. The constant is a buffer:
    it is not trained, not sent, and every site derives the same value from the same base LLM.
    """

    def __init__(self, in_dim: int, out_dim: int, target_rms: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.proj.weight, std=1.0 / in_dim ** 0.5)   # unit-RMS output for unit-RMS input
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("scale", torch.tensor(float(target_rms)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


def sincos_2d(num_patches: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code for a square patch grid (MAE's), (P, dim).

    The queries' cross-attention is blind to token order, and a CLIP-trained ViT's last-layer
    patch tokens keep little of their position: without this, "which side?" and "how many?"
    cannot be answered. Fixed, so it adds nothing to the trained (and noised, and sent) state."""
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches or dim % 4:
        return torch.zeros(num_patches, dim)
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class QFormer(nn.Module):
    """Learned queries cross-attending the patch tokens (BLIP-2 / the seed paper's design)."""

    def __init__(self, cfg: FusionConfig, vision_width: int, lm_width: int, embed_rms: float):
        super().__init__()
        self.num_queries = cfg.num_queries
        self.queries = nn.Embedding(cfg.num_queries, cfg.dim)
        self.patch_norm = nn.LayerNorm(vision_width)
        self.patch_proj = nn.Linear(vision_width, cfg.dim)
        self.layers = nn.ModuleList(QFormerLayer(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out_proj = ScaledOutput(cfg.dim, lm_width, embed_rms)
        nn.init.normal_(self.queries.weight, std=0.02)  # small, as BLIP-2: image content dominates

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (B, P, vision_width) -> (B, num_queries, lm_width)
        b = patches.shape[0]
        # .repeat (not .expand): Opacus' per-sample embedding grads need a contiguous index
        idx = torch.arange(self.num_queries, device=patches.device).repeat(b, 1)
        q = self.queries(idx)                                   # (B, Q, dim)
        ctx = self.patch_proj(self.patch_norm(patches))         # (B, P, dim)
        ctx = ctx + self._position(ctx.shape[1], ctx)            # where each patch is
        for layer in self.layers:
            q = layer(q, ctx)
        return self.out_proj(self.out_norm(q))


    def _position(self, num_patches: int, like: torch.Tensor) -> torch.Tensor:
        pos = getattr(self, "_pos_cache", None)
        if pos is None or pos.shape[0] != num_patches or pos.device != like.device:
            pos = sincos_2d(num_patches, like.shape[-1]).to(like.device)
            self._pos_cache = pos
        return pos.to(like.dtype)


class MLPProjector(nn.Module):
    """LLaVA-style two-layer projector applied to every patch token."""

    def __init__(self, cfg: FusionConfig, vision_width: int, lm_width: int, embed_rms: float):
        super().__init__()
        self.norm = nn.LayerNorm(vision_width)
        self.fc1 = nn.Linear(vision_width, cfg.dim)
        self.act = nn.GELU()
        self.fc2 = ScaledOutput(cfg.dim, lm_width, embed_rms * 2.0)  # GELU output: about half unit RMS

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # patches: (B, P, vision_width) -> (B, P, lm_width)
        return self.fc2(self.act(self.fc1(self.norm(patches))))


def build_fusion(cfg: FusionConfig, *, vision_width: int, lm_width: int, embed_rms: float = 0.02) -> nn.Module:
    """``embed_rms``: per-dimension RMS of the LLM's input embeddings (the scale to match)."""
    if cfg.kind == "qformer":
        return QFormer(cfg, vision_width, lm_width, embed_rms)
    return MLPProjector(cfg, vision_width, lm_width, embed_rms)
