"""Stable Diffusion 1.x/2.x `UNet2DConditionModel` (Flax NNX, NHWC) with q/k/v taps of every self-attention.

    unet = UNet2DConditionModel(UNET_PRESETS["sd15"], rngs=nnx.Rngs(0))       # or sd.params.load_unet(dir)
    eps, taps = unet(latents, t, text)      # latents [B, h, w, 4], t [B] or scalar, text [B, 77, Cc]

Structure (diffusers' names): conv_in → time_proj/time_embedding → down_blocks (CrossAttnDownBlock2D ×3,
DownBlock2D) → mid_block (UNetMidBlock2DCrossAttn) → up_blocks (UpBlock2D, CrossAttnUpBlock2D ×3, skip
connections concatenated on channels) → conv_norm_out → SiLU → conv_out. Every attention block is a
Transformer2DModel: GroupNorm → proj_in (1×1 conv, or Linear with `use_linear_projection`) → BasicTransformerBlock
(x += attn1(norm1 x) [self]; x += attn2(norm2 x, text) [cross]; x += ff(norm3 x) [GEGLU]) → proj_out → + residual.

Taps: the raw q/k/v of every `attn1` (self-attention), in network order, `[B, H, h*w, D]` with the block's grid.
SD 1.x at 512² (latent 64²): 16 layers — down 6 (grids 64, 64, 32, 32, 16, 16), mid 1 (8), up 9 (16 ×3, 32 ×3,
64 ×3); 8 heads of dims 40/80/160. SD 2.x: head dim 64 (5/10/20 heads).

Shape legend
    B  batch   (h, w)  latent / feature grid   C  channels   E  time-embedding width (4·C0)
    M  text tokens (77)   Cc  text width (768 SD1, 1024 SD2)   H  heads   D  head dim   N = h*w
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.sd.config import DOWN_TYPES, UP_TYPES, UNetConfig  # noqa: F401  (re-exported)
from spectral_jax.models.sd.layers import (Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm,
                                           layer_norm, linear)
from spectral_jax.taps import LayerTap, Taps


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0, max_period: float = 10000.0):
    """diffusers `get_timestep_embedding`: t `[B]` → `[B, dim]`, [sin(t·f), cos(t·f)] (cos first when flipped),
    f_j = exp(−ln(max_period) · j / (dim/2 − shift)), computed in float32 as the reference does."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_2(silu(linear_1(t_emb))): `[B, C0]` → `[B, E]`."""

    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(c_in, c_out, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(c_out, c_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
    """h, gate = split(proj(x)); h · gelu(gate) (exact, erf)."""

    def __init__(self, dim: int, inner: int, *, dtype, rngs: nnx.Rngs):
        self.proj = linear(dim, 2 * inner, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """net = [GEGLU(dim → 4·dim), dropout (no parameters), Linear(4·dim → dim)]."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.net = nnx.List([GEGLU(dim, 4 * dim, dtype=dtype, rngs=rngs), None,
                             linear(4 * dim, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm (eps 1e-5), residuals."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int, cfg: UNetConfig, *, dtype, rngs):
        kw = dict(upcast=cfg.upcast_attention, chunk=cfg.attn_chunk, dtype=dtype, rngs=rngs)
        self.norm1 = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(dim, heads, head_dim, **kw)
        self.norm2 = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)
        self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim=cross_dim, **kw)
        self.norm3 = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, context):
        y, qkv = self.attn1(self.norm1(x))
        x = x + y
        x = x + self.attn2(self.norm2(x), context)[0]
        x = x + self.ff(self.norm3(x))
        return x, qkv


class Transformer2DModel(nnx.Module):
    """The spatial transformer of a UNet level: `[B, h, w, C]` → `[B, h, w, C]`, appending each block's
    self-attention (q, k, v, grid) to `sink`."""

    def __init__(self, c: int, heads: int, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs):
        self.linear = cfg.use_linear_projection
        self.norm = group_norm(c, cfg.norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
        proj = ((lambda: linear(c, c, dtype=dtype, rngs=rngs)) if self.linear
                else (lambda: conv(c, c, 1, padding=0, dtype=dtype, rngs=rngs)))
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(c, heads, c // heads, cfg.cross_attention_dim, cfg, dtype=dtype, rngs=rngs)
            for _ in range(cfg.transformer_layers_per_block)])
        self.proj_out = proj()

    def __call__(self, x, context, sink: list):
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)                      # 1×1 conv on the map
        x = x.reshape(b, h * w, c)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x, qkv = block(x, context)
            sink.append((*qkv, (h, w)))
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c)
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


def _resnet(c_in, c_out, cfg: UNetConfig, scale=1.0, *, dtype, rngs):
    return ResnetBlock2D(c_in, c_out, cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                         output_scale_factor=scale, dtype=dtype, rngs=rngs)


class DownBlock2D(nnx.Module):
    """`layers_per_block` ResnetBlock2D (+ Transformer2DModel after each, for CrossAttnDownBlock2D), then an
    optional stride-2 downsampler. Returns (x, skip states: the output of each layer and of the downsampler)."""

    def __init__(self, c_in: int, c_out: int, heads: int, cross: bool, downsample: bool, cfg: UNetConfig, *,
                 dtype, rngs: nnx.Rngs):
        n = cfg.layers_per_block
        self.resnets = nnx.List([_resnet(c_in if i == 0 else c_out, c_out, cfg, dtype=dtype, rngs=rngs)
                                 for i in range(n)])
        self.attentions = (nnx.List([Transformer2DModel(c_out, heads, cfg, dtype=dtype, rngs=rngs) for _ in range(n)])
                           if cross else None)
        self.downsamplers = (nnx.List([Downsample2D(c_out, cfg.downsample_padding, dtype=dtype, rngs=rngs)])
                             if downsample else None)

    def __call__(self, x, temb, context, sink):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, sink)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet → (transformer → resnet); channels unchanged."""

    def __init__(self, c: int, heads: int, cfg: UNetConfig, *, dtype, rngs: nnx.Rngs):
        s = cfg.mid_block_scale_factor
        self.resnets = nnx.List([_resnet(c, c, cfg, s, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(c, heads, cfg, dtype=dtype, rngs=rngs)])

    def __call__(self, x, temb, context, sink):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, sink)
        return self.resnets[1](x, temb)


class UpBlock2D(nnx.Module):
    """`layers_per_block + 1` × (concatenate the next skip state on channels → ResnetBlock2D (→ transformer, for
    CrossAttnUpBlock2D)), then an optional ×2 nearest upsampler + conv."""

    def __init__(self, c_in: int, c_out: int, c_prev: int, heads: int, cross: bool, upsample: bool,
                 cfg: UNetConfig, *, dtype, rngs: nnx.Rngs):
        n = cfg.layers_per_block + 1
        resnets = []
        for i in range(n):
            skip = c_in if i == n - 1 else c_out
            resnets.append(_resnet((c_prev if i == 0 else c_out) + skip, c_out, cfg, dtype=dtype, rngs=rngs))
        self.resnets = nnx.List(resnets)
        self.attentions = (nnx.List([Transformer2DModel(c_out, heads, cfg, dtype=dtype, rngs=rngs) for _ in range(n)])
                           if cross else None)
        self.upsamplers = nnx.List([Upsample2D(c_out, dtype=dtype, rngs=rngs)]) if upsample else None

    def __call__(self, x, skips: list, temb, context, sink, size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context, sink)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNet2DConditionModel(nnx.Module):
    """`model(sample, timesteps, context, layers=None)` → (noise prediction `[B, h, w, C_out]`, Taps).

    sample `[B, h, w, 4]` latents (any h, w ≥ 1; sides that are not multiples of `cfg.downscale` are handled as
    diffusers does, by upsampling to the skip connection's size); timesteps: scalar or `[B]` (int or float);
    context `[B, M, Cc]` text embeddings. Taps: q/k/v `[B, H, h_l*w_l, D]` of the chosen self-attention layers
    (indices into `cfg.attn_layers()`, None → all).
    """

    def __init__(self, cfg: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        ch = cfg.block_out_channels
        self.conv_in = conv(cfg.in_channels, ch[0], dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, dtype=dtype, rngs=rngs)
        down, c_out = [], ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            c_in, c_out = c_out, ch[i]
            down.append(DownBlock2D(c_in, c_out, cfg.num_attention_heads[i], kind.startswith("CrossAttn"),
                                    i < len(ch) - 1, cfg, dtype=dtype, rngs=rngs))
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], cfg.num_attention_heads[-1], cfg, dtype=dtype, rngs=rngs)
        rev, rev_heads, up = ch[::-1], cfg.num_attention_heads[::-1], []
        c_out = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            c_prev, c_out, c_in = c_out, rev[i], rev[min(i + 1, len(ch) - 1)]
            up.append(UpBlock2D(c_in, c_out, c_prev, rev_heads[i], kind.startswith("CrossAttn"), i < len(ch) - 1,
                                cfg, dtype=dtype, rngs=rngs))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(ch[0], cfg.norm_num_groups, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[0], cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, sample, timesteps, context, *, layers: Sequence[int] | None = None):
        cfg = self.cfg
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, h, w, {cfg.in_channels}] latents, got {sample.shape}")
        chosen = resolve_layers(layers, cfg.num_layers, "self-attention layers")
        b = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.astype(sample.dtype))                   # [B, E]
        context = jnp.asarray(context, sample.dtype)
        sink: list = []
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context, sink)
            skips += s
        x = self.mid_block(x, temb, context, sink)
        fit = any(d % cfg.downscale for d in sample.shape[1:3])  # odd sizes: upsample to the skip's size
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[1:3] if fit and i < len(self.up_blocks) - 1 else None
            x = block(x, mine, temb, context, sink, size)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        taps = {i: LayerTap(sink[i][0], sink[i][1], sink[i][2], sink[i][3], 0) for i in chosen}
        return x, Taps(taps)


def jit_forward(model: UNet2DConditionModel, *, layers: Sequence[int] | None = None, taps_only: bool = False):
    """A compiled `(sample, timesteps, context) -> (noise prediction, Taps)` (one trace per input shape).

    taps_only: return only the Taps (XLA then drops the work after the last tapped layer).
    """
    chosen = resolve_layers(layers, model.cfg.num_layers, "self-attention layers")
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, sample, timesteps, context):
        out, taps = nnx.merge(graphdef, state)(sample, timesteps, context, layers=chosen)
        return taps if taps_only else (out, taps)

    return lambda sample, timesteps, context: run(state, sample, timesteps, context)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
