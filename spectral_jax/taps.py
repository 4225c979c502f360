"""Taps: what a backbone exposes about each attention layer, as plain data (a pytree), not hooks.

Shape legend
    B  images in the batch          H  attention heads        T  tokens = P + h*w
    P  prefix tokens (CLS, registers) before the patch tokens  D  head dimension
    (h, w)  the layer's patch grid  C  hidden width
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

Array = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerTap:
    """Raw q/k/v projections of one attention layer, split into heads, before the 1/sqrt(D) scaling.

    q, k, v: `[B, H, T, D]`; `grid` = (h, w) of the patch tokens; `num_prefix` = P tokens precede them.
    """

    q: Array
    k: Array
    v: Array
    grid: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    num_prefix: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]

    def patches(self) -> "LayerTap":
        """The same tap restricted to the h*w patch tokens: q, k, v `[B, H, h*w, D]`, `num_prefix` 0."""
        p = self.num_prefix
        if p == 0:
            return self
        return LayerTap(self.q[:, :, p:], self.k[:, :, p:], self.v[:, :, p:], self.grid, 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Taps:
    """All tapped layers of one forward pass, keyed by layer index (0-based, in network order).

    `layers[i]`: `LayerTap`; `hidden[i]`: `[B, T, C]` the residual stream after block i (only for the layers
    asked for; empty when not requested); `timesteps`: the diffusion timesteps folded into every layer's heads
    axis (graph index t·H + head, timestep-major), () where the heads axis holds heads only (a ViT).
    """

    layers: dict[int, LayerTap]
    hidden: dict[int, Array] = dataclasses.field(default_factory=dict)
    timesteps: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def __post_init__(self):
        if not (isinstance(self.timesteps, tuple) and all(type(t) is int for t in self.timesteps)):
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))   # hashable (static)

    def patches(self) -> "Taps":
        """Every layer restricted to its patch tokens; hidden states likewise."""
        hidden = {}
        for i, h in self.hidden.items():
            p = self.layers[i].num_prefix if i in self.layers else 0
            hidden[i] = h[:, p:]
        return Taps({i: t.patches() for i, t in self.layers.items()}, hidden, self.timesteps)
