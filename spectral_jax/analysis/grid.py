"""Grid helpers: resizing a map to another size (nearest / antialiased bilinear, bicubic, as PIL does) and the
pixel-centre coordinates of a grid. Pure numpy.

Shape legend
    (h, w) a source grid (e.g. the eigenvectors');  (H, W) a target size (e.g. the image's pixels)
    C      channels;  N = h*w pixels, flattened row-major (n = y*w + x)
"""

from __future__ import annotations

import numpy as np

from spectral_jax.errors import InputError

__all__ = ["upsample", "grid_coords"]


def _triangle(t):
    """The bilinear (tent) kernel max(0, 1 − |t|)."""
    return np.maximum(0.0, 1.0 - np.abs(t))


def _cubic(t, a: float = -0.5):
    """Keys' cubic convolution kernel with parameter `a` (−½: PIL's bicubic)."""
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


def grid_coords(h: int, w: int) -> np.ndarray:
    """Pixel-centre coordinates `[N, 2]` float64, columns (y, x) = ((i + ½)/h, (j + ½)/w), row-major like N."""
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    return np.stack([yy.reshape(-1), xx.reshape(-1)], 1)
