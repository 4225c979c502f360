"""Per-pixel spectral embeddings and the RGB picture of eigenvectors; also the input checks the other analysis
modules share (one image's eigenvectors `[K, h, w]`, a point set `[N, F]`). Pure numpy.

Shape legend
    K      eigenvectors, sorted by eigenvalue, largest first; index 0 is the near-constant trivial vector
    (h, w) the eigenvectors' grid;  N = h*w pixels, flattened row-major (n = y*w + x)
    F      feature width per pixel (K-1 with `skip_first`)

Arithmetic is float64 inside; `pca_rgb` returns float32 colours.
"""

from __future__ import annotations

import math

import numpy as np

from spectral_jax.errors import InputError

__all__ = ["spectral_features", "pca_rgb"]


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


def _features(features, name: str = "features") -> np.ndarray:
    """Validate a point set `[N, F]` (N, F >= 1, finite; `name` is the input named in errors); returns float64."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise InputError(name, f"must be [N, F] with N, F >= 1, got shape {x.shape}", "reshape to points x features")
    if not np.all(np.isfinite(x)):
        raise InputError(name, "contains NaN or Inf", "drop or fix those rows")
    return x.astype(np.float64)


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
            got = (f"{lam.shape[0]} values" if lam.shape[0] != e.shape[0]
                   else f"{int(np.sum(~np.isfinite(lam)))} of its {lam.shape[0]} values not finite")
            raise InputError("eigvals", f"must be {e.shape[0]} finite values (one per eigenvector), got {got}",
                             "pass the eigvals that came with these eigvecs, or None to weight them equally")
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
