"""Figure/ground (`bipartition` of the first non-trivial eigenvector) and instance-mask candidates (connected,
merged, scored and suppressed k-means segments). Pure numpy; scipy for connected components, imported where used.

Shape legend
    K      eigenvectors `[K, h, w]`, sorted by eigenvalue, largest first; index 0 is the trivial vector
    (h, w) the eigenvectors' grid;  N = h*w pixels
    C      connected components;  M  instance masks

Everything random takes a `seed`: the same inputs and seed give the same outputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spectral_jax.analysis.cluster import auto_k, kmeans
from spectral_jax.analysis.features import _eigvecs, spectral_features
from spectral_jax.errors import InputError

__all__ = ["bipartition", "instance_masks"]


def _border(h: int, w: int) -> np.ndarray:
    """The grid's outermost pixels, `[h, w]` bool."""
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
    5. non-maximum suppression: a candidate whose IoU with a better-scored kept one exceeds `nms_iou` is dropped;
       `nms_iou` is an IoU in [0, 1]: 0 keeps only candidates disjoint from every better one, 1.0 keeps them all
       (no IoU exceeds 1: suppression off); anything else (NaN included) is refused.

    Why `method="silhouette"` and not `segment`'s "silhouette-tol": for instance candidates, the plain silhouette's
    larger k (more, smaller regions) buys recall; `ks=range(2, 11)` (the union of all nine segmentations) buys more,
    for more candidates. Measurements: benchmarks/results/instances.md.
    """
    if connectivity not in (4, 8):
        raise InputError("connectivity", f"must be 4 or 8, got {connectivity}", "use 4 or 8")
    if not 0.0 <= max_border <= 1.0:
        raise InputError("max_border", f"must be a fraction in [0, 1], got {max_border}", "e.g. 0.5; 1.0 disables")
    if not 0.0 <= min_area <= max_area <= 1.0:
        raise InputError("min_area/max_area", f"need 0 <= min_area <= max_area <= 1, got {min_area}/{max_area}",
                         "e.g. min_area=0.01, max_area=0.9")
    if not 0.0 <= nms_iou <= 1.0:  # also NaN, which compares False with every IoU and so suppressed nothing
        raise InputError("nms_iou", f"must be an IoU in [0, 1], got {nms_iou}", "e.g. 0.5; 1.0 disables suppression")
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
