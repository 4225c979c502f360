"""One configurable Vision Transformer (Flax NNX) covering the DINO v1, DINOv2 (± registers), MAE-encoder and CLIP
vision-tower layouts of `transformers`, returning q/k/v taps of any chosen layers.

Shape legend
    B  images      Hi, Wi  image height/width in pixels (multiples of p)      p  patch size
    h, w  patch grid = (Hi/p, Wi/p)   N = h*w patch tokens   P = 1 + registers prefix tokens   T = P + N
    C  hidden width   H  heads   D = C/H head dim   F  MLP width   G  side of the stored position-embedding grid

Per block (pre-norm, as all four references):
    x = x + ls1 * o_proj(attn(norm1(x)))      attn = softmax(q kᵀ / √D) v, q/k/v = {q,k,v}_proj(...) split in heads
    x = x + ls2 * mlp(norm2(x))               mlp = fc2(act(fc1)) or down_proj(silu(gate_proj) * up_proj)
ls1/ls2 (layer scale) exist only in DINOv2; CLIP applies `pre_layernorm` before the first block and has no final
norm on `last_hidden_state`. Attribute names follow the references (q_proj/k_proj/v_proj/o_proj, norm1/norm2,
layer_scale1/2, fc1/fc2, gate_proj/up_proj/down_proj) so the weight table in `params.py` stays short.
The architectures (`ViTConfig`, `PRESETS`) live in `config.py`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.vit.config import FAMILIES, PRESETS, ViTConfig  # noqa: F401  (re-exported)
from spectral_jax.models.vit.posembed import resize_grid
from spectral_jax.taps import LayerTap, Taps


def _init(std=0.02):  # used when a ViT is built directly; loaders fill the abstract state instead
    return nnx.initializers.normal(std)


class PatchEmbeddings(nnx.Module):
    """Non-overlapping p×p patches → C: a stride-p convolution. `[B, Hi, Wi, 3]` → `[B, N, C]`, grid (h, w)."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.projection = nnx.Conv(3, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
                                   use_bias=cfg.patch_bias, kernel_init=_init(), dtype=dtype, param_dtype=dtype,
                                   rngs=rngs)

    def __call__(self, images):
        y = self.projection(images)  # [B, h, w, C]
        b, h, w, c = y.shape
        return y.reshape(b, h * w, c), (h, w)


class Embeddings(nnx.Module):
    """Patch tokens + CLS (+ position embeddings, resampled to the grid) (+ registers after the CLS token)."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.hidden_size
        self.cls_token = nnx.Param(_init()(rngs.params(), (1, 1, c), dtype))
        self.register_tokens = (nnx.Param(_init()(rngs.params(), (1, cfg.num_registers, c), dtype))
                                if cfg.num_registers else None)
        self.position_embeddings = nnx.Param(_init()(rngs.params(), (1, 1 + cfg.pos_grid ** 2, c), dtype))
        self.patch_embeddings = PatchEmbeddings(cfg, dtype=dtype, rngs=rngs)

    def position(self, grid: tuple[int, int]):
        """`[1, 1 + h*w, C]`: the CLS position embedding and the patch grid's, resampled as the reference does."""
        pos = self.position_embeddings[...]
        g, c = self.cfg.pos_grid, pos.shape[-1]
        patches = resize_grid(pos[0, 1:].reshape(g, g, c), grid, self.cfg.pos_antialias)
        return jnp.concatenate([pos[:, :1], patches.reshape(1, -1, c).astype(pos.dtype)], axis=1)

    def __call__(self, images):
        x, grid = self.patch_embeddings(images)  # [B, N, C]
        b = x.shape[0]
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.position(grid)  # [B, 1 + N, C]
        if self.register_tokens is not None:  # registers carry no position embedding
            reg = jnp.broadcast_to(self.register_tokens[...], (b, *self.register_tokens.shape[1:])).astype(x.dtype)
            x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
        return x, grid


class Attention(nnx.Module):
    """Multi-head self-attention; also returns the raw q, k, v `[B, H, T, D]` (before the 1/√D scaling)."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        c = cfg.hidden_size
        lin = dict(kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Linear(c, c, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = nnx.Linear(c, c, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = nnx.Linear(c, c, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = nnx.Linear(c, c, **lin)

    def __call__(self, x):
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)  # [B, T, H, D]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q kᵀ/√D) v, [B, T, H, D]
        heads_first = lambda y: y.transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, t, c)), (heads_first(q), heads_first(k), heads_first(v))


class MLP(nnx.Module):
    """fc2(act(fc1(x))), act = exact GELU or CLIP's quick GELU."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        lin = dict(kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.quick = cfg.act == "quick_gelu"
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **lin)
        self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.hidden_size, **lin)

    def __call__(self, x):
        x = self.fc1(x)
        x = x * jax.nn.sigmoid(1.702 * x) if self.quick else jax.nn.gelu(x, approximate=False)
        return self.fc2(x)


class SwiGLU(nnx.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) (DINOv2-giant)."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        lin = dict(kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **lin)
        self.up_proj = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **lin)
        self.down_proj = nnx.Linear(cfg.mlp_dim, cfg.hidden_size, **lin)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerScale(nnx.Module):
    """Per-channel scale `lambda1` `[C]` (DINOv2)."""

    def __init__(self, c: int, *, dtype):
        self.lambda1 = nnx.Param(jnp.ones((c,), dtype))

    def __call__(self, x):
        return x * self.lambda1[...]


def layer_norm(cfg, dtype, rngs) -> nnx.LayerNorm:
    """A LayerNorm over cfg.hidden_size with cfg.layer_norm_eps (every ViT-like family's config has both). Two-pass
    variance, as torch computes it: E[(x-μ)²], not E[x²]-μ² (loses digits on large residual streams)."""
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block; returns the new residual stream and this layer's (q, k, v)."""

    def __init__(self, cfg: ViTConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = layer_norm(cfg, dtype, rngs)
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_scale1 = LayerScale(cfg.hidden_size, dtype=dtype) if cfg.layer_scale else None
        self.norm2 = layer_norm(cfg, dtype, rngs)
        self.mlp = (SwiGLU if cfg.swiglu else MLP)(cfg, dtype=dtype, rngs=rngs)
        self.layer_scale2 = LayerScale(cfg.hidden_size, dtype=dtype) if cfg.layer_scale else None

    def __call__(self, x):
        y, qkv = self.attention(self.norm1(x))
        x = x + (self.layer_scale1(y) if self.layer_scale1 is not None else y)
        y = self.mlp(self.norm2(x))
        x = x + (self.layer_scale2(y) if self.layer_scale2 is not None else y)
        return x, qkv


class ViT(nnx.Module):
    """The backbone. `model(images)` → (last_hidden_state `[B, T, C]`, Taps).

    `last_hidden_state` is what the reference returns under that name: final-layer-normed for DINO v1, DINOv2
    and MAE; the raw residual stream for CLIP (whose post_layernorm only feeds its pooled output).
    """

    def __init__(self, cfg: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layernorm = layer_norm(cfg, dtype, rngs) if cfg.pre_norm else None
        self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.layernorm = layer_norm(cfg, dtype, rngs) if cfg.final_norm else None

    def __call__(self, images, *, layers: Sequence[int] | None = None, hidden: bool = False):
        """images: `[B, Hi, Wi, 3]` float, already normalised, Hi and Wi multiples of the patch size.

        layers: which blocks to tap (None → all); hidden: also return the residual stream after each tapped block.
        Returns (last_hidden_state `[B, T, C]`, Taps with q/k/v `[B, H, T, D]` per tapped layer).
        """
        p = self.cfg.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"images must be [B, H, W, 3] with H, W multiples of {p}, got {images.shape}")
        chosen = resolve_layers(layers, self.cfg.num_layers)
        x, grid = self.embeddings(images)
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        taps, states = {}, {}
        for i, block in enumerate(self.layers):
            x, (q, k, v) = block(x)
            if i in chosen:
                taps[i] = LayerTap(q, k, v, grid, self.cfg.num_prefix)
                if hidden:
                    states[i] = x
        out = self.layernorm(x) if self.layernorm is not None else x
        return out, Taps(taps, states)


def jit_forward(model: ViT, *, layers: Sequence[int] | None = None, hidden: bool = False):
    """A compiled `images -> (last_hidden_state, Taps)` for `model` (one trace per input shape).

    The model's parameters are split out once and passed as an argument, so calls carry no graph bookkeeping.
    """
    chosen = resolve_layers(layers, model.cfg.num_layers)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        return nnx.merge(graphdef, state)(images, layers=chosen, hidden=hidden)

    return lambda images: run(state, images)
