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
    assert titled.shape[1] > 5 * 22 + 2 and titled.shape[0] > 20 + 4   # cells widened to their titles
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
    font = viz._font()
    cols = [max(12, font.getbbox("img")[2] + 6), max(5, font.getbbox("gt")[2] + 6)]   # titles wider than the images
    assert titled.shape[0] > out.shape[0] and titled.shape[1] == sum(cols) + 9
    top = titled.shape[0] - 16 - 3
    np.testing.assert_array_equal(titled[top:top + 10, 3:15], a)                 # the images at their own size
    np.testing.assert_array_equal(titled[top:top + 16, 3 + cols[0] + 3:3 + cols[0] + 8, 1], b)


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
    """The pictures of an analyze folder (`report.write_image`) for a solve on planted taps — three regions of an
    8×8 grid (the left half, the top and bottom right quarters), on a grey 32×32 image (4×4 pixels a node) — show
    what they claim: segments.png the segments in their palette colours (as many colours as segments, each on its
    region), pca.png one colour per region and different ones between regions, foreground.png and instances.png
    their masks, eigvecs.png each eigenvector's sign (red +, blue −) and its largest entry, panel.png the pictures
    themselves; a blank or misplaced picture fails."""
    import spectral_jax as sj
    from spectral_jax import report
    from spectral_jax.solvers.result import Result
    from spectral_jax.taps import LayerTap, Taps

    rr, cc = np.mgrid[:8, :8]
    region = np.where(cc < 4, 0, np.where(rr < 4, 1, 2))                               # [8, 8]
    rng = np.random.default_rng(0)
    base = np.concatenate([3.0 * np.eye(3)[region.ravel()], np.zeros((64, 1))], 1)[None, None]
    mk = lambda: (base + 0.3 * rng.standard_normal((1, 2, 64, 4))).astype(np.float32)
    res = sj.solve(Taps({l: LayerTap(mk(), mk(), mk(), (8, 8)) for l in range(2)}), "qk", 4)
    view = sj.describe(res)[0]
    grey = np.full((32, 32, 3), 128, np.uint8)
    report.write_image(str(tmp_path), grey, res, view)
    png = lambda name: np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")).astype(np.int64)
    up = lambda a: np.kron(a, np.ones((4, 4), a.dtype))                                  # grid → pixels
    centre = np.zeros((32, 32), bool)
    centre[1::4, 1::4] = centre[2::4, 2::4] = True                  # inside each node's 4×4 block, off its edges
    blend = lambda colour: np.rint(0.5 * 128 + 0.5 * np.asarray(colour, float)).astype(np.int64)

    # the segments are the planted regions, one label each
    assert view.k == 3 and len({(a, b) for a, b in zip(view.segments.ravel(), region.ravel())}) == 3
    seg, lab = png("segments"), up(view.segments)
    pal = viz.palette(3)
    for i in range(3):
        assert (seg[centre & (lab == i)] == blend(pal[i])).all(), i                  # segment i in colour i
    white = (seg == 255).all(-1)
    colours = {tuple(c) for c in seg[~white].tolist()}
    assert len(colours) == view.k                                        # as many colours as segments
    change = np.zeros((32, 32), bool)
    change[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    change[:-1] |= lab[:-1] != lab[1:]
    assert white.any() and (white == change).all()                       # white exactly where the label changes

    pca = png("pca")                   # one colour per region (away from its borders: bilinear there), distinct
    inner = np.zeros((8, 8), bool)
    inner[1:-1, 1:-1] = True
    for axis in (0, 1):
        inner &= (np.roll(region, 1, axis) == region) & (np.roll(region, -1, axis) == region)
    means = np.array([pca[centre & up(inner & (region == r))].mean(0) for r in range(3)])
    spread = max(np.abs(pca[centre & up(inner & (region == r))] - means[r]).max() for r in range(3))
    gaps = [np.abs(means[a] - means[b]).max() for a, b in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 64 and min(gaps) > 4 * spread, (gaps, spread)

    fg = png("foreground")
    assert 0 < view.foreground.sum() < 64 and len(set(region[view.foreground].tolist()) &
                                                  set(region[~view.foreground].tolist())) == 0
    assert (fg[centre & up(view.foreground)] == blend(pal[0])).all()
    assert (fg[centre & ~up(view.foreground)] == 128).all()

    inst = png("instances")
    assert len(view.instances) == 3
    ipal = viz.palette(4)
    for m, mask in enumerate(view.instances):             # each instance a planted region, in its colour m + 1
        assert len(set(region[mask].tolist())) == 1 and mask.sum() == (region == region[mask][0]).sum()
        assert (inst[centre & up(mask)] == blend(ipal[m + 1])).all(), m

    grid = png("eigvecs")                 # each tile decoded through the diverging map back to v / max|v|
    title = viz._text_height(viz._font())
    lut = viz.colormap("diverging").astype(np.int64)
    for i, v in enumerate(view.eigvecs):
        y0, x0 = 2 + title, 2 + i * (96 + 2)
        at_nodes = grid[y0 + 6:y0 + 96:12, x0 + 6:x0 + 96:12]                      # [8, 8, 3] near each node's centre
        idx = np.abs(at_nodes[:, :, None, :] - lut[None, None]).sum(-1).argmin(-1)
        shown, want = idx / 127.5 - 1.0, v / np.abs(v).max()
        assert np.abs(shown - want).max() < 0.15, i                                 # the values (bilinear near edges)
        big = np.abs(want) > 0.2
        assert big.any() and (np.sign(shown[big]) == np.sign(want[big])).all(), i    # red +, blue −
        assert want.flat[shown.argmax()] > want.max() - 0.15, i                     # the largest entry is the reddest
        assert grid[y0 - title:y0, x0:x0 + 96].min() < 128, i                        # a title ("#i λ") above it

    panel = png("panel")               # the pictures in order, at their size (columns as wide as their titles)
    y, x = 4 + title, 4
    for name in ["input", "segments", "pca", "foreground", "instances"]:
        want = png(name)
        at = [x0 for x0 in range(x, panel.shape[1] - 31) if (panel[y:y + 32, x0:x0 + 32] == want).all()]
        assert at and (name != "input" or at[0] == 4), name
        x = at[0] + 32 + 4
    back = Result.load(str(tmp_path / "result.npz"))
    np.testing.assert_array_equal(back.eigvecs, res.eigvecs)
    assert back.provenance.graph == "qk" and back.provenance.layers == (0, 1)