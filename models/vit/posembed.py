"""Position-embedding resampling, reproducing `torch.nn.functional.interpolate(mode="bicubic")` exactly.

Each reference ViT stores position embeddings for one square grid and resamples them with torch's bicubic
interpolation (`align_corners=False`) for other image sizes. Bicubic resampling is separable and linear, so it is
a pair of matrices: `out[a, b] = sum_ij Wh[a, i] Ww[b, j] in[i, j]`. We build those matrices in numpy (in float32
arithmetic, as torch does; cached per size pair) and apply them with one einsum, which keeps the whole forward
jittable for any static grid.

Two torch kernels are reproduced:
- `antialias=False` (ViT, DINOv2, MAE, CLIP): Keys cubic with A = -0.75, source index `s = (i + 0.5) * in/out - 0.5`,
  taps `floor(s) - 1 .. floor(s) + 2` clamped to the border (border values repeat).
- `antialias=True` (DINOv2 with registers): the PIL-style filter with A = -0.5, support 2 (times in/out when
  shrinking, with the filter stretched by the same factor), taps truncated at the border and renormalised to sum 1.
"""

from __future__ import annotations

import functools

import numpy as np


_F = np.float32  # torch computes the weights of a float32 resize in float32; so do we, in its order of operations


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) with parameter `a` (zero for |x| >= 2), in float32."""
    x, a = np.abs(x).astype(_F), _F(a)
    near = ((a + _F(2)) * x - (a + _F(3))) * x * x + _F(1)
    far = ((a * x - _F(5) * a) * x + _F(8) * a) * x - _F(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, _F(0))).astype(_F)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """`[out_size, in_size]` float32 matrix W with `W @ x` = torch's 1-D bicubic resize of x (align_corners=False).

    Applying W along both axes reproduces `F.interpolate(x, size=..., mode="bicubic", align_corners=False,
    antialias=antialias)` on float32 input to within a few float32 ulps.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = _F(in_size) / _F(out_size)
    w = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    if not antialias:
        src = scale * (rows.astype(_F) + _F(0.5)) - _F(0.5)
        base = np.floor(src)
        t = np.clip(src - base, _F(0), _F(1))
        one_minus_t = _F(1) - t
        coeffs = (_cubic(t + _F(1), -0.75), _cubic(t, -0.75), _cubic(one_minus_t, -0.75),
                  _cubic(one_minus_t + _F(1), -0.75))
        for offset, c in zip(range(-1, 3), coeffs):  # taps floor(s)-1 .. floor(s)+2, clamped to the border
            np.add.at(w, (rows, np.clip(base.astype(np.int64) + offset, 0, in_size - 1)), c)
        return w
    support = _F(2) * scale if scale >= 1 else _F(2)
    inv = _F(1) / scale if scale >= 1 else _F(1)
    for i in range(out_size):
        center = scale * (_F(i) + _F(0.5))
        lo = max(int(center - support + _F(0.5)), 0)  # int() truncates toward zero, as the C++ cast does
        hi = min(int(center + support + _F(0.5)), in_size)
        taps = _cubic((np.arange(lo, hi).astype(_F) - center + _F(0.5)) * inv, -0.5)
        total = taps.sum(dtype=_F)
        w[i, lo:hi] = taps / total if total != 0 else taps
    return w


def resize_grid(grid, out_hw: tuple[int, int], antialias: bool = False):
    """Bicubic-resize a `[h, w, C]` grid (numpy or jax array) to `[H, W, C]` as torch does; float32 result.

    `out = Wh @ grid @ Ww^T` per channel, computed in float32 at full precision (the references interpolate in
    float32 too).
    """
    import jax
    import jax.numpy as jnp

    h, w = grid.shape[:2]
    if (h, w) == tuple(out_hw):
        return jnp.asarray(grid, jnp.float32)
    wh = jnp.asarray(bicubic_matrix(h, out_hw[0], antialias), jnp.float32)
    ww = jnp.asarray(bicubic_matrix(w, out_hw[1], antialias), jnp.float32)
    return jnp.einsum("ai,bj,ijc->abc", wh, ww, jnp.asarray(grid, jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
