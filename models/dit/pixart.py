"""PixArt-Σ's `PixArtTransformer2DModel` (Flax NNX, NHWC latents) with q/k/v taps of every self-attention.

    model = PixArtTransformer2DModel(PixArtConfig(), rngs=nnx.Rngs(0))     # or dit.params.load_transformer(dir)
    out, taps = model(latents, t, caption)   # latents [B, h, w, 4], t [B] or scalar, caption [B, M, Ct]

Structure (diffusers' names):
    pos_embed     p×p stride-p conv (`proj`) → tokens `[B, N, C]` (row-major) + 2-D sin-cos position embedding
    adaln_single  t → sincos(256) → `emb.timestep_embedder` (linear, SiLU, linear) = e `[B, C]`;
                  `linear`(SiLU(e)) = m `[B, 6C]`, shared by every block (adaLN-single)
    caption_projection  linear → GELU(tanh) → linear: caption `[B, M, Ct]` → `[B, M, C]`
    transformer_blocks  with (shift, scale, gate)×2 = block.scale_shift_table `[6, C]` + m:
        x += gate_msa · attn1(LN(x)·(1 + scale_msa) + shift_msa)          (self-attention: the tap)
        x += attn2(x, caption)                                             (cross-attention, no norm)
        x += gate_mlp · ff(LN(x)·(1 + scale_mlp) + shift_mlp)              (GELU(tanh) MLP, 4C)
    head          LN(x)·(1 + scale) + shift, (shift, scale) = scale_shift_table `[2, C]` + e; proj_out → unpatchify
LN: LayerNorm without affine parameters, eps 1e-6. The sin-cos embedding of a (h, w) grid: channels [0, C/2) encode
the column, [C/2, C) the row, at positions i / (n / base) / interpolation_scale with base = sample_size / p — the
same formula at every grid size, so other resolutions and aspect ratios need no interpolation (diffusers
recomputes it the same way).

Taps: the raw q/k/v of every `attn1`, `[B, H, N, D]`, grid (h/p, w/p), no prefix tokens.

Shape legend
    B  batch   (h, w)  latent grid   p  patch size   N = (h/p)·(w/p) tokens   C  width (H·D)   H  heads
    D  head dim   M  caption tokens   Ct  caption width (T5: 4096)   Z  latent channels in, Zo out
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.dit.config import PixArtConfig
from spectral_jax.models.sd.layers import Attention, conv, linear
from spectral_jax.models.sd.unet import TimestepEmbedding, timestep_embedding
from spectral_jax.taps import LayerTap, Taps


def sincos_pos_embed(dim: int, grid: tuple[int, int], base_size: float, interpolation_scale: float) -> np.ndarray:
    """diffusers `get_2d_sincos_pos_embed(dim, (h, w), base_size, interpolation_scale)`: `[h·w, dim]` float32,
    row-major tokens; channels [0, dim/2) the column's embedding, [dim/2, dim) the row's, each [sin(p·ω), cos(p·ω)]
    with ω_j = 10000^(−j/(dim/4)) and p = i / (n / base_size) / interpolation_scale (positions in float32, the
    products in float64, as the reference)."""
    h, w = grid

    def pos(n):
        return np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)

    def embed_1d(p):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
        out = np.outer(p.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(pos(h), pos(w), indexing="ij")              # [h, w] each
    emb = np.concatenate([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], axis=1)
    return emb.astype(np.float32)


def layer_norm(x, eps: float):
    """LayerNorm over the last axis without affine parameters (two-pass variance, as torch)."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class PatchEmbed(nnx.Module):
    """`[B, h, w, Z]` → tokens `[B, N, C]` + the sin-cos position embedding of the (h/p, w/p) grid."""

    def __init__(self, cfg: PixArtConfig, *, dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.patch_size, self.base_size, self.scale = p, cfg.sample_size // p, cfg.pos_scale
        self.proj = conv(cfg.in_channels, cfg.inner_dim, p, stride=p, padding=0, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.proj(x)                                                   # [B, h/p, w/p, C]
        b, gh, gw, c = x.shape
        pos = sincos_pos_embed(c, (gh, gw), self.base_size, self.scale)
        return x.reshape(b, gh * gw, c) + jnp.asarray(pos, x.dtype)[None]


class TimestepConditioning(nnx.Module):
    """diffusers `PixArtAlphaCombinedTimestepSizeEmbeddings` without size conditions: t → e `[B, C]`."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, c, dtype=dtype, rngs=rngs)

    def __call__(self, t, dtype):
        return self.timestep_embedder(timestep_embedding(t, 256, True, 0.0).astype(dtype))


class AdaLayerNormSingle(nnx.Module):
    """t → (m `[B, 6C]` for the blocks, e `[B, C]` for the head)."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.emb = TimestepConditioning(c, dtype=dtype, rngs=rngs)
        self.linear = linear(c, 6 * c, dtype=dtype, rngs=rngs)

    def __call__(self, t, dtype):
        e = self.emb(t, dtype)
        return self.linear(jax.nn.silu(e)), e


class CaptionProjection(nnx.Module):
    def __init__(self, c_in: int, c: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(c_in, c, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=True))


class GELUProj(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        self.proj = linear(c_in, c_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """net = [GELU(tanh) projection C → 4C, dropout (no parameters), Linear 4C → C]."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.net = nnx.List([GELUProj(c, 4 * c, dtype=dtype, rngs=rngs), None,
                             linear(4 * c, c, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class PixArtBlock(nnx.Module):
    """diffusers `BasicTransformerBlock` with norm_type "ada_norm_single" (see the module docstring).
    x `[B, N, C]`, m `[B, 6C]`, caption `[B, M, C]` → (x `[B, N, C]`, (q, k, v) `[B, H, N, D]` of attn1)."""

    def __init__(self, cfg: PixArtConfig, *, dtype, rngs: nnx.Rngs):
        c, h, d = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.eps = cfg.norm_eps
        self.scale_shift_table = nnx.Param(jnp.zeros((6, c), dtype))
        self.attn1 = Attention(c, h, d, bias=True, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(c, h, d, cross_attention_dim=cfg.cross_attention_dim, bias=True, dtype=dtype,
                               rngs=rngs)
        self.ff = FeedForward(c, dtype=dtype, rngs=rngs)

    def __call__(self, x, m, caption):
        b, _, c = x.shape
        mod = self.scale_shift_table[...][None] + m.reshape(b, 6, c)              # [B, 6, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i:i + 1] for i in range(6))
        a, qkv = self.attn1(modulate(layer_norm(x, self.eps), shift_msa, scale_msa))
        x = x + gate_msa * a
        x = x + self.attn2(x, caption)[0]
        x = x + gate_mlp * self.ff(modulate(layer_norm(x, self.eps), shift_mlp, scale_mlp))
        return x, qkv


class PixArtTransformer2DModel(nnx.Module):
    """`model(latents, t, caption, layers=None, hidden=False)` → (output `[B, h, w, Zo]`, Taps of the chosen
    self-attention layers; with `hidden` also each chosen block's output `[B, N, C]` in `Taps.hidden`).

    latents `[B, h, w, Z]` (h, w multiples of p); t a scalar or `[B]` (float or int timesteps in [0, 1000));
    caption `[B, M, Ct]` (or `[1, M, Ct]`, broadcast over the batch).
    """

    def __init__(self, cfg: PixArtConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        c, p = cfg.inner_dim, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.adaln_single = AdaLayerNormSingle(c, dtype=dtype, rngs=rngs)
        self.caption_projection = (CaptionProjection(cfg.caption_channels, c, dtype=dtype, rngs=rngs)
                                   if cfg.caption_channels is not None else None)
        self.transformer_blocks = nnx.List([PixArtBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nnx.Param(jnp.zeros((2, c), dtype))
        self.proj_out = linear(c, p * p * cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, latents, t, caption, layers: Sequence[int] | None = None, hidden: bool = False):
        cfg, p = self.cfg, self.cfg.patch_size
        b, h, w, _ = latents.shape
        if h % p or w % p:
            raise ValueError(f"latent sides {h}×{w} must be multiples of the patch size {p}")
        chosen = set(resolve_layers(layers, cfg.num_layers, "self-attention layers"))
        grid = (h // p, w // p)
        x = self.pos_embed(latents)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        m, e = self.adaln_single(t, x.dtype)
        caption = jnp.broadcast_to(caption, (b, *caption.shape[1:])).astype(x.dtype)
        if self.caption_projection is not None:
            caption = self.caption_projection(caption)
        taps, states = {}, {}
        for i, block in enumerate(self.transformer_blocks):
            x, (q, k, v) = block(x, m, caption)
            if i in chosen:
                taps[i] = LayerTap(q, k, v, grid, 0)
                if hidden:
                    states[i] = x
        shift, scale = (self.scale_shift_table[...][None] + e[:, None]).swapaxes(0, 1)[:, :, None]    # [B, 1, C] each
        x = self.proj_out(modulate(layer_norm(x, 1e-6), shift, scale))           # [B, N, p·p·Zo]
        out = x.reshape(b, *grid, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
        return out, Taps(taps, states)
