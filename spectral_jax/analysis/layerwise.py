"""Which layers (heads, timesteps) say what: attribution of a joint solution to the graphs it was built from.

`Attribution` holds, for one joint solve:
- rq `[L, T, H, K]`: each graph's Rayleigh quotient z_kᵀ P z_k of the joint eigenvectors (from `Result.rq`, no new
  graph work) — a high quotient means that graph "agrees" with eigenvector k;
- eigvals `[L, T, K]`: each (layer, timestep)'s own top-K eigenvalues (its graphs alone, every head equal);
- eigengap `[L, T]`: (λ_2 − λ_K) / λ_2 of that own spectrum (`eigengap`: near 0 for a slowly decaying,
  layout-like spectrum, near 1 for a few well-separated groups);
- angles `[L, T, K−1]`: principal angles (radians, ascending) between the unit's own top-K span and the joint
  top-K span (the joint vectors pooled to the unit's grid), each with the constant direction projected out (every
  row-stochastic graph has it; a graph of c disconnected groups has c eigenvalues 1 and mixes it with the
  indicators, so dropping "vector 1" instead would lose a group) — K−1 angles; agreement `[L, T]` = mean cos² of
  those angles (1: the same subspace, ≈ (K−1)/N: unrelated).
T = 1 except for diffusion backbones (timesteps folded into the heads axis, graph index t·H + head). Layers with
fewer heads than H have NaN in the missing slots of rq. Pure numpy; the graphs and solves come from
`spectral_jax.pipeline.attribution`.

Shape legend
    L  tapped layers   T  timesteps (1 for ViTs)   H  heads (the most of any layer)   K  eigenvectors
    N  nodes of a layer's grid
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from spectral_jax.layer_weights import eigengap


@dataclasses.dataclass
class Attribution:
    """See the module docstring. layers `[L]` int: the layer indices; timesteps `[T]` (diffusion timesteps, or [0])."""

    layers: np.ndarray
    timesteps: np.ndarray
    rq: np.ndarray
    eigvals: np.ndarray
    eigengap: np.ndarray
    angles: np.ndarray
    agreement: np.ndarray
    joint_eigvals: np.ndarray
    graph: str = ""

    @property
    def layer_rq(self) -> np.ndarray:
        """`[L, K]`: each layer's Rayleigh quotients averaged over its heads and timesteps."""
        return nanmean(self.rq, (1, 2))

    @property
    def head_rq(self) -> np.ndarray:
        """`[L, T·H]`: each graph's mean quotient over the non-trivial eigenvectors 2..K."""
        return nanmean(self.rq[..., 1:], -1).reshape(self.rq.shape[0], -1)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: every array as nested lists (NaN → None), plus the shapes' meaning."""
        def lst(a):
            a = np.asarray(a, np.float64)
            return np.where(np.isnan(a), None, np.round(a, 6)).tolist()

        return {"graph": self.graph, "layers": [int(l) for l in self.layers],
                "timesteps": [int(t) for t in self.timesteps],
                "shapes": {"rq": "[layer, timestep, head, k]", "eigvals": "[layer, timestep, k]",
                           "eigengap": "[layer, timestep]", "angles": "[layer, timestep, k-1] radians",
                           "agreement": "[layer, timestep]"},
                "joint_eigvals": lst(self.joint_eigvals), "rq": lst(self.rq), "eigvals": lst(self.eigvals),
                "eigengap": lst(self.eigengap), "angles": lst(self.angles), "agreement": lst(self.agreement),
                "layer_rq": lst(self.layer_rq)}


def nanmean(a, axis) -> np.ndarray:
    """Mean over `axis` of the non-NaN entries; NaN (and no warning) where there are none."""
    a = np.asarray(a, np.float64)
    ok = ~np.isnan(a)
    n = ok.sum(axis)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(axis) / np.maximum(n, 1), np.nan)


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spans of a `[N, p]` and b `[N, q]` →
    `[min(rank a, rank b)]` (`[min(p, q)]` for full-rank columns): arccos of the singular values of Q_aᵀ Q_b, each
    Q an orthonormal basis of its span (`_span`: the left singular vectors above 1e-10 of the largest singular
    value). A span's dimension is its rank, not its column count: a QR of dependent columns would add an arbitrary
    direction and with it an angle the spans do not have."""
    s = np.linalg.svd(_span(a, 1e-10).T @ _span(b, 1e-10), compute_uv=False)
    return np.sort(np.arccos(np.clip(s, -1.0, 1.0)))


def _span(a: np.ndarray, rtol: float) -> np.ndarray:
    """An orthonormal basis `[N, rank]` of the column span of a `[N, p]`, largest singular value first; rank: the
    singular values above `rtol` of the largest (none for a zero or empty a)."""
    u, sv, _ = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u[:, :int(np.sum(sv > rtol * sv[0])) if sv.size and sv[0] > 0 else 0]


def nontrivial(v: np.ndarray) -> np.ndarray:
    """An orthonormal basis `[N, r]` of span(v) with the constant direction projected out (v `[N, p]`): its top
    r = min(p − 1, rank) left singular vectors after centring (rank: singular values above 1e-8 of the largest)."""
    c = np.asarray(v, np.float64)
    return _span(c - c.mean(0, keepdims=True), 1e-8)[:, :max(c.shape[1] - 1, 0)]


def build(layers: Sequence[int], timesteps: Sequence[int], rq: np.ndarray, own_eigvals: np.ndarray,
          own_vecs: Sequence[np.ndarray], joint_on_grid: Sequence[np.ndarray], joint_eigvals: np.ndarray,
          graph: str = "") -> Attribution:
    """An `Attribution` from arrays: rq `[L, T, H, K]`; own_eigvals `[L, T, K]`; own_vecs[l·T + t] `[N_l, K]` the
    unit's own eigenvectors (orthonormal columns, largest first; fewer than K where its grid has ≤ K nodes, its
    eigvals then NaN-padded) and joint_on_grid[l·T + t] `[N_l, K]` the joint
    eigenvectors pooled to that unit's grid."""
    lt = own_eigvals.shape[:2]
    k = own_eigvals.shape[-1]
    angles = np.full((len(own_vecs), k - 1), np.nan)
    for i, (v, j) in enumerate(zip(own_vecs, joint_on_grid)):     # fewer angles where a grid has ≤ K nodes
        a = principal_angles(nontrivial(v), nontrivial(j))[: k - 1]
        angles[i, : a.size] = a
    angles = angles.reshape(*lt, k - 1)
    gap = eigengap(own_eigvals.reshape(-1, k)).reshape(lt)
    return Attribution(np.asarray(layers, np.int64), np.asarray(timesteps, np.int64), np.asarray(rq, np.float32),
                       np.asarray(own_eigvals, np.float32), gap.astype(np.float32), angles.astype(np.float32),
                       nanmean(np.cos(angles) ** 2, -1).astype(np.float32), np.asarray(joint_eigvals, np.float32),
                       graph)


__all__ = ["Attribution", "build", "eigengap", "nanmean", "nontrivial", "principal_angles"]
