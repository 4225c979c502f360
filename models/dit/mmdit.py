"""SD3 / SD3.5's MM-DiT, diffusers' `SD3Transformer2DModel` (Flax NNX, NHWC latents), with q/k/v taps of the
image-token block of every joint attention.

    model = SD3Transformer2DModel(SD3Config(), rngs=nnx.Rngs(0))        # or dit.params.load_transformer(dir)
    out, taps = model(latents, t, (context, pooled))   # latents [B, h, w, 16], t σ·1000, context [B, M, Cj],
                                                       # pooled [B, Cp]
Structure (diffusers' names):
    pos_embed        p×p stride-p conv (`proj`) + the centre crop of a fixed (max × max) sin-cos table (a buffer in
                     the checkpoint, `pos_embed.pos_embed`; h/p, w/p ≤ pos_embed_max_size)
    time_text_embed  c = timestep_embedder(sincos₂₅₆(t)) + text_embedder(pooled)   (linear, SiLU, linear each)
    context_embedder linear Cj → C on the text tokens
    transformer_blocks (two streams, x image tokens and y text tokens, one joint attention):
        (shift, scale, gate)×2 = norm1.linear(SiLU(c)) for x, norm1_context.linear(SiLU(c)) for y
        q, k, v = to_q/to_k/to_v(LN(x)·(1 + scale) + shift); q', k', v' = add_{q,k,v}_proj(… y …)
        (SD3.5: RMS q/k norms per head: norm_q, norm_k, norm_added_q, norm_added_k)
        o = softmax([q; q'] [k; k']ᵀ/√D) [v; v'] over all N + M tokens; x += gate · to_out(o_x)
        x += gate_mlp · ff(LN(x)·(1 + scale_mlp) + shift_mlp)        y likewise (to_add_out, ff_context)
        The last block is `context_pre_only`: y is only read (norm1_context is AdaLayerNormContinuous, no output).
    norm_out         LN(x)·(1 + scale) + shift with (scale, shift) = linear(SiLU(c)) (scale first); proj_out
LN: LayerNorm without affine parameters, eps 1e-6.

Taps: q, k, v of the image tokens only, `[B, H, N, D]` (after the SD3.5 q/k norms: what the attention compares).
A graph built from them is softmax over image keys only: the joint attention's image→image block re-normalised
over image tokens, as the official code does when it drops DINO's CLS token.

Shape legend
    B  batch   (h, w)  latent grid   p  patch   N = (h/p)·(w/p) image tokens   M  text tokens   C  width (H·D)
    H  heads   D  head dim   Cj  text-token width (4096)   Cp  pooled-text width (2048)   Z  latent channels
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.dit.config import SD3Config
from spectral_jax.models.dit.pixart import FeedForward, layer_norm, modulate
from spectral_jax.models.sd.layers import conv, linear
from spectral_jax.models.sd.unet import TimestepEmbedding, timestep_embedding
from spectral_jax.taps import LayerTap, Taps


def rms_norm(x, weight, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.square(x.astype(jnp.float32)).mean(-1, keepdims=True) + eps).astype(x.dtype) * weight


class RMSNorm(nnx.Module):
    def __init__(self, d: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jnp.ones((d,), dtype))

    def __call__(self, x):
        return rms_norm(x, self.weight[...])


class PatchEmbed(nnx.Module):
    """`[B, h, w, Z]` → `[B, N, C]`: patches + the centre crop of the (max × max) position table."""

    def __init__(self, cfg: SD3Config, *, dtype, rngs: nnx.Rngs):
        self.max = cfg.pos_embed_max_size
        self.proj = conv(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size, padding=0,
                         dtype=dtype, rngs=rngs)
        self.pos_embed = nnx.Param(jnp.zeros((1, self.max ** 2, cfg.inner_dim), dtype))

    def __call__(self, x):
        x = self.proj(x)
        b, gh, gw, c = x.shape
        if gh > self.max or gw > self.max:
            raise ValueError(f"a {gh}×{gw} token grid exceeds the position table ({self.max}×{self.max})")
        top, left = (self.max - gh) // 2, (self.max - gw) // 2
        pos = self.pos_embed[...].reshape(self.max, self.max, c)[top:top + gh, left:left + gw]
        return (x + pos[None].astype(x.dtype)).reshape(b, gh * gw, c)


class TextProjection(nnx.Module):
    """linear_1 → SiLU → linear_2 (diffusers `PixArtAlphaTextProjection(act_fn="silu")`)."""

    def __init__(self, c_in: int, c: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(c_in, c, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
    def __init__(self, cfg: SD3Config, *, dtype, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, cfg.inner_dim, dtype=dtype, rngs=rngs)
        self.text_embedder = TextProjection(cfg.pooled_projection_dim, cfg.inner_dim, dtype=dtype, rngs=rngs)

    def __call__(self, t, pooled):
        return self.timestep_embedder(timestep_embedding(t, 256, True, 0.0).astype(pooled.dtype)) + \
            self.text_embedder(pooled)


class AdaLN(nnx.Module):
    """`linear(SiLU(c))` split into `n` `[B, C]` chunks."""

    def __init__(self, c: int, n: int, *, dtype, rngs: nnx.Rngs):
        self.n = n
        self.linear = linear(c, n * c, dtype=dtype, rngs=rngs)

    def __call__(self, c):
        return jnp.split(self.linear(jax.nn.silu(c))[:, None], self.n, axis=-1)    # n × [B, 1, C]


class JointAttention(nnx.Module):
    """Image tokens x `[B, N, C]` and text tokens y `[B, M, C]` attend jointly; returns (x out, y out or None,
    image q/k/v `[B, H, N, D]`)."""

    def __init__(self, cfg: SD3Config, pre_only: bool, *, dtype, rngs: nnx.Rngs):
        c, self.heads = cfg.inner_dim, cfg.num_attention_heads
        lin = lambda: linear(c, c, dtype=dtype, rngs=rngs)
        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.add_q_proj, self.add_k_proj, self.add_v_proj = lin(), lin(), lin()
        self.to_out = nnx.List([lin()])
        self.to_add_out = None if pre_only else lin()
        norm = (lambda: RMSNorm(cfg.attention_head_dim, dtype=dtype, rngs=rngs)) if cfg.qk_norm else (lambda: None)
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = norm(), norm(), norm(), norm()

    def __call__(self, x, y):
        b, n, _ = x.shape
        split = lambda a: a.reshape(b, a.shape[1], self.heads, -1)                   # [B, T, H, D]
        maybe = lambda f, a: a if f is None else f(a)
        q, k, v = maybe(self.norm_q, split(self.to_q(x))), maybe(self.norm_k, split(self.to_k(x))), split(self.to_v(x))
        qc = maybe(self.norm_added_q, split(self.add_q_proj(y)))
        kc = maybe(self.norm_added_k, split(self.add_k_proj(y)))
        vc = split(self.add_v_proj(y))
        o = jax.nn.dot_product_attention(jnp.concatenate([q, qc], 1), jnp.concatenate([k, kc], 1),
                                         jnp.concatenate([v, vc], 1))
        o = o.reshape(b, o.shape[1], -1)
        out_y = None if self.to_add_out is None else self.to_add_out(o[:, n:])
        heads_first = lambda a: a.transpose(0, 2, 1, 3)
        return self.to_out[0](o[:, :n]), out_y, (heads_first(q), heads_first(k), heads_first(v))


class JointTransformerBlock(nnx.Module):
    def __init__(self, cfg: SD3Config, pre_only: bool, *, dtype, rngs: nnx.Rngs):
        c = cfg.inner_dim
        self.pre_only = pre_only
        self.norm1 = AdaLN(c, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLN(c, 2 if pre_only else 6, dtype=dtype, rngs=rngs)
        self.attn = JointAttention(cfg, pre_only, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(c, dtype=dtype, rngs=rngs)
        self.ff_context = None if pre_only else FeedForward(c, dtype=dtype, rngs=rngs)

    def __call__(self, x, y, temb):
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        if self.pre_only:
            c_scale, c_shift = self.norm1_context(temb)                                # AdaLayerNormContinuous
            ny = modulate(layer_norm(y, 1e-6), c_shift, c_scale)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            ny = modulate(layer_norm(y, 1e-6), c_shift, c_scale)
        a, a_y, qkv = self.attn(modulate(layer_norm(x, 1e-6), shift, scale), ny)
        x = x + gate * a
        x = x + gate_mlp * self.ff(modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp))
        if self.pre_only:
            return x, None, qkv
        y = y + c_gate * a_y
        y = y + c_gate_mlp * self.ff_context(modulate(layer_norm(y, 1e-6), c_shift_mlp, c_scale_mlp))
        return x, y, qkv


class SD3Transformer2DModel(nnx.Module):
    """`model(latents, t, (context, pooled), layers=None, hidden=False)` → (output `[B, h, w, Zo]`, Taps of the
    chosen blocks' image tokens; with `hidden` also each chosen block's image-token output in `Taps.hidden`).

    t: the flow timestep σ·1000 (scalar or `[B]`); context `[B or 1, M, Cj]`, pooled `[B or 1, Cp]`.
    """

    def __init__(self, cfg: SD3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        c, p = cfg.inner_dim, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.time_text_embed = TimeTextEmbed(cfg, dtype=dtype, rngs=rngs)
        self.context_embedder = linear(cfg.joint_attention_dim, c, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([JointTransformerBlock(cfg, i == cfg.num_layers - 1, dtype=dtype,
                                                                  rngs=rngs) for i in range(cfg.num_layers)])
        self.norm_out = AdaLN(c, 2, dtype=dtype, rngs=rngs)
        self.proj_out = linear(c, p * p * cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, latents, t, text, layers: Sequence[int] | None = None, hidden: bool = False):
        cfg, p = self.cfg, self.cfg.patch_size
        context, pooled = text
        b, h, w, _ = latents.shape
        if h % p or w % p:
            raise ValueError(f"latent sides {h}×{w} must be multiples of the patch size {p}")
        chosen = set(resolve_layers(layers, cfg.num_layers, "joint-attention layers"))
        grid = (h // p, w // p)
        x = self.pos_embed(latents)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        pooled = jnp.broadcast_to(pooled, (b, pooled.shape[-1])).astype(x.dtype)
        temb = self.time_text_embed(t, pooled)
        y = self.context_embedder(jnp.broadcast_to(context, (b, *context.shape[1:])).astype(x.dtype))
        taps, states = {}, {}
        for i, block in enumerate(self.transformer_blocks):
            x, y, (q, k, v) = block(x, y, temb)
            if i in chosen:
                taps[i] = LayerTap(q, k, v, grid, 0)
                if hidden:
                    states[i] = x
        scale, shift = self.norm_out(temb)
        x = self.proj_out(modulate(layer_norm(x, 1e-6), shift, scale))
        out = x.reshape(b, *grid, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)
        return out, Taps(taps, states)
