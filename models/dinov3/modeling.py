"""The DINOv3 ViT (Flax NNX) of `transformers` `DINOv3ViTModel`, returning q/k/v taps of any chosen layers — q and
k after the rotary embedding, as the attention compares them.

Shape legend
    B  images      Hi, Wi  image height/width in pixels (multiples of p)      p  patch size
    h, w  patch grid = (Hi/p, Wi/p)   N = h*w patch tokens   P = 1 + registers prefix tokens   T = P + N
    C  hidden width   H  heads   D = C/H head dim   F  MLP width

Tokens: [CLS, registers..., patches (row-major)]; no learned position embeddings — instead 2-D RoPE on the patch
tokens' q and k (prefix tokens unrotated). Patch (r, c) has centre coordinates y = 2(r + ½)/h − 1, x = 2(c + ½)/w − 1
in [−1, 1]; with frequencies f_j = θ^(−4j/D), j < D/4, its angles are a = 2π·[y f, x f] (D/2 of them), tiled
twice to D, and  rope(u) = u·cos a + rotate_half(u)·sin a,  rotate_half([u1, u2]) = [−u2, u1].
Per block (pre-norm):
    x = x + ls1 * o_proj(attn(norm1(x)))      attn = softmax(q kᵀ / √D) v on the rotated q, k
    x = x + ls2 * mlp(norm2(x))               mlp = down(act(up)) or down(act(gate) * up) (gated, SiLU)
Attribute names follow the reference (embeddings.{cls_token, register_tokens, patch_embeddings}, layer.i.{norm1,
attention.{q,k,v,o}_proj, layer_scale1, norm2, mlp.{gate,up,down}_proj, layer_scale2}, norm), so the key table in
`params.py` is nearly the identity. The architectures (`DINOv3Config`, `PRESETS`) live in `config.py`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.dinov3.config import PRESETS, DINOv3Config  # noqa: F401  (re-exported)
from spectral_jax.models.vit.modeling import LayerScale, layer_norm
from spectral_jax.taps import LayerTap, Taps


def _init(std=0.02):  # used when a model is built directly; loaders fill the abstract state instead
    return nnx.initializers.normal(std)


def rope_tables(grid: tuple[int, int], head_dim: int, theta: float):
    """(cos, sin), each float32 `[N, D]`: the RoPE angles of the h×w patch centres (see the module docstring),
    computed in float32 in the reference's order of operations."""
    h, w = grid
    inv_freq = 1.0 / theta ** jnp.arange(0, 1, 4 / head_dim, dtype=jnp.float32)  # [D/4]
    ys = jnp.arange(0.5, h, dtype=jnp.float32) / h
    xs = jnp.arange(0.5, w, dtype=jnp.float32) / w
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(h * w, 2)  # [N, 2] (y, x)
    coords = 2.0 * coords - 1.0
    angles = (2 * math.pi * coords[:, :, None] * inv_freq[None, None, :]).reshape(h * w, -1)  # [N, D/2]
    angles = jnp.tile(angles, (1, 2))  # [N, D]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(u):
    half = u.shape[-1] // 2
    return jnp.concatenate([-u[..., half:], u[..., :half]], axis=-1)


def apply_rope(u, cos, sin, num_prefix: int):
    """u `[B, T, H, D]` with its patch tokens (after the P prefix tokens) rotated by cos/sin `[N, D]`."""
    cos, sin = cos[:, None, :].astype(u.dtype), sin[:, None, :].astype(u.dtype)  # [N, 1, D], as the reference
    patches = u[:, num_prefix:]
    return jnp.concatenate([u[:, :num_prefix], patches * cos + _rotate_half(patches) * sin], axis=1)


class Embeddings(nnx.Module):
    """[CLS, registers, patch tokens]: `[B, Hi, Wi, 3]` → `[B, T, C]`, grid (h, w). The reference's mask token
    (masked-image pretraining only) is not part of the port."""

    def __init__(self, cfg: DINOv3Config, *, dtype, rngs: nnx.Rngs):
        c, p = cfg.hidden_size, cfg.patch_size
        self.cls_token = nnx.Param(_init()(rngs.params(), (1, 1, c), dtype))
        self.register_tokens = nnx.Param(_init()(rngs.params(), (1, cfg.num_registers, c), dtype))
        self.patch_embeddings = nnx.Conv(3, c, (p, p), strides=(p, p), padding="VALID", kernel_init=_init(),
                                         dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, images):
        y = self.patch_embeddings(images)  # [B, h, w, C]
        b, h, w, c = y.shape
        prefix = jnp.concatenate([self.cls_token[...], self.register_tokens[...]], axis=1).astype(y.dtype)
        return jnp.concatenate([jnp.broadcast_to(prefix, (b, *prefix.shape[1:])), y.reshape(b, h * w, c)], 1), (h, w)


class Attention(nnx.Module):
    """Multi-head self-attention with RoPE; also returns q (rotated), k (rotated), v `[B, H, T, D]` (before the
    1/√D scaling)."""

    def __init__(self, cfg: DINOv3Config, *, dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_prefix = cfg.num_heads, cfg.num_prefix
        c = cfg.hidden_size
        lin = dict(kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Linear(c, c, use_bias=cfg.query_bias, **lin)
        self.k_proj = nnx.Linear(c, c, use_bias=cfg.key_bias, **lin)
        self.v_proj = nnx.Linear(c, c, use_bias=cfg.value_bias, **lin)
        self.o_proj = nnx.Linear(c, c, use_bias=cfg.proj_bias, **lin)

    def __call__(self, x, rope):
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)  # [B, T, H, D]
        q = apply_rope(split(self.q_proj(x)), *rope, self.num_prefix)
        k = apply_rope(split(self.k_proj(x)), *rope, self.num_prefix)
        v = split(self.v_proj(x))
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q kᵀ/√D) v, [B, T, H, D]
        heads_first = lambda y: y.transpose(0, 2, 1, 3)
        return self.o_proj(out.reshape(b, t, c)), (heads_first(q), heads_first(k), heads_first(v))


class MLP(nnx.Module):
    """down_proj(act(up_proj(x))), or gated: down_proj(act(gate_proj(x)) * up_proj(x)); act = exact GELU or SiLU."""

    def __init__(self, cfg: DINOv3Config, *, dtype, rngs: nnx.Rngs):
        lin = dict(use_bias=cfg.mlp_bias, kernel_init=_init(), dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.act = jax.nn.silu if cfg.act == "silu" else lambda u: jax.nn.gelu(u, approximate=False)
        self.gate_proj = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **lin) if cfg.gated_mlp else None
        self.up_proj = nnx.Linear(cfg.hidden_size, cfg.mlp_dim, **lin)
        self.down_proj = nnx.Linear(cfg.mlp_dim, cfg.hidden_size, **lin)

    def __call__(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):
    """Pre-norm block with layer scale; returns the new residual stream and this layer's (q, k, v)."""

    def __init__(self, cfg: DINOv3Config, *, dtype, rngs: nnx.Rngs):
        self.norm1 = layer_norm(cfg, dtype, rngs)
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.layer_scale1 = LayerScale(cfg.hidden_size, dtype=dtype)
        self.norm2 = layer_norm(cfg, dtype, rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.layer_scale2 = LayerScale(cfg.hidden_size, dtype=dtype)

    def __call__(self, x, rope):
        y, qkv = self.attention(self.norm1(x), rope)
        x = x + self.layer_scale1(y)
        return x + self.layer_scale2(self.mlp(self.norm2(x))), qkv


class DINOv3ViT(nnx.Module):
    """The backbone. `model(images)` → (last_hidden_state `[B, T, C]` (final-normed, as the reference), Taps)."""

    def __init__(self, cfg: DINOv3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.layer = nnx.List([Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = layer_norm(cfg, dtype, rngs)

    def __call__(self, images, *, layers: Sequence[int] | None = None, hidden: bool = False):
        """images: `[B, Hi, Wi, 3]` float, already normalised, Hi and Wi multiples of the patch size.

        layers: which blocks to tap (None → all); hidden: also return the residual stream after each tapped block.
        Returns (last_hidden_state `[B, T, C]`, Taps with q/k/v `[B, H, T, D]` per tapped layer, q/k rotated).
        """
        p = self.cfg.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"images must be [B, H, W, 3] with H, W multiples of {p}, got {images.shape}")
        chosen = resolve_layers(layers, self.cfg.num_layers)
        x, grid = self.embeddings(images)
        rope = rope_tables(grid, self.cfg.head_dim, self.cfg.rope_theta)
        taps, states = {}, {}
        for i, block in enumerate(self.layer):
            x, (q, k, v) = block(x, rope)
            if i in chosen:
                taps[i] = LayerTap(q, k, v, grid, self.cfg.num_prefix)
                if hidden:
                    states[i] = x
        return self.norm(x), Taps(taps, states)
