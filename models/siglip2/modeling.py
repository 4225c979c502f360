"""The SigLIP 2 vision tower (Flax NNX): FixRes as `transformers` `SiglipVisionModel`, NaFlex as
`Siglip2VisionModel`, returning q/k/v taps of any chosen layers.

Shape legend
    B  images      Hi, Wi  image height/width in pixels (multiples of p)      p  patch size
    h, w  patch grid = (Hi/p, Wi/p)   N = h*w patch tokens (no prefix tokens)   L  NaFlex patch slots (≥ N)
    C  hidden width   H  heads   D = C/H head dim   F  MLP width   G  side of the stored position-embedding grid

Patches are flattened in (row, column, channel) order and embedded by one Linear `[p·p·3, C]` — NaFlex's own layer;
FixRes's stride-p convolution is the same map, its kernel `[C, 3, p, p]` reordered once at load time (`params.py`).
Position embeddings: a G×G table resampled to the patch grid — FixRes by torch's bicubic
(`interpolate_pos_encoding`, `vit.posembed`), NaFlex by the antialiased bilinear weights of
`Siglip2VisionEmbeddings.resize_positional_embeddings` (`naflex_position_weights`), per image.
Per block (pre-norm, no layer scale):
    x = x + out_proj(attn(layer_norm1(x)))    attn = softmax(q kᵀ / √D + mask) v (mask: padded NaFlex slots)
    x = x + fc2(gelu_tanh(fc1(layer_norm2(x))))
`last_hidden_state` = post_layernorm(x), as the reference; the attention-pooling head only feeds the pooled output
and is not ported. Attribute names follow the reference (embeddings.{patch_embedding, position_embedding},
encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1,fc2}}, post_layernorm).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.siglip2.config import PRESETS, SiglipConfig  # noqa: F401  (re-exported)
from spectral_jax.models.vit.modeling import layer_norm
from spectral_jax.models.vit.posembed import resize_grid
from spectral_jax.taps import LayerTap, Taps


def _init(std=0.02):  # used when a model is built directly; loaders fill the abstract state instead
    return nnx.initializers.normal(std)


def patchify(images, p: int):
    """`[B, Hi, Wi, 3]` → (patches `[B, N, p·p·3]` in (row, column, channel) order, row-major over the grid,
    grid (h, w)) — the NaFlex processor's `convert_image_to_patches` on channels-last input."""
    b, hi, wi, c = images.shape
    h, w = hi // p, wi // p
    x = images.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)  # [B, h, w, p, p, 3]
    return x.reshape(b, h * w, p * p * c), (h, w)


def naflex_position_weights(grid_size: int, spatial_shapes, max_length: int):
    """`[B, L, G·G]` float32 weights W with W @ table = the NaFlex position embeddings of each image's (h, w)
    (`spatial_shapes` int `[B, 2]`, traced or not) in its first h·w slots (padded slots get slot 0's).

    Separable antialiased bilinear (triangle) weights, as `transformers` computes them: output index i of a side
    of n, scale s = G/n, support max(s, 1), centre c = (i + ½)s − ½, w_j ∝ max(0, 1 − |j − c|/support).
    """
    sizes = jnp.asarray(spatial_shapes, jnp.float32)[:, None]  # [B, 1, 2]
    pos = jnp.arange(max_length, dtype=jnp.float32)[None, :, None]  # [1, L, 1]
    rows = jnp.floor(pos / sizes[..., 1:])
    index = jnp.concatenate([rows, pos - rows * sizes[..., 1:]], axis=-1)  # [B, L, 2] (row, column)
    index = index * (pos < jnp.prod(sizes, -1, keepdims=True))
    scale = grid_size / sizes
    support = jnp.maximum(scale, 1.0)
    center = (index + 0.5) * scale - 0.5  # [B, L, 2]
    source = jnp.arange(grid_size, dtype=jnp.float32)
    w = jnp.maximum(1 - jnp.abs(source - center[..., None]) / support[..., None], 0)  # [B, L, 2, G]
    w = w / w.sum(-1, keepdims=True)
    return (w[..., 0, :, None] * w[..., 1, None, :]).reshape(*w.shape[:2], grid_size * grid_size)


class Embeddings(nnx.Module):
    """Patch embedding + resampled position embedding."""

    def __init__(self, cfg: SiglipConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Linear(p * p * 3, c, kernel_init=_init(), dtype=dtype, param_dtype=dtype,
                                          rngs=rngs)
        self.position_embedding = nnx.Param(_init()(rngs.params(), (cfg.pos_grid ** 2, c), dtype))

    def position(self, grid: tuple[int, int]):
        """`[N, C]`: the table resampled to one grid (FixRes bicubic, NaFlex antialiased bilinear)."""
        table, g = self.position_embedding[...], self.cfg.pos_grid
        if self.cfg.variant == "fixed":
            return resize_grid(table.reshape(g, g, -1), grid).reshape(-1, table.shape[-1]).astype(table.dtype)
        return self.naflex_position(jnp.asarray([grid]), grid[0] * grid[1])[0]

    def naflex_position(self, spatial_shapes, max_length: int):
        """`[B, L, C]`: NaFlex position embeddings per image (`naflex_position_weights`), float32 arithmetic."""
        table = self.position_embedding[...]
        weights = naflex_position_weights(self.cfg.pos_grid, spatial_shapes, max_length)
        out = jnp.einsum("blg,gc->blc", weights, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return out.astype(table.dtype)

    def __call__(self, images):
        patches, grid = patchify(images, self.cfg.patch_size)
        x = self.patch_embedding(patches.astype(self.patch_embedding.kernel.dtype))  # [B, N, C]
        return x + self.position(grid).astype(x.dtype), grid


class Attention(nnx.Module):
    """Multi-head self-attention over unmasked keys; also returns the raw q, k, v `[B, H, T, D]`."""

    def __init__(self, cfg: SiglipConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        c = cfg.hidden_size
        lin = dict(kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = (nnx.Linear(c, c, **lin) for _ in range(3))
        self.out_proj = nnx.Linear(c, c, **lin)

    def __call__(self, x, mask=None):
        """x `[B, T, C]`; mask: None or bool `[B, T]` (True: a real patch, a key every query may attend to)."""
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)  # [B, T, H, D]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None, None, :])
        heads_first = lambda y: y.transpose(0, 2, 1, 3)
        return self.out_proj(out.reshape(b, t, c)), (heads_first(q), heads_first(k), heads_first(v))


class MLP(nnx.Module):
    """fc2(gelu_tanh(fc1(x)))."""

    def __init__(self, cfg: SiglipConfig, *, dtype, rngs: nnx.Rngs):
        lin = dict(kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **lin)
        self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.hidden_size, **lin)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class EncoderLayer(nnx.Module):
    """Pre-norm block; returns the new residual stream and this layer's (q, k, v)."""

    def __init__(self, cfg: SiglipConfig, *, dtype, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(cfg, dtype, rngs)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(cfg, dtype, rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, mask=None):
        y, qkv = self.self_attn(self.layer_norm1(x), mask)
        x = x + y
        return x + self.mlp(self.layer_norm2(x)), qkv


class Encoder(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])


class SiglipVision(nnx.Module):
    """The backbone. `model(images)` → (last_hidden_state `[B, N, C]`, Taps); `model.naflex(...)` runs padded
    NaFlex batches as the reference does."""

    def __init__(self, cfg: SiglipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.post_layernorm = layer_norm(cfg, dtype, rngs)

    def _encode(self, x, mask, chosen: tuple[int, ...], hidden: bool):
        """x `[B, T, C]` → (post_layernorm(x) after every layer, {i: (q, k, v)}, {i: residual stream})."""
        qkvs, states = {}, {}
        for i, layer in enumerate(self.encoder.layers):
            x, qkv = layer(x, mask)
            if i in chosen:
                qkvs[i] = qkv
                if hidden:
                    states[i] = x
        return self.post_layernorm(x), qkvs, states

    def __call__(self, images, *, layers: Sequence[int] | None = None, hidden: bool = False):
        """images: `[B, Hi, Wi, 3]` float, already normalised, Hi and Wi multiples of the patch size (every patch
        real: NaFlex needs no padding or mask for a batch of one shape).

        layers: which blocks to tap (None → all); hidden: also return the residual stream after each tapped block.
        Returns (last_hidden_state `[B, N, C]`, Taps with q/k/v `[B, H, N, D]` per tapped layer, no prefix).
        """
        p = self.cfg.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"images must be [B, H, W, 3] with H, W multiples of {p}, got {images.shape}")
        x, grid = self.embeddings(images)
        out, qkvs, states = self._encode(x, None, resolve_layers(layers, self.cfg.num_layers), hidden)
        return out, Taps({i: LayerTap(*qkv, grid, 0) for i, qkv in qkvs.items()}, states)

    def naflex(self, pixel_values, pixel_attention_mask, spatial_shapes, *, layers: Sequence[int] | None = None,
               hidden: bool = False):
        """The reference's NaFlex call on a padded batch: pixel_values `[B, L, p·p·3]` (each image's h·w patches
        first), pixel_attention_mask `[B, L]` (1: a real patch), spatial_shapes int `[B, 2]` (h, w).

        Returns (last_hidden_state `[B, L, C]`, {layer: (q, k, v) `[B, H, L, D]`}, {layer: `[B, L, C]`} when
        hidden). Padded slots are never attended to; their own rows are computed as the reference computes them.
        """
        if self.cfg.variant != "naflex":
            raise ValueError("naflex() needs a NaFlex model (variant 'naflex')")
        emb = self.embeddings
        x = emb.patch_embedding(pixel_values.astype(emb.patch_embedding.kernel.dtype))
        x = x + emb.naflex_position(spatial_shapes, pixel_values.shape[1]).astype(x.dtype)
        return self._encode(x, jnp.asarray(pixel_attention_mask).astype(bool),
                            resolve_layers(layers, self.cfg.num_layers), hidden)
