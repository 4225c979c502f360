"""k-means, the automatic choice of k, and spectral segments (k-means on the spectral embedding).

k-means runs as one compiled JAX program (`analysis.lloyd`, imported on the first call: importing this module
needs no JAX): k-means++ seeding, Lloyd iterations and the best of n_init runs, float32 on centred data; the
labels come back to numpy, which computes the float64 centres and inertia and the canonical numbering. The
silhouette of `auto_k` is numpy on a subsample.

Shape legend
    K      eigenvectors `[K, h, w]`, sorted by eigenvalue, largest first
    (h, w) the eigenvectors' grid;  N = h*w pixels (or any N points), flattened row-major
    F      feature width per point;  k  clusters;  m  candidate values of k;  S  subsampled points

Everything random takes a `seed`: the same inputs and seed give the same outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from spectral_jax.analysis.features import _features, spectral_features
from spectral_jax.errors import InputError, is_integer

__all__ = ["KMeans", "kmeans", "AutoK", "auto_k", "cluster_embedding", "segment", "structureless"]


class KMeans(NamedTuple):
    """k-means result. Clusters are numbered by size, largest first (ties: earliest first pixel)."""

    labels: np.ndarray  # [N] int32
    centers: np.ndarray  # [k, F] float64, the mean of each cluster's points
    inertia: float  # sum over points of the squared distance to their centre (float64)
    converged: bool = True  # the best run stopped by its assignments or centres settling, not at `iters`


def _canonical(labels: np.ndarray, centers: np.ndarray):
    """Renumber clusters by size (largest first), ties by first occurrence."""
    k = centers.shape[0]
    counts = np.bincount(labels, minlength=k)
    first = np.full(k, labels.shape[0])
    np.minimum.at(first, labels, np.arange(labels.shape[0]))
    order = np.lexsort((first, -counts))  # new index i <- old cluster order[i]
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return remap[labels].astype(np.int32), centers[order]


def kmeans(features, k: int, seed: int = 0, n_init: int = 10, iters: int = 100, tol: float = 1e-6,
           trials: int | None = None) -> KMeans:
    """k-means on `features` `[N, F]`: k-means++ seeding, Lloyd iterations, best of `n_init` runs by inertia.

    Minimises Σ_n ||x_n − c_{label(n)}||². A run stops when assignments stop changing, when the centres' total
    squared move is below `tol` × the features' mean variance, or after `iters` iterations. An empty cluster takes
    the point farthest from its centre. Seeding is greedy k-means++: `trials` candidates per centre drawn ∝ D², the
    one lowering Σ D² most kept; default 2 + ⌊ln kp⌋ (scikit-learn's 2 + ⌊ln k⌋ on k's bucket kp, so the candidates
    add no compiled programs: 4 for k ≤ 16, 5 for k ≤ 32); 1 is plain k-means++ (greedy seeding makes segments
    more stable across seeds: benchmarks/results/kmeans.md).
    Deterministic: run r draws from `split(key(seed), n_init)[r]`.
    Runs in float32 on the default JAX device (`analysis.lloyd`: precision, recompilation); the centres and the
    inertia are float64, computed from the labels. `converged` is False when the best run hit `iters`.
    """
    x = _features(features)
    n = x.shape[0]
    if not is_integer(k) or not 1 <= int(k) <= n:
        raise InputError("k", f"must be an integer in [1, N={n}], got {k!r}", "pass a whole number of clusters ≤ N")
    if n_init < 1 or iters < 1 or (trials is not None and trials < 1):
        raise InputError("n_init/iters/trials", f"must be >= 1, got {n_init}/{iters}/{trials}",
                         "use e.g. n_init=10, iters=100, trials=None")
    from spectral_jax.analysis.lloyd import best_labels

    k = int(k)
    xc = x - x.mean(0)
    labels, converged = best_labels(xc, k, seed, n_init, iters, tol * float(xc.var(0).mean()), trials)
    counts = np.bincount(labels, minlength=k)
    centers = np.stack([np.bincount(labels, weights=col, minlength=k) for col in np.ascontiguousarray(x.T)], 1)
    centers /= np.maximum(counts, 1)[:, None]
    inertia = float(np.sum((x - centers[labels]) ** 2))
    labels, centers = _canonical(labels, centers)
    return KMeans(labels, centers, inertia, converged)


class AutoK(NamedTuple):
    """The chosen number of clusters and the score of every candidate."""

    k: int
    ks: np.ndarray  # [m] candidate k, ascending
    scores: np.ndarray  # [m] mean silhouette (both silhouette methods) or eigengap
    method: str


def _silhouette(d: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of points with pairwise distances d `[S, S]` and labels `[S]` (singleton clusters score 0)."""
    s_n = d.shape[0]
    _, lab = np.unique(labels, return_inverse=True)
    k = int(lab.max()) + 1
    if k < 2:
        return 0.0
    onehot = np.zeros((s_n, k))
    onehot[np.arange(s_n), lab] = 1.0
    sums = d @ onehot  # [S, k] total distance from each point to each cluster
    counts = onehot.sum(0)
    own = counts[lab]
    a = sums[np.arange(s_n), lab] / np.maximum(own - 1, 1)
    mean_other = sums / counts[None, :]
    mean_other[np.arange(s_n), lab] = np.inf
    b = mean_other.min(1)
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-300)
    s[own <= 1] = 0.0
    return float(s.mean())


SILHOUETTE_TOL = 0.05  # "silhouette-tol": the smallest k within this much of the best mean silhouette
MAX_SAMPLES = 2000     # points of the silhouette's subsample
ITERS = 100            # Lloyd iterations per k-means run of the scan
METHODS = ("silhouette-tol", "silhouette", "eigengap")


def auto_k(features=None, k_range: tuple[int, int] = (2, 10), method: str = "silhouette", eigvals=None,
           seed: int = 0, max_samples: int = MAX_SAMPLES, n_init: int = 10, iters: int = ITERS,
           tol: float = SILHOUETTE_TOL) -> AutoK:
    """Choose the number of clusters k in `k_range` (both ends included).

    - "silhouette": k-means (`seed`, `n_init`) on all of `features` `[N, F]` for every k; the mean silhouette
      s = (b − a) / max(a, b) (a: mean distance to the own cluster, b: to the nearest other cluster) is computed on
      a subsample of at most `max_samples` points drawn with `seed`. Needs 2 <= k <= N − 1. The highest wins.
    - "silhouette-tol" (`segment`'s default): the same scan; the chosen k is the smallest whose mean silhouette is
      within `tol` (absolute, default 0.05) of the best one. On spectral embeddings of real images the silhouette
      keeps rising with k, so the plain maximum sits at k_range's top; this rule stops earlier
      (benchmarks/results/autok.md).
    - "eigengap": needs `eigvals` `[K]` (sorted descending here); the score of k is λ_{k−1} − λ_k, the gap after
      the k-th eigenvalue (k clusters ↔ k eigenvalues near 1 for a row-stochastic affinity). `features` unused.
    Ties of the highest score go to the smallest k. `scores` holds the mean silhouettes or the gaps.
    """
    return _auto_k(features, k_range, method, eigvals, seed, max_samples, n_init, iters, tol)[0]


def _auto_k(features, k_range, method, eigvals, seed, max_samples=MAX_SAMPLES, n_init=10, iters=ITERS,
            tol=SILHOUETTE_TOL) -> tuple[AutoK, dict]:
    """`auto_k` and the k-means of every k it scanned ({k: KMeans}; empty for "eigengap"), for a caller that then
    clusters at the chosen k with the same runs."""
    fits: dict = {}
    lo, hi = (int(v) for v in k_range)
    if lo < 1 or hi < lo:
        raise InputError("k_range", f"must be (lo, hi) with 1 <= lo <= hi, got {k_range}", "e.g. k_range=(2, 10)")
    if method not in METHODS:
        raise InputError("method", f"unknown method {method!r}", f"use one of {', '.join(map(repr, METHODS))}")
    if method == "eigengap":
        if eigvals is None:
            raise InputError("eigvals", "method='eigengap' needs eigenvalues", "pass eigvals=result.eigvals")
        lam = np.sort(np.asarray(eigvals, np.float64).reshape(-1))[::-1]
        ks = np.arange(lo, min(hi, lam.shape[0] - 1) + 1)
        if ks.size == 0:
            raise InputError("eigvals", f"{lam.shape[0]} eigenvalues give no gap for k in {k_range}",
                             "solve for more eigenvectors or lower k_range")
        scores = lam[ks - 1] - lam[ks]
    else:  # "silhouette" or "silhouette-tol"
        if not (np.isfinite(tol) and tol >= 0):
            raise InputError("tol", f"must be a finite silhouette difference >= 0, got {tol}", "e.g. tol=0.05")
        x = _features(features)
        n = x.shape[0]
        ks = np.arange(max(lo, 2), min(hi, n - 1) + 1)
        if ks.size == 0:
            raise InputError("k_range", f"{k_range} has no k with 2 <= k <= N-1 = {n - 1}",
                             "use more points or a smaller k_range")
        if n > max_samples:
            sub = np.sort(np.random.default_rng([seed, 1]).choice(n, size=max_samples, replace=False))
        else:
            sub = np.arange(n)
        xs = x[sub] - x[sub].mean(0)
        x2 = np.einsum("nf,nf->n", xs, xs)
        d = np.sqrt(np.maximum(x2[:, None] - 2.0 * (xs @ xs.T) + x2[None, :], 0.0))  # [S, S], S ≤ max_samples
        np.fill_diagonal(d, 0.0)
        fits = {int(k): kmeans(x, int(k), seed, n_init, iters) for k in ks}
        scores = np.array([_silhouette(d, fits[int(k)].labels[sub]) for k in ks])
    i = int(np.argmax(scores))
    if method == "silhouette-tol":
        i = int(np.flatnonzero(scores >= scores[i] - tol)[0])
    return AutoK(int(ks[i]), ks, np.asarray(scores, np.float64), method), fits


def structureless(features) -> bool:
    """Whether every row of the embedding `[N, F]` is the same point (to 1e-9 of its largest entry; an all-zero
    embedding too): nothing for a clustering to find."""
    x = np.asarray(features)
    return bool(x.size) and float(np.ptp(x, axis=0).max()) <= 1e-9 * float(np.abs(x).max())


def cluster_embedding(features, k: int | None = None, method: str = "silhouette-tol", eigvals=None, seed: int = 0,
                      k_range: tuple[int, int] = (2, 10), n_init: int = 10,
                      scan_n_init: int | None = None) -> tuple[KMeans, AutoK | None]:
    """k-means of an embedding `[N, F]` into `k` clusters, or — `k=None` — into the `auto_k(method=...)` choice in
    `k_range` ("silhouette-tol" or "silhouette" on `features`, k-means with `scan_n_init` runs per candidate,
    default `n_init`; or "eigengap" on `eigvals`). Returns (the `KMeans` with `n_init` runs, the `AutoK` or None when k was given).
    The one "choose k, then cluster" step of the single-image `segment` and the dataset-wide segments.

    An embedding whose rows are all the same (`structureless`: every eigenvalue weighting a nontrivial eigenvector
    ≤ 0, or constant eigenvectors) has no clusters: any split of it is arbitrary (k-means put one point apart).
    With k=None it is one cluster, the `AutoK`'s method "no structure" (no candidate scored); a given k ≥ 2 is an
    `InputError`."""
    if structureless(features):
        if k is None:
            return kmeans(features, 1, seed, n_init), AutoK(1, np.zeros(0, np.int64), np.zeros(0), "no structure")
        if int(k) >= 2:
            raise InputError("eigvecs", "give every pixel the same spectral embedding (the eigenvalues weighting "
                             "its eigenvectors are all ≤ 0, or the eigenvectors are constant), so any "
                             f"{int(k)} segments would be arbitrary",
                             "ask for automatic k (one segment), weight the eigenvectors equally (eigvals=None), "
                             "or solve for more of them")
    if k is None:
        scan = n_init if scan_n_init is None else scan_n_init
        auto, fits = _auto_k(features, k_range, method, eigvals, seed, n_init=scan)
        # the scan's k-means at the chosen k is this one when its runs are the same: not run twice
        return (fits[auto.k] if scan == n_init and auto.k in fits else kmeans(features, auto.k, seed, n_init)), auto
    return kmeans(features, int(k), seed, n_init), None


def segment(eigvecs, k: int | None = None, method: str = "silhouette-tol", eigvals=None, seed: int = 0,
            skip_first: bool = True, k_range: tuple[int, int] = (2, 10), n_init: int = 10) -> np.ndarray:
    """Segment labels `[h, w]` int32 by k-means on the row-normalised spectral embedding (`spectral_features`).

    `eigvals` `[K]`, when given, weight the embedding (diffusion map, λ¹) and make method="eigengap" possible.
    With `k=None`, k is chosen by `auto_k(method=...)` in `k_range`: "silhouette-tol" (default: the smallest k
    within 0.05 of the best mean silhouette of the embedding's k-means), "silhouette" (the best one), or
    "eigengap" on `eigvals`. Labels are numbered by segment size, largest first.
    """
    h, w = np.shape(eigvecs)[1:]
    f = spectral_features(eigvecs, skip_first, normalize=True, eigvals=eigvals)
    return cluster_embedding(f, k, method, eigvals, seed, k_range, n_init)[0].labels.reshape(h, w)
