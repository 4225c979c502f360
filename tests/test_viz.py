"""spectral_jax.viz: shapes, dtypes, colours where they are pinned, PNG round trips, atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

from spectral_jax import analysis, viz
from spectral_jax.errors import InputError


def image(h=24, w=36, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def smooth_eigvecs(K=5, h=6, w=9):
    """Orthonormal cosine modes on the grid (the first constant), like a grid graph's eigenvectors."""
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    modes = [np.ones((h, w))]
    for a, b in [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 1)][: K - 1]:
        modes.append(np.cos(np.pi * a * yy) * np.cos(np.pi * b * xx))
    m = np.stack(modes).reshape(K, -1)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).reshape(K, h, w).astype(np.float32)


def test_palette_fixed_and_distinct():
    p = viz.palette(40)
    assert p.shape == (40, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(viz.palette(5), p[:5])
    assert len({tuple(c) for c in p.tolist()}) == 40
    d = np.abs(p[:20, None].astype(int) - p[None, :20].astype(int)).sum(-1)
    assert d[~np.eye(20, dtype=bool)].min() > 50  # the first 20 differ by > 50 in L1


def test_colormap_diverging():
    lut = viz.colormap("diverging")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert lut[0, 2] > lut[0, 0] and lut[255, 0] > lut[255, 2]  # blue end, red end
    assert lut[128].min() > 235  # near white in the middle
    assert np.all(np.diff(viz.colormap("gray")[:, 0].astype(int)) >= 0)
    with pytest.raises(InputError, match="cmap"):
        viz.colormap("jet")


def test_overlay_segments_colours_and_boundaries():
    img = image(24, 36)
    lab = np.zeros((4, 6), np.int64)
    lab[:, 3:] = 2
    lab[0, 0] = -1  # unpainted
    out = viz.overlay_segments(img, lab, alpha=0.5, boundary_width=1)
    assert out.shape == (24, 36, 3) and out.dtype == np.uint8
    pal = viz.palette(3).astype(float)
    # a pixel well inside segment 0 (grid cell (2, 1) -> pixels rows 12..17, cols 6..11)
    np.testing.assert_array_equal(out[14, 8], np.rint(0.5 * img[14, 8] + 0.5 * pal[0]).astype(np.uint8))
    np.testing.assert_array_equal(out[14, 28], np.rint(0.5 * img[14, 28] + 0.5 * pal[2]).astype(np.uint8))
    # the label changes between columns 17 and 18: column 17 is boundary (white), column 18 is not
    assert (out[8:, 17] == 255).all() and not (out[8:, 18] == 255).all(axis=1).all()
    np.testing.assert_array_equal(out[2, 2], img[2, 2])  # label -1 keeps the image
    plain = viz.overlay_segments(img, lab, alpha=0.0, boundary_width=0)
    np.testing.assert_array_equal(plain, img)
    with pytest.raises(InputError, match="uint8"):
        viz.overlay_segments(img.astype(np.float32), lab)


def test_pca_image_matches_pca_rgb():
    e = smooth_eigvecs()
    small = viz.pca_image(e)
    np.testing.assert_array_equal(small, np.rint(analysis.pca_rgb(e) * 255).astype(np.uint8))
    big = viz.pca_image(e, (24, 36))
    assert big.shape == (24, 36, 3) and big.dtype == np.uint8
    assert viz.pca_image(e, 16).shape == (16, 16, 3)
    np.testing.assert_array_equal(big, viz.pca_image(e, (24, 36)))


def test_eigvec_grid_layout_and_sign_mirror():
    e = smooth_eigvecs(K=5)
    g = viz.eigvec_grid(e, size_per_tile=(12, 18), cols=3, titles=False, pad=2)
    assert g.shape == (2 * (12 + 2) + 2, 3 * (18 + 2) + 2, 3) and g.dtype == np.uint8
    tile1 = g[2:14, 22:40]  # row 0, col 1
    lut = viz.colormap("diverging")
    up = analysis.upsample(e[1].astype(np.float64), (12, 18))
    idx = np.rint(np.clip(0.5 + 0.5 * up / np.abs(e[1]).max(), 0, 1) * 255).astype(int)
    np.testing.assert_array_equal(tile1, lut[idx])
    flipped = e.copy()
    flipped[1] *= -1
    tile1f = viz.eigvec_grid(flipped, (12, 18), cols=3, titles=False, pad=2)[2:14, 22:40]
    np.testing.assert_array_equal(tile1f, lut[255 - idx])  # mirrored colours
    const = viz.eigvec_grid(e, (12, 18), cols=3, titles=False, pad=2)[2:14, 2:20]
    assert (const == const[0, 0]).all()  # the constant vector is one colour
    titled = viz.eigvec_grid(e, 20, cols=5, eigvals=np.linspace(1, 0.5, 5))
    assert titled.shape[1] == 5 * 22 + 2 and titled.shape[0] > 20 + 4
    strip = titled[2 : titled.shape[0] - 22]  # the title strip above the tiles has dark text pixels
    assert (strip.min(-1) < 100).any()


def test_instance_image():
    img = image(20, 20)
    m1 = np.zeros((5, 5), bool)
    m1[1:3, 1:3] = True
    m2 = np.zeros((5, 5), bool)
    m2[2:4, 2:4] = True
    out = viz.instance_image(img, [m1, m2], alpha=1.0, boundary_width=0)
    pal = viz.palette(3)
    np.testing.assert_array_equal(out[9, 9], pal[1])  # overlap: the first (best) mask is on top
    np.testing.assert_array_equal(out[13, 13], pal[2])
    np.testing.assert_array_equal(out[0, 0], img[0, 0])
    np.testing.assert_array_equal(viz.instance_image(img, []), img)


def test_side_by_side():
    a, b = image(10, 12), image(16, 5)[..., 0]
    out = viz.side_by_side([a, b], pad=3)
    assert out.shape == (16 + 6, 12 + 5 + 9, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[3:13, 3:15], a)
    np.testing.assert_array_equal(out[3:19, 18:23, 1], b)
    assert (out[13:, 3:15] == 255).all()
    titled = viz.side_by_side([a, b], pad=3, titles=["img", "gt"])
    assert titled.shape[0] > out.shape[0] and titled.shape[1] == out.shape[1]


@pytest.mark.parametrize("arr", [image(7, 9), image(7, 9)[..., 0], np.eye(5, dtype=bool),
                                 np.dstack([image(4, 4), np.full((4, 4), 9, np.uint8)])])
def test_save_png_round_trip(tmp_path, arr):
    path = str(tmp_path / "sub" / "x.png")
    viz.save_png(path, arr)
    back = np.asarray(Image.open(path))
    want = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
    np.testing.assert_array_equal(back, want)
    assert os.listdir(tmp_path / "sub") == ["x.png"]


def test_save_png_rejects_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "x.png")
    with pytest.raises(InputError, match="uint8"):
        viz.save_png(path, np.zeros((4, 4), np.float32))
    with pytest.raises(InputError, match="shape"):
        viz.save_png(path, np.zeros((4, 4, 2), np.uint8))
    assert os.listdir(tmp_path) == []
    viz.save_png(path, image(4, 4))
    viz.save_png(path, image(4, 4, seed=1))  # replaces
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image(4, 4, seed=1))
    assert os.listdir(tmp_path) == ["x.png"]


def test_pipeline_pictures_end_to_end(tmp_path):
    e = smooth_eigvecs(K=6, h=8, w=8)
    img = image(32, 32)
    labels = analysis.segment(e, k=3, seed=0)
    masks, _ = analysis.instance_masks(e, ks=[3], seed=0, max_border=1.0, max_area=1.0)
    panel = viz.side_by_side([img, viz.overlay_segments(img, labels), viz.pca_image(e, (32, 32)),
                              viz.instance_image(img, masks)])
    viz.save_png(str(tmp_path / "panel.png"), panel)
    assert np.asarray(Image.open(tmp_path / "panel.png")).shape == panel.shape
