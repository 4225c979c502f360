"""Building blocks shared by the Stable Diffusion UNet and VAE encoder (Flax NNX, NHWC), mirroring `diffusers`.

Attribute names follow `diffusers` (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`, `to_q`, `to_k`, `to_v`,
`to_out`, `group_norm`, `conv`), so the weight tables in `sd_weights.py` are nearly the identity.

Shape legend
    B  batch    (h, w)  feature-map grid    C  channels    N = h*w tokens    H  heads    D  head dim
    E  time-embedding width    M  context tokens (text)    Cc  context width
Feature maps are NHWC `[B, h, w, C]` (diffusers: NCHW); token sequences `[B, N, C]` in row-major (h, w) order,
which is the order diffusers' `permute(0, 2, 3, 1).reshape(B, h*w, C)` produces.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _init(std=0.02):  # used when a module is built directly; loaders fill the abstract state instead
    return nnx.initializers.normal(std)


def linear(c_in: int, c_out: int, *, bias: bool = True, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(c_in, c_out, use_bias=bias, kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)


def conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding=1, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """torch `Conv2d(c_in, c_out, kernel, stride, padding)`; `padding` an int (symmetric) or ((t, b), (l, r))."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nnx.Conv(c_in, c_out, (kernel, kernel), strides=(stride, stride), padding=pad, kernel_init=_init(),
                    dtype=dtype, param_dtype=dtype, rngs=rngs)


def group_norm(c: int, groups: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Two-pass variance E[(x-μ)²] as torch computes it (E[x²]-μ² loses digits on large activations).
    return nnx.GroupNorm(c, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype,
                         rngs=rngs)


def layer_norm(c: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(c, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=dtype, rngs=rngs)


def attend(q, k, v, *, upcast: bool = False, chunk: int | None = None):
    """softmax(q kᵀ/√D) v per head: q `[B, N, H, D]`, k/v `[B, M, H, D]` → `[B, N, H, D]`.

    upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`). chunk: process queries
    in blocks of that many rows (memory O(chunk·M) per head instead of O(N·M)); the result is the same.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    n = q.shape[1]
    if chunk is None or n <= chunk or n % chunk:
        out = jax.nn.dot_product_attention(q, k, v)
    else:
        b, _, h, d = q.shape
        blocks = q.reshape(b, n // chunk, chunk, h, d).swapaxes(0, 1)       # [n/chunk, B, chunk, H, D]
        out = jax.lax.map(lambda qb: jax.nn.dot_product_attention(qb, k, v), blocks)
        out = out.swapaxes(0, 1).reshape(b, n, h, d)
    return out.astype(dtype)


class Attention(nnx.Module):
    """diffusers `Attention` (AttnProcessor2_0 path): multi-head self- or cross-attention on tokens.

    x `[B, N, C]` (or a map `[B, h, w, C]` when `group_norm` is used, as the VAE's mid-block attention), context
    `[B, M, Cc]` for cross-attention. Returns (output, (q, k, v) `[B, H, N|M, D]`, the raw projections before
    the 1/√D scaling). With `residual_connection` the input is added back and the sum divided by
    `rescale_output_factor`, as diffusers does.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, cross_attention_dim: int | None = None,
                 bias: bool = False, out_bias: bool = True, norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0, upcast: bool = False,
                 chunk: int | None = None, dtype, rngs: nnx.Rngs):
        inner, ctx = heads * dim_head, cross_attention_dim or query_dim
        self.heads, self.upcast, self.chunk = heads, upcast, chunk
        self.residual_connection, self.rescale_output_factor = residual_connection, rescale_output_factor
        self.group_norm = (group_norm(query_dim, norm_num_groups, eps, dtype=dtype, rngs=rngs)
                           if norm_num_groups is not None else None)
        self.to_q = linear(query_dim, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(ctx, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(ctx, inner, bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([linear(inner, query_dim, bias=out_bias, dtype=dtype, rngs=rngs)])  # [1]: dropout

    def __call__(self, x, context=None):
        residual, spatial = x, x.ndim == 4
        if spatial:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
        if self.group_norm is not None:
            x = self.group_norm(x)  # over (tokens, channels-in-group): the same statistics as on the map
        ctx = x if context is None else context
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, -1)  # [B, N, H, D]
        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        out = attend(q, k, v, upcast=self.upcast, chunk=self.chunk).reshape(b, n, -1)
        out = self.to_out[0](out)
        if spatial:
            out = out.reshape(residual.shape)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        heads_first = lambda y: y.transpose(0, 2, 1, 3)
        return out, (heads_first(q), heads_first(k), heads_first(v))


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` ("default" time-embedding norm, pre-norm, SiLU):

        h = conv1(silu(norm1(x))) (+ time_emb_proj(silu(temb)))      h = conv2(silu(norm2(h)))
        out = (shortcut(x) + h) / output_scale_factor                 shortcut = 1×1 conv when C_in ≠ C_out

    x `[B, h, w, C_in]`, temb `[B, E]` or None → `[B, h, w, C_out]`.
    """

    def __init__(self, c_in: int, c_out: int, temb_channels: int | None, *, groups: int, eps: float,
                 groups_out: int | None = None, output_scale_factor: float = 1.0, dtype, rngs: nnx.Rngs):
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(c_in, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(c_in, c_out, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (linear(temb_channels, c_out, dtype=dtype, rngs=rngs)
                              if temb_channels is not None else None)
        self.norm2 = group_norm(c_out, groups_out or groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(c_out, c_out, dtype=dtype, rngs=rngs)
        self.conv_shortcut = conv(c_in, c_out, 1, padding=0, dtype=dtype, rngs=rngs) if c_in != c_out else None

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nnx.Module):
    """Stride-2 3×3 conv. padding 1: symmetric (UNet); padding 0: pad right/bottom by one first (VAE encoder),
    as diffusers' `Downsample2D` does."""

    def __init__(self, c: int, padding: int = 1, *, dtype, rngs: nnx.Rngs):
        pad = ((padding, padding), (padding, padding)) if padding else ((0, 1), (0, 1))
        self.conv = conv(c, c, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


def nearest_resize(x, size: tuple[int, int]):
    """torch `F.interpolate(mode="nearest", size=...)` on NHWC: source index floor(i · in/out) (float32 scale)."""
    def idx(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)

    h, w = x.shape[1:3]
    if tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, idx(h, size[0])][:, :, idx(w, size[1])]


class Upsample2D(nnx.Module):
    """Nearest-neighbour ×2 (or to `size`, when the skip connection's map is not exactly twice as large), then a
    3×3 conv."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x, size: Sequence[int] | None = None):
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else tuple(size)
        return self.conv(nearest_resize(x, size))
