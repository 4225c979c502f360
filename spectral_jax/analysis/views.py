"""What each image's eigenvectors say, in one record: segments (k chosen automatically), figure/ground, instance
masks. Reads a solver `Result` (only its `eigvecs` and `eigvals`); numpy, but for the k-means of the segments and
instance masks (`analysis.kmeans`, a jitted JAX program imported on first use).

Shape legend
    B  images   K  eigenvectors, largest eigenvalue first   (h, w)  the eigenvectors' grid   M  instance masks
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from spectral_jax.analysis.cluster import segment
from spectral_jax.analysis.masks import bipartition, instance_masks

if TYPE_CHECKING:  # annotation only: importing solvers would import JAX
    from spectral_jax.solvers.result import Result

__all__ = ["View", "describe"]


@dataclasses.dataclass
class View:
    """What one image's eigenvectors say: segments (auto k), foreground/background, instance masks."""

    eigvecs: np.ndarray        # [K, h, w] float64
    eigvals: np.ndarray        # [K] float64
    segments: np.ndarray       # [h, w] int32, numbered by size, largest first
    k: int                     # number of segments
    foreground: np.ndarray     # [h, w] bool
    instances: list            # M masks, each [h, w] bool, best score first
    instance_scores: np.ndarray  # [M] float64


def describe(res: Result, seed: int = 0) -> list[View]:
    """One `View` per image b of `res`: `segment` (eigenvalue-weighted; k by its default "silhouette-tol" rule),
    `bipartition` and `instance_masks` of eigvecs `[B, K, h, w]`[b], with eigvals `[K]` (shared by all images) or
    `[B, K]` (row b). Where an image's eigvals are not all finite — a dataset gd result, which has no eigenvalues
    (`dataset.summary.GD_EIGVALS`) — its segments and instance masks cluster the eigenvectors unweighted, as the
    dataset export does; `View.eigvals` keeps them as they are."""
    views = []
    for b in range(res.eigvecs.shape[0]):
        ev = np.asarray(res.eigvecs[b], np.float64)
        vals = np.asarray(res.eigvals if res.eigvals.ndim == 1 else res.eigvals[b], np.float64)
        weights = vals if np.all(np.isfinite(vals)) else None
        seg = segment(ev, eigvals=weights, seed=seed)
        masks, scores = instance_masks(ev, eigvals=weights, seed=seed)
        views.append(View(ev, vals, seg, int(seg.max()) + 1, bipartition(ev), masks, np.asarray(scores)))
    return views
