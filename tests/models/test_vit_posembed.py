"""Position-embedding resampling matrices vs `torch.nn.functional.interpolate(mode="bicubic")`.

Tolerance 1e-5 · max(1, max|ref|): torch resizes in float32, and its own float32 result differs from the exact
(float64) one by up to ~4e-6 relative on these grids; using A = -0.5 instead of -0.75, or clamping instead of
renormalising at the border, changes values by 1e-2 or more.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spectral_jax.models.vit.posembed import bicubic_matrix, resize_grid  # noqa: E402

GRIDS = [(37, 37), (14, 14), (7, 7), (4, 6)]
OUTS = [(16, 16), (32, 48), (74, 20), (3, 5), (1, 2), (37, 37)]


def torch_resize(x, out, antialias):
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    y = torch.nn.functional.interpolate(t, size=out, mode="bicubic", align_corners=False, antialias=antialias)
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("grid", GRIDS)
def test_resize_matches_torch(grid, antialias):
    rng = np.random.default_rng(0)
    for out in OUTS:
        x = rng.standard_normal((*grid, 8)).astype(np.float32)
        want = torch_resize(x, out, antialias)
        got = np.asarray(resize_grid(x, out, antialias))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()),
                                   err_msg=f"{grid} -> {out}, antialias={antialias}")


@pytest.mark.parametrize("antialias", [False, True])
def test_matrix_rows_sum_to_one_and_identity_at_same_size(antialias):
    for n_in, n_out in [(37, 16), (14, 27), (7, 7), (5, 1)]:
        w = bicubic_matrix(n_in, n_out, antialias)
        assert w.shape == (n_out, n_in)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(bicubic_matrix(9, 9, antialias), np.eye(9, dtype=np.float32))


def test_antialias_differs_from_plain():
    """The two kernels must not coincide (else the DINOv2-with-registers case would test nothing)."""
    assert np.abs(bicubic_matrix(37, 16, True) - bicubic_matrix(37, 16, False)).max() > 1e-2
    assert np.abs(bicubic_matrix(14, 27, True) - bicubic_matrix(14, 27, False)).max() > 1e-2
