"""FLUX.1's `FluxTransformer2DModel` (Flax NNX, NHWC latents, 2×2 packing inside), with q/k/v taps of the image
tokens of every double-stream and single-stream block, after the rotary embedding.

    model = FluxTransformer2DModel(FluxConfig(), rngs=nnx.Rngs(0))     # or dit.params.load_transformer(dir)
    out, taps = model(latents, t, (context, pooled))   # latents [B, h, w, 16], t σ·1000, context [B, M, Cj],
                                                       # pooled [B, Cp]; guidance from the config (dev: 3.5)
Structure (diffusers' names):
    packing          [B, h, w, Z] → [B, N, 4Z] (2×2 patches, channel order (z, row, col), the pipeline's
                     `_pack_latents`); x_embedder linear 4Z → C; context_embedder linear Cj → C
    time_text_embed  c = timestep_embedder(sincos₂₅₆(t)) [+ guidance_embedder(sincos₂₅₆(1000·g))] + text_embedder(pooled)
    rotary           ids: text (0, 0, 0), image (0, row, col); per axis d_a of axes_dims_rope, angles p·θ^(−2j/d_a),
                     each frequency repeated for the pair (x_{2j}, x_{2j+1}) it rotates
    transformer_blocks (double stream): as SD3's joint block with RMS q/k norms, the sequence [text; image], RoPE on
                     q and k; single_transformer_blocks: one stream [text; image], (shift, scale, gate) =
                     norm.linear(SiLU(c)), h = LN(x)(1 + scale) + shift, x += gate · proj_out([attn(h), GELU(proj_mlp(h))])
    norm_out, proj_out  as SD3's head; then unpacking
Tapped layers: the double-stream blocks 0..L−1, then the single-stream blocks L..L+S−1. Taps: image-token q and k
after the q/k norms and the rotary embedding (what the attention compares), v, `[B, H, N, D]`; graphs built from
them renormalise the softmax over image tokens (as for SD3).

Shape legend
    B  batch   (h, w)  latent grid   N = (h/2)·(w/2) image tokens   M  text tokens   C  width (H·D)   H  heads
    D  head dim   Z  latent channels (16)   Cj  text-token width (4096)   Cp  pooled width (768)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.dit.config import FluxConfig
from spectral_jax.models.dit.mmdit import AdaLN, RMSNorm, TextProjection
from spectral_jax.models.dit.pixart import FeedForward, layer_norm, modulate
from spectral_jax.models.sd.layers import linear
from spectral_jax.models.sd.unet import TimestepEmbedding, timestep_embedding
from spectral_jax.taps import LayerTap, Taps


def rotary_tables(axes_dims: Sequence[int], grid: tuple[int, int], text_tokens: int, theta: float = 10000.0):
    """(cos, sin) `[M + N, D]` float32 for the ids [text (0,0,0) ×M; image (0, row, col) row-major]
    (diffusers `FluxPosEmbed`; frequencies in float64 as the reference)."""
    h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ids = np.concatenate([np.zeros((text_tokens, 3)),
                          np.stack([np.zeros(h * w), rows.reshape(-1), cols.reshape(-1)], 1)]).astype(np.float32)
    cos, sin = [], []
    for a, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.outer(ids[:, a].astype(np.float64), freqs)
        cos.append(np.repeat(np.cos(ang), 2, axis=1))
        sin.append(np.repeat(np.sin(ang), 2, axis=1))
    return np.concatenate(cos, 1).astype(np.float32), np.concatenate(sin, 1).astype(np.float32)


def rotate(x, cos, sin):
    """x `[B, T, H, D]`; pairs (x_{2j}, x_{2j+1}) rotated: x·cos + (−x_{2j+1}, x_{2j})·sin."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


class FluxAttention(nnx.Module):
    """q/k/v (+ RMS norms) of one stream, and of the text stream when `added` (double-stream blocks)."""

    def __init__(self, cfg: FluxConfig, added: bool, out: bool, *, dtype, rngs: nnx.Rngs):
        c, d = cfg.inner_dim, cfg.attention_head_dim
        self.heads = cfg.num_attention_heads
        lin = lambda: linear(c, c, dtype=dtype, rngs=rngs)
        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.norm_q, self.norm_k = RMSNorm(d, dtype=dtype, rngs=rngs), RMSNorm(d, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([lin()]) if out else None
        if added:
            self.add_q_proj, self.add_k_proj, self.add_v_proj, self.to_add_out = lin(), lin(), lin(), lin()
            self.norm_added_q = RMSNorm(d, dtype=dtype, rngs=rngs)
            self.norm_added_k = RMSNorm(d, dtype=dtype, rngs=rngs)

    def project(self, x, q, k, v, nq, nk):
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, -1)
        return nq(split(q(x))), nk(split(k(x))), split(v(x))


def _attend(q, k, v, cos, sin):
    """RoPE on q, k `[B, T, H, D]`, attention; returns (output `[B, T, C]`, rotated q, k)."""
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    o = jax.nn.dot_product_attention(q, k, v)
    return o.reshape(o.shape[0], o.shape[1], -1), q, k


def _image_taps(q, k, v, m):
    heads_first = lambda a: a[:, m:].transpose(0, 2, 1, 3)
    return heads_first(q), heads_first(k), heads_first(v)


class FluxTransformerBlock(nnx.Module):
    """Double stream: x image `[B, N, C]`, y text `[B, M, C]` → (x, y, image q/k/v)."""

    def __init__(self, cfg: FluxConfig, *, dtype, rngs: nnx.Rngs):
        c = cfg.inner_dim
        self.norm1 = AdaLN(c, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLN(c, 6, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(cfg, True, True, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(c, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(c, dtype=dtype, rngs=rngs)

    def __call__(self, x, y, temb, cos, sin):
        a, m = self.attn, y.shape[1]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
        qi, ki, vi = a.project(modulate(layer_norm(x, 1e-6), shift, scale), a.to_q, a.to_k, a.to_v, a.norm_q,
                               a.norm_k)
        qt, kt, vt = a.project(modulate(layer_norm(y, 1e-6), c_shift, c_scale), a.add_q_proj, a.add_k_proj,
                               a.add_v_proj, a.norm_added_q, a.norm_added_k)
        v = jnp.concatenate([vt, vi], 1)
        o, q, k = _attend(jnp.concatenate([qt, qi], 1), jnp.concatenate([kt, ki], 1), v, cos, sin)
        x = x + gate * a.to_out[0](o[:, m:])
        x = x + gate_mlp * self.ff(modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp))
        y = y + c_gate * a.to_add_out(o[:, :m])
        y = y + c_gate_mlp * self.ff_context(modulate(layer_norm(y, 1e-6), c_shift_mlp, c_scale_mlp))
        return x, y, _image_taps(q, k, v, m)


class FluxSingleTransformerBlock(nnx.Module):
    """Single stream: s = [text; image] `[B, M + N, C]` → (s, image q/k/v); `m` text tokens."""

    def __init__(self, cfg: FluxConfig, *, dtype, rngs: nnx.Rngs):
        c, hidden = cfg.inner_dim, int(cfg.inner_dim * cfg.mlp_ratio)
        self.norm = AdaLN(c, 3, dtype=dtype, rngs=rngs)
        self.proj_mlp = linear(c, hidden, dtype=dtype, rngs=rngs)
        self.proj_out = linear(c + hidden, c, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(cfg, False, False, dtype=dtype, rngs=rngs)

    def __call__(self, s, m, temb, cos, sin):
        a = self.attn
        shift, scale, gate = self.norm(temb)
        h = modulate(layer_norm(s, 1e-6), shift, scale)
        q, k, v = a.project(h, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k)
        o, q, k = _attend(q, k, v, cos, sin)
        s = s + gate * self.proj_out(jnp.concatenate([o, jax.nn.gelu(self.proj_mlp(h), approximate=True)], -1))
        return s, _image_taps(q, k, v, m)


class TimeGuidanceTextEmbed(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, dtype, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = (TimestepEmbedding(256, cfg.inner_dim, dtype=dtype, rngs=rngs)
                                  if cfg.guidance_embeds else None)
        self.text_embedder = TextProjection(cfg.pooled_projection_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, t, guidance, pooled):
        emb = lambda e, v: e(timestep_embedding(v, 256, True, 0.0).astype(pooled.dtype))
        c = emb(self.timestep_embedder, t) + self.text_embedder(pooled)
        return c if self.guidance_embedder is None else c + emb(self.guidance_embedder, guidance)


class FluxTransformer2DModel(nnx.Module):
    """`model(latents, t, (context, pooled), layers=None, hidden=False)` → (output `[B, h, w, Z]`, Taps; with
    `hidden` also each chosen block's image-token output). t: σ·1000 (scalar or `[B]`)."""

    def __init__(self, cfg: FluxConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.inner_dim
        self.time_text_embed = TimeGuidanceTextEmbed(cfg, dtype=dtype, rngs=rngs)
        self.context_embedder = linear(cfg.joint_attention_dim, c, dtype=dtype, rngs=rngs)
        self.x_embedder = linear(4 * cfg.in_channels, c, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([FluxTransformerBlock(cfg, dtype=dtype, rngs=rngs)
                                            for _ in range(cfg.num_double_layers)])
        self.single_transformer_blocks = nnx.List([FluxSingleTransformerBlock(cfg, dtype=dtype, rngs=rngs)
                                                   for _ in range(cfg.num_single_layers)])
        self.norm_out = AdaLN(c, 2, dtype=dtype, rngs=rngs)
        self.proj_out = linear(c, 4 * cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, latents, t, text, layers: Sequence[int] | None = None, hidden: bool = False):
        cfg = self.cfg
        context, pooled = text
        b, h, w, z = latents.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent sides {h}×{w} must be even (2×2 packing)")
        grid = (h // 2, w // 2)
        chosen = set(resolve_layers(layers, cfg.num_layers, "attention layers"))
        packed = latents.reshape(b, grid[0], 2, grid[1], 2, z).transpose(0, 1, 3, 5, 2, 4).reshape(b, -1, 4 * z)
        x = self.x_embedder(packed)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        pooled = jnp.broadcast_to(pooled, (b, pooled.shape[-1])).astype(x.dtype)
        temb = self.time_text_embed(t, jnp.full((b,), 1000.0 * cfg.guidance, jnp.float32), pooled)
        y = self.context_embedder(jnp.broadcast_to(context, (b, *context.shape[1:])).astype(x.dtype))
        m = y.shape[1]
        cos, sin = (jnp.asarray(a, x.dtype) for a in rotary_tables(cfg.axes_dims_rope, grid, m))
        taps, states = {}, {}

        def keep(i, qkv, image):
            if i in chosen:
                taps[i] = LayerTap(*qkv, grid, 0)
                if hidden:
                    states[i] = image

        for i, block in enumerate(self.transformer_blocks):
            x, y, qkv = block(x, y, temb, cos, sin)
            keep(i, qkv, x)
        s = jnp.concatenate([y, x], 1)
        for j, block in enumerate(self.single_transformer_blocks):
            s, qkv = block(s, m, temb, cos, sin)
            keep(cfg.num_double_layers + j, qkv, s[:, m:])
        scale, shift = self.norm_out(temb)
        x = self.proj_out(modulate(layer_norm(s[:, m:], 1e-6), shift, scale))        # [B, N, 4Z]
        out = x.reshape(b, *grid, cfg.out_channels, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, -1)
        return out, Taps(taps, states)
