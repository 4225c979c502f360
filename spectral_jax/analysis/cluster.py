"""Analysis of pseudo-eigenvectors: PCA colours, k-means segments with an automatic k, figure/ground, instance
masks, and the metrics and linear probes used to evaluate them. Pure functions on numpy arrays.

Shape legend
    K      eigenvectors, sorted by eigenvalue, largest first; index 0 is the near-constant trivial vector
    (h, w) the eigenvectors' grid;  N = h*w pixels, flattened row-major (n = y*w + x)
    (H, W) an image's size in pixels
    F      feature width per pixel (K-1 with `skip_first`);  T  regression targets;  k  clusters
    M      instance masks

Everything random takes a `seed`: the same inputs and seed give the same outputs. Arithmetic is float64
inside; functions returning continuous maps say their dtype. scipy is needed for connected components
(`instance_masks`) and the Hungarian matching (`miou_hungarian`); it is imported where used.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from spectral_jax.errors import InputError

__all__ = [
    "spectral_features", "pca_rgb", "KMeans", "kmeans", "AutoK", "auto_k", "segment", "bipartition",
    "instance_masks", "iou", "miou_hungarian", "upsample", "grid_coords", "Probe", "linear_probe",
]


# ----------------------------------------------------------------------------------------------------------------
# features


def _eigvecs(eigvecs, skip_first: bool) -> np.ndarray:
    """Validate `[K, h, w]` eigenvectors; returns float64."""
    e = np.asarray(eigvecs)
    if e.ndim != 3:
        raise InputError("eigvecs", f"must be [K, h, w], got shape {e.shape}",
                         "pass one image's eigenvectors, e.g. result.eigvecs[b]")
    if not np.issubdtype(e.dtype, np.floating):
        raise InputError("eigvecs", f"must be floating point, got {e.dtype}", "pass the solver's float eigvecs")
    if e.shape[0] < (2 if skip_first else 1) or e.shape[1] < 1 or e.shape[2] < 1:
        raise InputError("eigvecs", f"shape {e.shape} is too small",
                         "solve for at least 2 eigenvectors (the first is the trivial one)")
    if not np.all(np.isfinite(e)):
        raise InputError("eigvecs", "contains NaN or Inf", "check the solver's diagnostics and re-solve")
    return e.astype(np.float64)


def spectral_features(eigvecs, skip_first: bool = True, normalize: bool = True, eigvals=None,
                      t: float = 1.0) -> np.ndarray:
    """Per-pixel spectral embedding `[N, F]` (float64) from eigenvectors `[K, h, w]`.

    Row n is (x_1[n], ..., x_{K-1}[n]) (from x_0 when `skip_first` is False). With `eigvals` `[K]`, column i is
    scaled by max(λ_i, 0)^t — the diffusion-map embedding, which keeps weak eigenvectors (within-segment modes,
    noise) from splitting segments. With `normalize`, each row is then scaled to unit length as in Ng-Jordan-Weiss
    spectral clustering (all-zero rows stay zero).
    """
    e = _eigvecs(eigvecs, skip_first)
    f = e.reshape(e.shape[0], -1).T  # [N, K]
    if eigvals is not None:
        lam = np.asarray(eigvals, np.float64).reshape(-1)
        if lam.shape[0] != e.shape[0] or not np.all(np.isfinite(lam)):
            raise InputError("eigvals", f"must be {e.shape[0]} finite values (one per eigenvector), got {lam.shape}",
                             "pass the eigvals that came with these eigvecs")
        f = f * np.maximum(lam, 0.0) ** t
    if skip_first:
        f = f[:, 1:]
    if normalize:
        norm = np.linalg.norm(f, axis=1, keepdims=True)
        f = f / np.where(norm > 0, norm, 1.0)
    return f


def pca_rgb(eigvecs, skip_first: bool = True, clip: tuple[float, float] = (1.0, 99.0), *, eigvals=None,
            t: float = 1.0) -> np.ndarray:
    """Colours `[h, w, 3]` float32 in [0, 1] from eigenvectors `[K, h, w]` (and optionally their eigvals `[K]`):
    red, green, blue = the first three non-trivial eigenvectors x_1, x_2, x_3 (x_0, x_1, x_2 when `skip_first` is
    False) as diffusion coordinates.

    Channel c is y_c = s_c · max(λ_c, 0)^t · (x_c − mean x_c) (all λ = 1 without `eigvals`: plain spectral
    coordinates), and colour_c = 0.5 + 0.5 · clip(y_c / q, −1, 1) with one q for the three channels: the larger of
    −(the `clip[0]` percentile) and the `clip[1]` percentile of all their y values. So grey (0.5) is a channel's
    mean, a weak eigenvector gives pale colour, and colour distance is proportional to diffusion distance in these
    three coordinates up to clipping. The sign s_c = ±1 makes Σ_n r_n (x_c[n] − mean) positive, r = 1 / ((1 + 2u)
    (1 + 4v)) for pixel centres at fractions u = (y + ½)/h, v = (x + ½)/w: the side towards the top-left corner is
    bright (exact ties: the first non-zero value is positive), so flipping an eigenvector's sign leaves the picture
    unchanged. r has no mirror symmetry of the grid, so symmetric splits (left/right, diagonal, checkerboard) get a
    clear sign. Missing channels (fewer than three eigenvectors) and an all-zero input are 0.5.

    Why not PCA: the eigenvectors are orthonormal, so the principal axes of these coordinates are the eigenvectors
    themselves (covariance ≈ diag(λ^2t)) or, where eigenvalues (nearly) coincide, an arbitrary rotation that jumps
    with rounding. Fixed channels are continuous in (eigvecs, eigvals) (except where a sign sum above crosses 0, as
    any sign rule must somewhere), and use only elementwise arithmetic, exactly rounded sums (`math.fsum`) and
    percentiles: bit-identical inputs give bit-identical colours, whatever their memory layout or the BLAS.
    """
    lo_p, hi_p = clip
    if not 0.0 <= lo_p < hi_p <= 100.0:
        raise InputError("clip", f"must be percentiles 0 <= lo < hi <= 100, got {clip}", "e.g. clip=(1, 99)")
    if not (np.isfinite(t) and t >= 0):
        raise InputError("t", f"must be a finite diffusion time >= 0, got {t}", "e.g. t=1")
    f = spectral_features(eigvecs, skip_first, normalize=False, eigvals=eigvals, t=t)  # [N, F]
    h, w = np.shape(eigvecs)[1:]
    u, v = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    r = (1.0 / ((1.0 + 2.0 * u) * (1.0 + 4.0 * v))).reshape(-1)  # [N] sign reference
    c = min(3, f.shape[1])
    y = np.zeros((f.shape[0], c))
    for j in range(c):
        col = np.ascontiguousarray(f[:, j])
        col = col - math.fsum(col.tolist()) / col.shape[0]
        side = math.fsum((r * col).tolist())
        nz = np.flatnonzero(col)
        y[:, j] = -col if side < 0 or (side == 0 and nz.size and col[nz[0]] < 0) else col
    out = np.full((f.shape[0], 3), 0.5)
    q = max(-np.percentile(y, lo_p), np.percentile(y, hi_p)) if c else 0.0
    if q > 0:
        out[:, :c] = 0.5 + 0.5 * np.clip(y / q, -1.0, 1.0)
    return out.reshape(h, w, 3).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# k-means and the choice of k


class KMeans(NamedTuple):
    """k-means result. Clusters are numbered by size, largest first (ties: earliest first pixel)."""

    labels: np.ndarray  # [N] int32
    centers: np.ndarray  # [k, F] float64
    inertia: float  # sum over points of the squared distance to their centre


def _features(features, name: str = "features") -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise InputError(name, f"must be [N, F] with N, F >= 1, got shape {x.shape}", "reshape to points x features")
    if not np.all(np.isfinite(x)):
        raise InputError(name, "contains NaN or Inf", "drop or fix those rows")
    return x.astype(np.float64)


def _sqdist(x: np.ndarray, x2: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances `[N, k]` of points x `[N, F]` (squared norms x2 `[N]`) to centres c `[k, F]`."""
    return np.maximum(x2[:, None] - 2.0 * (x @ c.T) + np.einsum("kf,kf->k", c, c)[None, :], 0.0)


def _kmeans_pp(x: np.ndarray, x2: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: first centre uniform, each next one drawn with probability ∝ D(x)², D = distance to the
    nearest centre chosen so far."""
    n = x.shape[0]
    idx = [int(rng.integers(n))]
    d = _sqdist(x, x2, x[idx])[:, 0]
    for _ in range(1, k):
        cum = np.cumsum(d)
        if cum[-1] > 0:
            i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            i = min(i, n - 1)
        else:  # fewer distinct points than k
            i = int(rng.integers(n))
        idx.append(i)
        d = np.minimum(d, _sqdist(x, x2, x[i : i + 1])[:, 0])
    return x[idx].copy()


def _lloyd(x, x2, c, iters: int, tol: float):
    """Lloyd iterations from centres c `[k, F]`; returns (labels `[N]`, centres = their means, inertia)."""
    n, k = x.shape[0], c.shape[0]
    labels = None
    rows = np.arange(n)
    xt = np.ascontiguousarray(x.T)  # [F, N], for the per-feature bincounts
    for _ in range(iters):
        dist = _sqdist(x, x2, c)
        new = dist.argmin(1)
        counts = np.bincount(new, minlength=k)
        own = dist[rows, new]
        for j in np.flatnonzero(counts == 0):  # empty cluster: take the point farthest from its centre
            far = int(np.argmax(np.where(counts[new] > 1, own, -1.0)))
            counts[new[far]] -= 1
            new[far] = j
            counts[j] = 1
            own[far] = -1.0
        c_new = np.stack([np.bincount(new, weights=col, minlength=k) for col in xt], 1) / counts[:, None]
        shift = float(np.sum((c_new - c) ** 2))
        done = labels is not None and np.array_equal(new, labels)
        labels, c = new, c_new
        if done or shift <= tol:
            break
    inertia = float(np.sum((x - c[labels]) ** 2))
    return labels, c, inertia


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


def kmeans(features, k: int, seed: int = 0, n_init: int = 10, iters: int = 100, tol: float = 1e-6) -> KMeans:
    """k-means on `features` `[N, F]`: k-means++ seeding, Lloyd iterations, best of `n_init` runs by inertia.

    Minimises Σ_n ||x_n − c_{label(n)}||². A run stops when assignments stop changing, when the centres' total
    squared move is below `tol` × the features' mean variance, or after `iters` iterations. An empty cluster takes
    the point farthest from its centre.
    Deterministic: run r uses `SeedSequence(seed).spawn(n_init)[r]`.
    """
    x = _features(features)
    n = x.shape[0]
    if not 1 <= int(k) <= n:
        raise InputError("k", f"must be in [1, N={n}], got {k}", "ask for fewer clusters")
    if n_init < 1 or iters < 1:
        raise InputError("n_init/iters", f"must be >= 1, got {n_init}/{iters}", "use e.g. n_init=10, iters=100")
    k = int(k)
    x2 = np.einsum("nf,nf->n", x, x)
    tol_abs = tol * float(x.var(0).mean())
    best = None
    for ss in np.random.SeedSequence(seed).spawn(n_init):
        rng = np.random.default_rng(ss)
        labels, centers, inertia = _lloyd(x, x2, _kmeans_pp(x, x2, k, rng), iters, tol_abs)
        if best is None or inertia < best[2]:
            best = (labels, centers, inertia)
    labels, centers = _canonical(*best[:2])
    return KMeans(labels, centers, best[2])


class AutoK(NamedTuple):
    """The chosen number of clusters and the score of every candidate."""

    k: int
    ks: np.ndarray  # [m] candidate k, ascending
    scores: np.ndarray  # [m] mean silhouette or eigengap; higher is better
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


def auto_k(features=None, k_range: tuple[int, int] = (2, 10), method: str = "silhouette", eigvals=None,
           seed: int = 0, max_samples: int = 2000, n_init: int = 10, iters: int = 100) -> AutoK:
    """Choose the number of clusters k in `k_range` (both ends included).

    - "silhouette": k-means (`seed`, `n_init`) on all of `features` `[N, F]` for every k; the mean silhouette
      s = (b − a) / max(a, b) (a: mean distance to the own cluster, b: to the nearest other cluster) is computed on
      a subsample of at most `max_samples` points drawn with `seed`. Needs 2 <= k <= N − 1.
    - "eigengap": needs `eigvals` `[K]` (sorted descending here); the score of k is λ_{k−1} − λ_k, the gap after
      the k-th eigenvalue (k clusters ↔ k eigenvalues near 1 for a row-stochastic affinity). `features` unused.
    The highest score wins; ties go to the smallest k.
    """
    lo, hi = (int(v) for v in k_range)
    if lo < 1 or hi < lo:
        raise InputError("k_range", f"must be (lo, hi) with 1 <= lo <= hi, got {k_range}", "e.g. k_range=(2, 10)")
    if method == "eigengap":
        if eigvals is None:
            raise InputError("eigvals", "method='eigengap' needs eigenvalues", "pass eigvals=result.eigvals")
        lam = np.sort(np.asarray(eigvals, np.float64).reshape(-1))[::-1]
        ks = np.arange(lo, min(hi, lam.shape[0] - 1) + 1)
        if ks.size == 0:
            raise InputError("eigvals", f"{lam.shape[0]} eigenvalues give no gap for k in {k_range}",
                             "solve for more eigenvectors or lower k_range")
        scores = lam[ks - 1] - lam[ks]
    elif method == "silhouette":
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
        xs = x[sub]
        x2 = np.einsum("nf,nf->n", xs, xs)
        d = np.sqrt(_sqdist(xs, x2, xs))
        np.fill_diagonal(d, 0.0)
        scores = np.array([_silhouette(d, kmeans(x, int(k), seed, n_init, iters).labels[sub]) for k in ks])
    else:
        raise InputError("method", f"unknown method {method!r}", "use 'silhouette' or 'eigengap'")
    i = int(np.argmax(scores))
    return AutoK(int(ks[i]), ks, np.asarray(scores, np.float64), method)


def segment(eigvecs, k: int | None = None, method: str = "silhouette", eigvals=None, seed: int = 0,
            skip_first: bool = True, k_range: tuple[int, int] = (2, 10), n_init: int = 10) -> np.ndarray:
    """Segment labels `[h, w]` int32 by k-means on the row-normalised spectral embedding (`spectral_features`).

    `eigvals` `[K]`, when given, weight the embedding (diffusion map, λ¹) and make method="eigengap" possible.
    With `k=None`, k is chosen by `auto_k(method=...)` in `k_range`: "silhouette" on the embedding, or "eigengap"
    on `eigvals`. Labels are numbered by segment size, largest first.
    """
    h, w = np.shape(eigvecs)[1:]
    f = spectral_features(eigvecs, skip_first, normalize=True, eigvals=eigvals)
    if k is None:
        k = auto_k(f, k_range, method, eigvals, seed, n_init=n_init).k
    return kmeans(f, int(k), seed, n_init).labels.reshape(h, w)


# ----------------------------------------------------------------------------------------------------------------
# figure/ground and instances


def _border(h: int, w: int) -> np.ndarray:
    b = np.zeros((h, w), bool)
    b[0, :] = b[-1, :] = b[:, 0] = b[:, -1] = True
    return b


def bipartition(eigvecs, image_prior: str | None = "border", threshold: str = "zero", index: int = 1) -> np.ndarray:
    """Foreground mask `[h, w]` bool from the first non-trivial eigenvector x = eigvecs[index].

    The grid is split into S+ = {x > t} and S− = its complement, t = 0 (`threshold="zero"`; the vector is orthogonal
    to the trivial one, so both signs occur) or t = mean(x) (`"mean"`). Eigenvector signs are arbitrary, so a
    prior picks which side is the object:
    - "border" (the Deep-Spectral/TokenCut-style heuristic): objects rarely fill the frame, so the foreground is the
      side holding fewer of the grid's border pixels; ties go to the smaller side, then to S+;
    - "area": the smaller side; None: S+ as is.
    If one side is empty the mask is all False (no object found).
    """
    e = _eigvecs(eigvecs, skip_first=False)
    if not 0 <= index < e.shape[0]:
        raise InputError("index", f"must be in [0, {e.shape[0]}), got {index}", "use index=1 (the Fiedler vector)")
    x = e[index]
    if threshold == "zero":
        t = 0.0
    elif threshold == "mean":
        t = float(x.mean())
    else:
        raise InputError("threshold", f"unknown threshold {threshold!r}", "use 'zero' or 'mean'")
    pos = x > t
    neg = ~pos
    if not pos.any() or not neg.any():
        return np.zeros(x.shape, bool)
    area_p, area_n = int(pos.sum()), int(neg.sum())
    if image_prior is None:
        return pos
    if image_prior == "area":
        return pos if area_p <= area_n else neg
    if image_prior == "border":
        border = _border(*x.shape)
        bp, bn = int((pos & border).sum()), int((neg & border).sum())
        if bp != bn:
            return pos if bp < bn else neg
        return pos if area_p <= area_n else neg
    raise InputError("image_prior", f"unknown prior {image_prior!r}", "use 'border', 'area' or None")


def _components(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected components of every label's region: component ids `[h, w]` int64, numbered 0..C-1."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    comp = np.full(labels.shape, -1, np.int64)
    nxt = 0
    for c in np.unique(labels):
        cc, m = ndimage.label(labels == c, structure=structure)
        comp[cc > 0] = cc[cc > 0] - 1 + nxt
        nxt += m
    return comp


def _adjacency(comp: np.ndarray, n: int, connectivity: int) -> np.ndarray:
    """Shared-boundary lengths `[C, C]` (pixel pairs) between components."""
    pairs = [(comp[:, :-1], comp[:, 1:]), (comp[:-1, :], comp[1:, :])]
    if connectivity == 8:
        pairs += [(comp[:-1, :-1], comp[1:, 1:]), (comp[:-1, 1:], comp[1:, :-1])]
    adj = np.zeros((n, n), np.int64)
    for a, b in pairs:
        a, b = a.reshape(-1), b.reshape(-1)
        d = a != b
        np.add.at(adj, (a[d], b[d]), 1)
        np.add.at(adj, (b[d], a[d]), 1)
    return adj


def _merge_small(comp: np.ndarray, min_pixels: int, connectivity: int) -> np.ndarray:
    """Merge every component smaller than `min_pixels` into the neighbour it shares the longest boundary with
    (smallest first; ties: the lowest id); isolated small components stay. Returns ids renumbered 0..C'-1."""
    n = int(comp.max()) + 1
    area = np.bincount(comp.reshape(-1), minlength=n).astype(np.int64)
    adj = _adjacency(comp, n, connectivity)
    target = np.arange(n)
    while True:
        small = np.flatnonzero((area > 0) & (area < min_pixels) & (adj.sum(1) > 0))
        if small.size == 0:
            break
        s = int(small[np.argmin(area[small])])
        t = int(np.argmax(adj[s]))
        target[target == s] = t
        area[t] += area[s]
        area[s] = 0
        adj[t] += adj[s]
        adj[:, t] += adj[:, s]
        adj[t, t] = 0
        adj[s] = 0
        adj[:, s] = 0
    _, merged = np.unique(target[comp], return_inverse=True)
    return merged.reshape(comp.shape)


def _nms(masks: list[np.ndarray], scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first (ties: the earlier mask)."""
    order = np.argsort(-scores, kind="stable")
    flat = np.stack([m.reshape(-1) for m in masks]).astype(np.float64) if masks else np.zeros((0, 0))
    area = flat.sum(1)
    keep: list[int] = []
    for i in order:
        if keep:
            inter = flat[keep] @ flat[i]
            ious = inter / (area[keep] + area[i] - inter)
            if np.any(ious > iou_threshold):
                continue
        keep.append(int(i))
    return keep


def instance_masks(eigvecs, seed: int = 0, ks: Sequence[int] | None = None, k_range: tuple[int, int] = (2, 10),
                   method: str = "silhouette", eigvals=None, skip_first: bool = True, min_area: float = 0.01,
                   max_area: float = 0.9, max_border: float = 0.5, nms_iou: float = 0.5, connectivity: int = 4,
                   n_init: int = 10):
    """Instance-mask candidates from eigenvectors `[K, h, w]`: returns (masks, scores), masks a list of M `[h, w]`
    bool arrays and scores `[M]` float64, best score first.

    1. k-means segments of the row-normalised spectral embedding (weighted by `eigvals` when given, as in
       `segment`) for every k in `ks` (default: the one k that `auto_k(method)` picks in `k_range`);
    2. connected components (`connectivity` 4 or 8) of every segment — two separate blobs of one cluster become two
       instances;
    3. region merging: a component smaller than `min_area` (fraction of the N pixels) joins the neighbouring
       component with which it shares the longest boundary, smallest first;
    4. background is dropped: candidates covering more than `max_area` of the grid, or holding more than
       `max_border` of the grid's border pixels (1.0 keeps them); each remaining one is scored by
       ||mean embedding inside − mean embedding outside|| (in [0, 2]: how distinct the region is);
    5. non-maximum suppression: a candidate whose IoU with a better-scored kept one exceeds `nms_iou` is dropped.
    """
    if connectivity not in (4, 8):
        raise InputError("connectivity", f"must be 4 or 8, got {connectivity}", "use 4 or 8")
    if not 0.0 <= max_border <= 1.0:
        raise InputError("max_border", f"must be a fraction in [0, 1], got {max_border}", "e.g. 0.5; 1.0 disables")
    if not 0.0 <= min_area <= max_area <= 1.0:
        raise InputError("min_area/max_area", f"need 0 <= min_area <= max_area <= 1, got {min_area}/{max_area}",
                         "e.g. min_area=0.01, max_area=0.9")
    h, w = np.shape(eigvecs)[1:]
    n = h * w
    f = spectral_features(eigvecs, skip_first, normalize=True, eigvals=eigvals)
    if ks is None:
        ks = [auto_k(f, k_range, method, eigvals, seed, n_init=n_init).k]
    min_pixels = max(1, int(np.ceil(min_area * n)))
    masks: list[np.ndarray] = []
    scores: list[float] = []
    total = f.sum(0)
    border = _border(h, w)
    n_border = int(border.sum())
    for k in ks:
        labels = kmeans(f, int(k), seed, n_init).labels.reshape(h, w)
        comp = _merge_small(_components(labels, connectivity), min_pixels, connectivity)
        for c in range(int(comp.max()) + 1):
            m = comp == c
            a = int(m.sum())
            if a == 0 or a > max_area * n or a < min_pixels or (m & border).sum() > max_border * n_border:
                continue
            inside = f[m.reshape(-1)].sum(0)
            score = float(np.linalg.norm(inside / a - (total - inside) / (n - a))) if a < n else 0.0
            masks.append(m)
            scores.append(score)
    keep = _nms(masks, np.asarray(scores), nms_iou)
    return [masks[i] for i in keep], np.asarray([scores[i] for i in keep], np.float64)


# ----------------------------------------------------------------------------------------------------------------
# metrics


def iou(pred, gt) -> float:
    """Intersection over union |pred ∧ gt| / |pred ∨ gt| of two bool masks of one shape; 1.0 when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise InputError("pred/gt", f"shapes differ: {p.shape} vs {g.shape}", "upsample the prediction first")
    union = int(np.logical_or(p, g).sum())
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def miou_hungarian(pred_labels, gt_labels, ignore=None, match: str = "count"):
    """Mean IoU after a one-to-one Hungarian matching of predicted segments to ground-truth classes.

    pred_labels, gt_labels: int arrays of one shape (any values); pixels whose gt label is in `ignore` (an int or a
    sequence) are left out. With C[p, g] the confusion counts, the matching maximises Σ C[p, g] (`match="count"`,
    as unsupervised-segmentation evaluations do) or Σ IoU[p, g] (`"iou"`), IoU[p, g] = C / (|p| + |g| − C).
    mIoU averages IoU over all gt classes present; a class left unmatched (fewer segments than classes) scores 0.
    Returns (miou, matching) with matching a dict {pred label: gt label}.
    """
    from scipy.optimize import linear_sum_assignment

    p, g = np.asarray(pred_labels), np.asarray(gt_labels)
    if p.shape != g.shape:
        raise InputError("pred_labels/gt_labels", f"shapes differ: {p.shape} vs {g.shape}",
                         "upsample the prediction to the ground truth's size first")
    valid = np.ones(g.shape, bool) if ignore is None else ~np.isin(g, np.atleast_1d(np.asarray(ignore)))
    if not valid.any():
        raise InputError("gt_labels", "no pixel is left after removing `ignore`", "check the ignore label")
    pv, pi = np.unique(p[valid], return_inverse=True)
    gv, gi = np.unique(g[valid], return_inverse=True)
    conf = np.bincount(pi.reshape(-1) * gv.size + gi.reshape(-1), minlength=pv.size * gv.size)
    conf = conf.reshape(pv.size, gv.size).astype(np.float64)
    ious = conf / (conf.sum(1, keepdims=True) + conf.sum(0, keepdims=True) - conf)
    if match == "count":
        rows, cols = linear_sum_assignment(conf, maximize=True)
    elif match == "iou":
        rows, cols = linear_sum_assignment(ious, maximize=True)
    else:
        raise InputError("match", f"unknown matching {match!r}", "use 'count' or 'iou'")
    per_class = np.zeros(gv.size)
    per_class[cols] = ious[rows, cols]
    matching = {pv[r].item(): gv[c].item() for r, c in zip(rows, cols)}
    return float(per_class.mean()), matching


# ----------------------------------------------------------------------------------------------------------------
# resampling


def _triangle(t):
    return np.maximum(0.0, 1.0 - np.abs(t))


def _cubic(t, a: float = -0.5):
    t = np.abs(t)
    return np.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((t - 5) * t + 8) * t * a - 4 * a, 0.0))


def _resample_matrix(n_in: int, n_out: int, kernel) -> np.ndarray:
    """`[n_out, n_in]` interpolation weights, pixel centres at i + 0.5; when shrinking, the kernel is widened by
    n_in / n_out (antialiasing); weights of out-of-range taps are dropped and each row renormalised."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    t = ((np.arange(n_in) + 0.5)[None, :] - centres[:, None]) / support
    wts = kernel(t)
    return wts / wts.sum(1, keepdims=True)


def upsample(x, size: tuple[int, int], mode: str | None = None) -> np.ndarray:
    """Resize a map `[h, w]` or `[h, w, C]` to `size` = (H, W).

    mode None picks "nearest" for integer/bool input (labels, masks; the dtype is kept) and "bilinear" otherwise.
    "nearest": pixel (i, j) takes source (⌊(i + ½)·h/H⌋, ⌊(j + ½)·w/W⌋). "bilinear"/"bicubic" (Keys, a = −½):
    separable, half-pixel centres, antialiased when shrinking, edge taps renormalised — what PIL does; they return
    x's float dtype (float32 for integer input). Despite the name, any size works, smaller ones included.
    """
    a = np.asarray(x)
    if a.ndim not in (2, 3):
        raise InputError("x", f"must be [h, w] or [h, w, C], got shape {a.shape}", "move channels last")
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise InputError("size", f"must be positive (H, W), got {size}", "pass the image's (H, W)")
    h, w = a.shape[:2]
    if mode is None:
        mode = "nearest" if (np.issubdtype(a.dtype, np.integer) or a.dtype == bool) else "bilinear"
    if mode == "nearest":
        iy = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
        ix = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
        return a[iy[:, None], ix[None, :]]
    kernels = {"bilinear": _triangle, "bicubic": _cubic}
    if mode not in kernels:
        raise InputError("mode", f"unknown mode {mode!r}", "use 'nearest', 'bilinear' or 'bicubic'")
    out_dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32
    ry = _resample_matrix(h, H, kernels[mode])
    rx = _resample_matrix(w, W, kernels[mode])
    tmp = np.tensordot(ry, a.astype(np.float64), axes=(1, 0))  # [H, w, ...]
    out = np.moveaxis(np.tensordot(tmp, rx, axes=(1, 1)), -1, 1)  # [H, W, ...]
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# linear probes


def grid_coords(h: int, w: int) -> np.ndarray:
    """Pixel-centre coordinates `[N, 2]` float64, columns (y, x) = ((i + ½)/h, (j + ½)/w), row-major like N."""
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return np.stack([yy.reshape(-1), xx.reshape(-1)], 1)


class Probe(NamedTuple):
    """A fitted ridge probe: prediction = features @ weights + bias (argmax over `classes` for labels)."""

    weights: np.ndarray  # [F, T]
    bias: np.ndarray  # [T]
    score: float  # R² (targets) or accuracy (labels) on the held-out points; in-sample when holdout == 0
    train_score: float
    classes: np.ndarray | None  # [T] label values when fitted to labels, else None

    def predict(self, features) -> np.ndarray:
        """Predictions for `[N, F]` features: `[N, T]` float64, or labels `[N]` for a classification probe."""
        y = np.asarray(features, np.float64) @ self.weights + self.bias
        return y if self.classes is None else self.classes[np.argmax(y, 1)]


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    """R² = 1 − SS_res/SS_tot per target column, averaged (a constant column scores 1 if fitted exactly, else 0)."""
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), (ss_res <= 1e-12).astype(float))
    return float(r2.mean())


def linear_probe(features, targets, ridge: float = 1e-3, holdout: float = 0.0, seed: int = 0) -> Probe:
    """Closed-form ridge regression from `features` `[N, F]` to `targets`.

    targets: float `[N]` or `[N, T]` (scored by R², averaged over columns) or integer/bool labels `[N]` (regressed
    on one-hot codes, predicted by argmax, scored by accuracy). With centred X, Y on the training points,
    W = (XᵀX + ridge·I)⁻¹ XᵀY and b = ȳ − x̄ W (the intercept is not penalised). `holdout` (a fraction) of the
    points, drawn with `seed`, is left out of the fit and gives `score`. E.g. "where": targets = grid_coords(h, w);
    "what": targets = semantic labels.
    """
    x = _features(features)
    n = x.shape[0]
    t = np.asarray(targets)
    if t.shape[0] != n or t.ndim not in (1, 2):
        raise InputError("targets", f"must be [N] or [N, T] with N = {n}, got shape {t.shape}",
                         "pass one target row per feature row")
    classes = None
    if t.ndim == 1 and (np.issubdtype(t.dtype, np.integer) or t.dtype == bool):
        classes, idx = np.unique(t, return_inverse=True)
        y = np.zeros((n, classes.size))
        y[np.arange(n), idx.reshape(-1)] = 1.0
    else:
        y = t.astype(np.float64).reshape(n, -1)
        if not np.all(np.isfinite(y)):
            raise InputError("targets", "contains NaN or Inf", "drop or fix those rows")
    if ridge < 0:
        raise InputError("ridge", f"must be >= 0, got {ridge}", "e.g. ridge=1e-3")
    if not 0.0 <= holdout < 1.0:
        raise InputError("holdout", f"must be a fraction in [0, 1), got {holdout}", "e.g. holdout=0.2")
    n_test = int(round(holdout * n))
    if holdout > 0 and not 1 <= n_test < n:
        raise InputError("holdout", f"{holdout} of {n} points leaves an empty split", "use more points")
    perm = np.random.default_rng(seed).permutation(n) if n_test else np.arange(n)
    test, train = perm[:n_test], perm[n_test:]
    xm, ym = x[train].mean(0), y[train].mean(0)
    xc, yc = x[train] - xm, y[train] - ym
    gram = xc.T @ xc
    if ridge > 0:
        wts = np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), xc.T @ yc)
    else:
        wts = np.linalg.lstsq(xc, yc, rcond=None)[0]
    probe = Probe(wts, ym - xm @ wts, 0.0, 0.0, classes)

    def score(rows):
        if classes is None:
            return _r2(y[rows], probe.predict(x[rows]))
        return float(np.mean(probe.predict(x[rows]) == t[rows]))

    tr = score(train)
    return probe._replace(train_score=tr, score=score(test) if n_test else tr)
