"""Dataset-wide segments: one k-means over the spectral embedding of every token of every image, so that segment j
is the same cluster — the same kind of thing — in every image.

    res = spectral_jax.dataset.run("photos/", "out/", graph="knn-vv")    # writes OUT/segments.npz, segments.png too
    seg = spectral_jax.dataset.segments(res, num_segments="auto", seed=0)
    seg.labels[i]          # [h, w] segment of each patch of image i (res.names[i]); ids shared by all images

Embedding — the single-image path's (`analysis.spectral_features`), over all tokens at once: token t gets the row
(λ_1·x_1[t], …, λ_{K−1}·x_{K−1}[t]) of the dataset eigenvectors, the near-constant x_0 dropped, each column scaled by
its eigenvalue (the diffusion map at time 1: weak eigenvectors — within-cluster modes, noise — count less), then the
row scaled to unit length (Ng–Jordan–Weiss: a token's position on the sphere, not its degree, says its cluster).
Eigenvalues come from the run's summary (method exact); a gd run has none, and its columns stay unweighted.

Clustering: `analysis.kmeans` — greedy k-means++ seeding, Lloyd iterations, the best of `n_init` runs by inertia,
every random choice from `seed`, one jitted JAX program on the default device (`analysis.lloyd`) — on the `[N, K−1]`
embedding; segments are numbered by size, largest first.

Number of segments: an int (1 … the tokens of the dataset), or "auto":
  - "eigengap" (runs with eigenvalues, K ≥ 3): k = argmax over 2 ≤ k ≤ K−1 of λ_{k−1} − λ_k, the largest drop in
    the spectrum of Σ_l w_l sym(P_l) after the k-th eigenvalue. A graph made of k groups of tokens with few edges
    between them has k eigenvalues near the top and a gap after them (von Luxburg, "A tutorial on spectral
    clustering", 2007, §8.3); the same criterion `analysis.segment(method="eigengap")` uses per image. It is free
    (the eigenvalues are the solve's) and depends on no k-means run. k is at most K − 1: a partition finer than the
    spectrum that was solved for cannot be read off it — pass a number for more.
  - "silhouette" (no eigenvalues: gd runs; or K = 2): k-means (3 runs each) for every k in [2, K − 1], and the mean
    silhouette of a seeded subsample of at most 2 000 tokens (`analysis.auto_k`); the highest wins, ties to the
    smallest k.
Memory: the embedding `[N, K−1]` float64 on the host, and on the device its float32 copy and one run's `[N, k]`
scores (N and k padded to their buckets, ≤ 25 % and < 2× more): O(N·(K + k)), never N×N.

Shape legend
    n  images    (h, w)  the eigenvectors' grid    N = n·h·w tokens    K  eigenvectors    F = K − 1    k  segments
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from spectral_jax.errors import InputError

SILHOUETTE_RUNS = 3          # k-means runs per candidate k while scanning by silhouette (the final clustering: n_init)


class Segments(NamedTuple):
    """Dataset-wide segments of n images (see the module docstring)."""

    labels: np.ndarray      # [n, h, w] int32, segment j = the j-th largest cluster over the whole dataset
    centers: np.ndarray     # [k, F] float64, the cluster centres in the embedding
    num_segments: int       # k
    rule: str               # "given" | "eigengap" | "silhouette" | "one token" (fewer than 3 tokens: k = 1) |
    #                         "no structure" (every token's embedding the same: k = 1, `analysis.structureless`)
    asked: object           # the request: an int or "auto"
    candidates: np.ndarray  # [m] the k that "auto" scored (empty when k was given)
    scores: np.ndarray      # [m] their scores (eigengap or mean silhouette), higher is better
    sizes: np.ndarray       # [k] int64 tokens per segment
    images: np.ndarray      # [k] int64 images in which the segment has at least one token
    embedding: str          # what was clustered, in words
    converged: bool = True  # the k-means' best run settled before its iteration cap (`analysis.KMeans.converged`)

    def report(self) -> dict:
        """JSON-ready: the numbers summary.json holds under "segments"."""
        return {"num_segments": self.num_segments, "asked": self.asked, "rule": self.rule,
                "embedding": self.embedding, "sizes": [int(v) for v in self.sizes],
                "images": [int(v) for v in self.images],
                "candidates": [int(v) for v in self.candidates],
                "scores": [round(float(v), 6) for v in self.scores], "kmeans_converged": self.converged}

    def arrays(self, names) -> dict:
        """The arrays of segments.npz: segments `[n, h, w]` int32, names `[n]`, centers `[k, F]`, num_segments,
        rule, asked, sizes `[k]`, images `[k]`, candidates `[m]`, scores `[m]`, embedding."""
        return dict(segments=self.labels.astype(np.int32), names=np.asarray(list(names), dtype=str),
                    centers=self.centers.astype(np.float32), num_segments=np.int64(self.num_segments),
                    rule=np.array(self.rule), asked=np.array(str(self.asked)), sizes=self.sizes.astype(np.int64),
                    images=self.images.astype(np.int64), candidates=self.candidates.astype(np.int64),
                    scores=self.scores.astype(np.float64), embedding=np.array(self.embedding))

    @classmethod
    def from_arrays(cls, d: dict) -> "Segments":
        """Inverse of `arrays` (names dropped: they are the result's)."""
        asked = str(d["asked"])
        return cls(np.asarray(d["segments"], np.int32), np.asarray(d["centers"], np.float64), int(d["num_segments"]),
                   str(d["rule"]), int(asked) if asked.isdigit() else asked, np.asarray(d["candidates"]),
                   np.asarray(d["scores"]), np.asarray(d["sizes"]), np.asarray(d["images"]), str(d["embedding"]))


def check_count(num_segments, tokens: int, flag: str = "--segments", how: str = "") -> None:
    """Refuse a number of segments above the `tokens` of the dataset (one `InputError` line, its fix opening with
    `how`); "auto" passes."""
    if num_segments != "auto" and int(num_segments) > tokens:
        raise InputError(flag, f"{num_segments} segments are more than the {tokens} tokens of the dataset",
                         f"{how}pass {flag} ≤ {tokens}, or {flag} auto")


def embedding(eigvecs, eigvals=None) -> np.ndarray:
    """The dataset embedding `[N, K−1]` float64 of eigenvectors `[n, K, h, w]` (rows image-major: token
    t = (i·h + y)·w + x): `analysis.spectral_features` (x_0 dropped, × λ when `eigvals` `[K]` are given, rows
    unit-length) on the images stacked along the grid's rows."""
    from spectral_jax.analysis.features import spectral_features

    e = np.asarray(eigvecs)
    if e.ndim != 4:
        raise InputError("eigvecs", f"must be [n, K, h, w], got shape {e.shape}", "pass a dataset run's eigvecs")
    n, k, h, w = e.shape
    stacked = np.transpose(e, (1, 0, 2, 3)).reshape(k, n * h, w)         # [K, n·h, w]: image i = rows i·h …
    return spectral_features(stacked, skip_first=True, normalize=True, eigvals=eigvals)


def segments(result, num_segments="auto", seed: int = 0, *, eigvals=None, n_init: int = 10) -> Segments:
    """Dataset-wide segments of `result` (a `DatasetResult`, or anything with `eigvecs` `[n, K, h, w]` and a
    `summary` dict): k-means of the dataset embedding into `num_segments` clusters (an int, or "auto"). eigvals
    `[K]`: default the run's (`_run_eigvals`: exact runs; a gd run has none and clusters unweighted). Deterministic
    for a given `seed`."""
    from spectral_jax.analysis.cluster import cluster_embedding

    e = np.asarray(result.eigvecs)
    if eigvals is None:
        eigvals = _run_eigvals(result)
    f = embedding(e, eigvals)
    n, k_eigs, h, w = e.shape
    tokens = f.shape[0]
    asked = _count(num_segments)
    check_count(asked, tokens, "num_segments")
    weighted = "λ-weighted (diffusion map, t = 1)" if eigvals is not None else "unweighted (no eigenvalues)"
    what = f"eigenvectors 2–{k_eigs} of every token, {weighted}, rows unit-length"
    cand, scores = np.zeros(0, np.int64), np.zeros(0)
    if asked != "auto":
        km, rule = cluster_embedding(f, asked, seed=seed, n_init=n_init)[0], "given"
    elif tokens < 3:
        km, rule = cluster_embedding(f, 1, seed=seed, n_init=n_init)[0], "one token"
    else:
        rule = "eigengap" if eigvals is not None and k_eigs >= 3 else "silhouette"
        km, auto = cluster_embedding(f, None, rule, eigvals, seed, (2, max(2, min(k_eigs - 1, tokens - 1))), n_init,
                                     scan_n_init=min(n_init, SILHOUETTE_RUNS))
        cand, scores = auto.ks, auto.scores
        rule = "no structure" if auto.method == "no structure" else rule     # one segment: nothing to split
    labels = km.labels.reshape(n, h, w)
    num = km.centers.shape[0]
    sizes = np.bincount(km.labels, minlength=num)
    present = np.zeros((n, num), bool)
    present[np.repeat(np.arange(n), h * w), km.labels] = True
    return Segments(labels, km.centers, num, rule, asked, np.asarray(cand, np.int64), np.asarray(scores, np.float64),
                    sizes.astype(np.int64), present.sum(0).astype(np.int64), what, km.converged)


def _run_eigvals(result) -> np.ndarray | None:
    """The run's eigenvalues `[K]` float64: `result.eigvals` (`[K]`, or a `DatasetResult`'s `[n, K]`, the one
    joint solve's row 0) where finite, else summary["eigvals"]; None where neither holds them (gd's NaN)."""
    summary = getattr(result, "record", None)
    for v in (getattr(result, "eigvals", None), summary.get("eigvals") if isinstance(summary, dict) else None):
        if v is not None:
            v = np.asarray(v, np.float64)
            v = v[0] if v.ndim == 2 else v
            if np.isfinite(v).all():
                return v
    return None


def _count(v):
    """"auto" or an int ≥ 1 (as `settings.parse_segments`, for API callers)."""
    from spectral_jax.dataset.settings import parse_segments

    return parse_segments(v, "num_segments")


__all__ = ["Segments", "check_count", "embedding", "segments"]
