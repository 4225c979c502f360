"""Red-team findings on the pictures and the downstream analyses: eigvecs.png titles whole and apart for tall grids,
one numbering (from 1) in eigvecs.png and the panel, the panel's label naming the eigenvectors shown, the dataset
segments legend heading never cut, missing attribution entries drawn apart from 0, and non-finite `ridge` /
out-of-range `nms_iou` refused."""

import types

import numpy as np
import pytest
from PIL import Image, ImageDraw

from spectral_jax import analysis, report, viz
from spectral_jax.errors import InputError


def modes(K, h, w):
    """K orthonormal cosine modes on an (h, w) grid, the first constant."""
    yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    out = [np.ones((h, w))] + [np.cos(np.pi * (a + 1) * yy) * np.cos(np.pi * (a % 2) * xx) for a in range(K - 1)]
    m = np.stack(out).reshape(K, -1)
    return (m / np.linalg.norm(m, axis=1, keepdims=True)).reshape(K, h, w).astype(np.float32)


def render(lines, size, x=1, step=None):
    """`lines` drawn alone, black on white, in viz's font: uint8 `[h, w, 3]`."""
    font = viz._font()
    img = Image.new("RGB", (size[1], size[0]), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((x, i * (step or 0)), line, fill=(0, 0, 0), font=font)
    return np.asarray(img)


# ------------------------------------------------------------------------------------------- eigvecs.png titles


def test_titles_count_from_one_and_cannot_run_together():
    assert viz.eigvec_titles(3) == ["#1", "#2", "#3"]
    assert viz.eigvec_titles(2, [1.0, 0.5902]) == ["#1: 1.0000", "#2: 0.5902"]   # not "#10.5902"-like


@pytest.mark.parametrize("tile", [(96, 24), (96, 48), (96, 1), (96, 96)])   # 4:1, 224x112, a sliver, square
def test_eigvec_grid_titles_whole_and_apart(tile):
    """Every title's strip in the picture is exactly that title drawn alone (nothing of the next title intrudes,
    nothing of it is cut), with at least a few white pixels before the next cell."""
    K, pad, cols = 6, 2, 4
    e = modes(K, 16, 4)
    lam = np.linspace(1.0, 0.41, K)
    g = viz.eigvec_grid(e, size_per_tile=tile, cols=cols, eigvals=lam, pad=pad)
    font = viz._font()
    title_h = viz._text_height(font)
    cell_w = (g.shape[1] - pad) // cols
    cell_h = (g.shape[0] - pad) // 2
    assert cell_w >= tile[1] + pad and cell_h == tile[0] + title_h + pad
    for i, text in enumerate(viz.eigvec_titles(K, lam)):
        assert text == f"#{i + 1}: {lam[i]:.4f}"
        assert font.getlength(text) + 1 + 4 <= cell_w - pad, text                  # room before the next cell
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w + pad, r * cell_h + pad
        strip = g[y0:y0 + title_h, x0:x0 + cell_w - pad]
        np.testing.assert_array_equal(strip, render([text], strip.shape[:2]), err_msg=text)
    if tile == (96, 96):
        assert cell_w == 96 + pad                                                  # wide enough already: as given


def test_grid_without_titles_keeps_the_tile_width():
    g = viz.eigvec_grid(modes(3, 16, 4), size_per_tile=(96, 24), cols=3, titles=False, pad=2)
    assert g.shape == (96 + 2 + 2, 3 * (24 + 2) + 2, 3)


# ----------------------------------------------------------------------------------------------- the panel


@pytest.mark.parametrize("K,label", [(1, "no eigenvector"), (2, "eigenvector 2"), (3, "eigenvectors 2-3"),
                                     (4, "eigenvectors 2-4"), (9, "eigenvectors 2-4")])
def test_pca_title_names_the_eigenvectors_shown(K, label):
    assert report.pca_title(K) == label


def test_write_image_tall_grid_two_eigvecs(tmp_path, monkeypatch):
    """An analyze folder for a 16×4 grid (4:1) and K = 2: the panel says "eigenvector 2" (pca.png shows only it),
    eigvecs.png's titles are "#1: …", "#2: …", each whole."""
    import spectral_jax as sj
    from spectral_jax.taps import LayerTap, Taps

    rr = np.mgrid[:16, :4][0]
    region = (rr < 8).astype(int)
    rng = np.random.default_rng(0)
    base = np.concatenate([3.0 * np.eye(2)[region.ravel()], np.zeros((64, 2))], 1)[None, None]
    mk = lambda: (base + 0.3 * rng.standard_normal((1, 2, 64, 4))).astype(np.float32)
    res = sj.solve(Taps({0: LayerTap(mk(), mk(), mk(), (16, 4))}), "qk", 2)
    view = sj.describe(res)[0]
    seen = {}
    real = viz.side_by_side

    def spy(images, *a, titles=None, **kw):
        seen["titles"] = list(titles)
        return real(images, *a, titles=titles, **kw)

    monkeypatch.setattr(viz, "side_by_side", spy)
    report.write_image(str(tmp_path), np.full((64, 16, 3), 128, np.uint8), res, view)
    assert seen["titles"][2] == "eigenvector 2"
    grid = np.asarray(Image.open(tmp_path / "eigvecs.png").convert("RGB"))
    title_h = viz._text_height(viz._font())
    cell_w = (grid.shape[1] - 2) // 2
    for i, text in enumerate(viz.eigvec_titles(2, view.eigvals)):
        assert text.startswith(f"#{i + 1}: ")
        strip = grid[2:2 + title_h, 2 + i * cell_w:(i + 1) * cell_w]
        np.testing.assert_array_equal(strip, render([text], strip.shape[:2]), err_msg=text)


# ------------------------------------------------------------------------------------- dataset segments legend


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 12])
def test_segments_legend_heading_whole(n):
    lab = np.zeros((n, 2, 2), np.int64)
    lab[:, 0] = 1
    tile, gap = 64, 4
    fig = viz.dataset_segments_figure(lab, None, 2, tile=tile, gap=gap)
    font = viz._font()
    text_h = viz._text_height(font)
    width = fig.shape[1]
    lines = viz._wrap(viz.SEGMENTS_HEADING, font, width - 4)
    assert " ".join(lines) == viz.SEGMENTS_HEADING                         # every word, in order
    assert all(2 + font.getlength(line) <= width - 2 for line in lines)     # each line fits the figure
    y0 = -(-n // 10) * (tile + gap) + gap
    block = fig[y0:y0 + len(lines) * text_h]
    np.testing.assert_array_equal(block, render(lines, block.shape[:2], x=2, step=text_h))
    assert fig.shape[0] >= y0 + len(lines) * text_h + text_h                # the swatches come after


def test_wrap_breaks_a_word_longer_than_the_line():
    font = viz._font()
    lines = viz._wrap("a verylongwordindeed b", font, 30)
    assert "".join(lines).replace(" ", "") == "averylongwordindeedb"
    assert all(font.getlength(line) <= 30 for line in lines)


# --------------------------------------------------------------------------------------- attribution missing


def test_attribution_nan_drawn_apart_from_zero():
    nan = np.nan
    layer_rq = np.array([[0.0, nan], [0.0, 0.0]])                          # [L, K]: one missing entry
    att = types.SimpleNamespace(layers=np.array([0, 1]), layer_rq=layer_rq, head_rq=np.zeros((2, 2)),
                                eigvals=np.zeros((2, 1, 2)), angles=np.zeros((2, 1, 1)))
    pic = viz.attribution_figure(att)
    cell = 14
    title_h = viz._text_height(viz._font())
    label_w = 6 * 1 + 6
    y, x = 4 + title_h, 4 + label_w                                         # side_by_side's pad is 4
    zero = pic[y:y + cell, x:x + cell]                                      # row 0, entry 0: 0.0
    missing = pic[y:y + cell, x + cell:x + 2 * cell]                        # row 0, entry 1: NaN
    lut = viz.colormap("diverging")
    assert (zero == lut[128]).all()
    assert (missing == viz.NAN_FILL).all(-1).any() and (missing == viz.NAN_HATCH).all(-1).any()
    assert not (missing == lut[128]).all(-1).any()
    for colour in (viz.NAN_FILL, viz.NAN_HATCH):                            # off the diverging scale
        assert not (lut == np.asarray(colour)).all(-1).any()
    assert "NaN" in viz.ATTRIBUTION_CAPTION and "grey" in viz.ATTRIBUTION_CAPTION
    assert pic.shape[0] > 4 + title_h + 2 * cell + 4                        # a caption strip below the maps
    assert (pic[4 + title_h + 2 * cell + 4:].min(-1) < 100).any()           # with text in it
    font, x = viz._font(), 4                    # the panel titles, wider than their maps: each whole, alone in its slot
    for t, ncol in [("RQ eigvec", 2), ("RQ head", 2), ("own eigvals", 2), ("cos2 to joint", 1)]:
        w = max(label_w + ncol * cell, int(np.ceil(font.getlength(t))) + 6)   # viz._TITLE_GAP of white
        strip = pic[4:4 + title_h, x:x + w]
        np.testing.assert_array_equal(strip, render([t], strip.shape[:2], x=0), err_msg=t)
        x += w + 4


# ------------------------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize("ridge", [np.nan, np.inf, -np.inf, -1.0, "x", None])
def test_linear_probe_refuses_bad_ridge(ridge):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal(40)
    with pytest.raises(InputError, match="ridge") as info:
        analysis.linear_probe(x, y, ridge=ridge)
    assert "e.g. ridge=" in str(info.value)


def test_linear_probe_ridge_zero_still_least_squares():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 3.0
    p = analysis.linear_probe(x, y, ridge=0)
    np.testing.assert_allclose(p.weights[:, 0], [1.0, -2.0, 0.5], atol=1e-10)
    assert p.score == pytest.approx(1.0)


@pytest.mark.parametrize("iou", [np.nan, 2.0, 1.0000001, -0.1, np.inf])
def test_instance_masks_refuses_nms_iou_outside_0_1(iou):
    with pytest.raises(InputError, match="nms_iou") as info:
        analysis.instance_masks(modes(4, 8, 8), ks=[3], nms_iou=iou)
    assert "[0, 1]" in str(info.value)


def test_instance_masks_nms_iou_ends_are_meaningful():
    """0 keeps only candidates disjoint from a better one; 1.0 keeps every candidate (suppression off)."""
    e = modes(5, 8, 8)
    ks = [2, 3, 4]
    all_m, _ = analysis.instance_masks(e, ks=ks, nms_iou=1.0, max_border=1.0)
    mid, _ = analysis.instance_masks(e, ks=ks, nms_iou=0.5, max_border=1.0)
    none, _ = analysis.instance_masks(e, ks=ks, nms_iou=0.0, max_border=1.0)
    assert len(all_m) >= len(mid) >= len(none) >= 1 and len(all_m) > len(none)
    for i, a in enumerate(none):
        for b in none[i + 1:]:
            assert not (a & b).any()


# ------------------------------------------------------------------------------------------- describe


def test_describe_clusters_unweighted_where_eigvals_are_not_finite():
    """A dataset gd result has NaN eigvals by design (no whole-dataset operator): `describe` refused it with
    "must be 6 finite values ..., got (6,)"; it now clusters its eigenvectors unweighted, as the dataset export
    does, and keeps the eigvals as they are."""
    from spectral_jax.analysis.cluster import segment
    from spectral_jax.analysis.views import describe

    e = modes(6, 8, 8)
    res = types.SimpleNamespace(eigvecs=e[None], eigvals=np.full((1, 6), np.nan))
    (view,) = describe(res, seed=3)
    np.testing.assert_array_equal(view.segments, segment(e.astype(np.float64), eigvals=None, seed=3))
    assert np.isnan(view.eigvals).all() and view.k >= 1
    with pytest.raises(InputError, match=r"^eigvals: must be 6 finite values \(one per eigenvector\), got 1 of its "
                                         r"6 values not finite"):
        analysis.spectral_features(e, eigvals=np.r_[1.0, np.nan, np.ones(4)])
