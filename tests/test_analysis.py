"""spectral_jax.analysis: behaviour pinned on planted cases (block graphs solved with numpy eigh, Gaussian blobs)."""

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from PIL import Image

from spectral_jax import analysis as A
from spectral_jax.analysis.cluster import _silhouette
from spectral_jax.analysis.masks import _components, _merge_small, _nms
from spectral_jax.errors import InputError


def planted_eigs(layout, K=8, p_in=1.0, p_out=0.05, spatial=0.5, sigma=1.5):
    """Top-K eigenvectors `[K, h, w]` / eigenvalues `[K]` of the normalised affinity of a planted block graph on
    the grid: A_ij = (p_in if same block else p_out) · (1 + spatial · exp(−|r_i − r_j|² / 2σ²))."""
    h, w = layout.shape
    lab = layout.reshape(-1)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pts = np.stack([yy.reshape(-1), xx.reshape(-1)], 1).astype(np.float64)
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    a = np.where(lab[:, None] == lab[None], p_in, p_out) * (1 + spatial * np.exp(-d2 / (2 * sigma**2)))
    deg = a.sum(1)
    lam, u = np.linalg.eigh(a / np.sqrt(deg[:, None] * deg[None]))
    lam, u = lam[::-1][:K], u[:, ::-1][:, :K]
    return u.T.reshape(K, h, w).astype(np.float32), lam.astype(np.float32)


def quadrants(h=12, w=12):
    lay = np.zeros((h, w), np.int64)
    lay[: h // 2, w // 2 :] = 1
    lay[h // 2 :, : w // 2] = 2
    lay[h // 2 :, w // 2 :] = 3
    return lay


def same_partition(a, b):
    """True when label arrays a and b are equal up to a permutation of label values."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def gaussian_blobs(sizes=(60, 60, 60, 60), sep=8.0, seed=0):
    """Unit Gaussians around sep·e_c (means sep·√2 apart), dimension = number of clusters; shuffled."""
    rng = np.random.default_rng(seed)
    means = sep * np.eye(len(sizes))
    x = np.concatenate([m + rng.normal(size=(s, len(sizes))) for m, s in zip(means, sizes)])
    y = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(y))
    return x[perm], y[perm], means


# ---------------------------------------------------------------------------------------------------- k-means


def test_kmeans_recovers_planted_gaussians():
    x, y, means = gaussian_blobs()
    r = A.kmeans(x, 4, seed=0)
    assert same_partition(r.labels, y)
    assert r.labels.dtype == np.int32 and r.centers.shape == (4, 4)
    np.testing.assert_allclose(r.inertia, ((x - r.centers[r.labels]) ** 2).sum(), rtol=1e-10)
    for c in range(4):  # centres are the cluster means
        np.testing.assert_allclose(r.centers[c], x[r.labels == c].mean(0), atol=1e-10)


def test_kmeans_seeded_deterministic_and_numbered_by_size():
    x, y, _ = gaussian_blobs(sizes=(20, 80, 50))
    a, b = A.kmeans(x, 3, seed=7), A.kmeans(x, 3, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert np.bincount(a.labels).tolist() == [80, 50, 20]
    assert same_partition(a.labels, y)


def test_kmeans_edge_k():
    x, _, _ = gaussian_blobs(sizes=(5, 5))
    one = A.kmeans(x, 1)
    assert (one.labels == 0).all()
    np.testing.assert_allclose(one.inertia, ((x - x.mean(0)) ** 2).sum(), rtol=1e-12)
    assert A.kmeans(x, len(x)).inertia == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InputError, match="k"):
        A.kmeans(x, len(x) + 1)


def test_silhouette_matches_definition():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(25, 2))
    lab = rng.integers(0, 3, 25)
    lab[0] = 3  # a singleton cluster scores 0
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    ref = []
    for i in range(25):
        own = (lab == lab[i]) & (np.arange(25) != i)
        if not own.any():
            ref.append(0.0)
            continue
        a = d[i, own].mean()
        b = min(d[i, lab == c].mean() for c in set(lab.tolist()) - {lab[i]})
        ref.append((b - a) / max(a, b))
    assert _silhouette(d, lab) == pytest.approx(np.mean(ref), rel=1e-12)


def test_auto_k_gaussians_and_subsample_determinism():
    x, _, _ = gaussian_blobs(sizes=(40, 40, 40, 40, 40))
    r = A.auto_k(x, (2, 8), seed=0)
    assert r.k == 5 and r.ks.tolist() == list(range(2, 9)) and r.scores.shape == (7,)
    s1 = A.auto_k(x, (2, 8), seed=1, max_samples=60)  # silhouette on a 60-point subsample
    s2 = A.auto_k(x, (2, 8), seed=1, max_samples=60)
    assert s1.k == 5
    np.testing.assert_array_equal(s1.scores, s2.scores)


def test_auto_k_planted_partition_both_methods():
    eigvecs, eigvals = planted_eigs(quadrants(), K=8)
    assert eigvals[3] - eigvals[4] > 0.5  # the planted case has a clear gap after 4 eigenvalues
    f = A.spectral_features(eigvecs, eigvals=eigvals)
    assert A.auto_k(f, method="silhouette").k == 4
    gap = A.auto_k(method="eigengap", eigvals=eigvals)
    assert gap.k == 4 and gap.ks.tolist() == list(range(2, 8))
    np.testing.assert_allclose(gap.scores, eigvals[gap.ks - 1] - eigvals[gap.ks], rtol=1e-6)
    with pytest.raises(InputError, match="eigvals"):
        A.auto_k(f, method="eigengap")


def test_segment_recovers_planted_partition():
    lay = quadrants()
    eigvecs, eigvals = planted_eigs(lay, K=8)
    for method in ("silhouette", "eigengap"):
        labels = A.segment(eigvecs, eigvals=eigvals, method=method, seed=0)
        assert labels.shape == lay.shape and labels.dtype == np.int32
        assert same_partition(labels, lay), method
    np.testing.assert_array_equal(A.segment(eigvecs, k=4, seed=3), A.segment(eigvecs, k=4, seed=3))
    assert same_partition(A.segment(eigvecs[:4], k=4), lay)  # unweighted, only the informative vectors


# ---------------------------------------------------------------------------------------------------- pca colours


def test_pca_rgb_range_determinism_and_sign_invariance():
    lay = quadrants()
    eigvecs, eigvals = planted_eigs(lay, K=6)
    rgb = A.pca_rgb(eigvecs)
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0 and rgb.max() - rgb.min() > 0.5
    np.testing.assert_array_equal(rgb, A.pca_rgb(eigvecs))
    np.testing.assert_array_equal(rgb, A.pca_rgb(eigvecs.copy()))                  # other memory, same colours
    np.testing.assert_array_equal(rgb, A.pca_rgb(np.asfortranarray(eigvecs)))
    flipped = eigvecs * np.array([1, -1, 1, -1, -1, 1], np.float32)[:, None, None]
    np.testing.assert_array_equal(A.pca_rgb(flipped), rgb)                          # exactly sign-invariant
    np.testing.assert_array_equal(A.pca_rgb(flipped, eigvals=eigvals), A.pca_rgb(eigvecs, eigvals=eigvals))
    noisy0 = eigvecs.copy()
    noisy0[0] = np.random.default_rng(0).normal(size=(12, 12))
    np.testing.assert_array_equal(A.pca_rgb(noisy0), rgb)  # skip_first ignores vector 0
    assert not np.allclose(A.pca_rgb(noisy0, skip_first=False), rgb)


def test_pca_rgb_channels_are_eigenvectors_2_to_4_scaled_by_eigenvalue():
    """colour_c − 0.5 ∝ ±λ_c (x_c − mean x_c), c = 1, 2, 3, with one factor for the three channels (no clipping)."""
    eigvecs, eigvals = planted_eigs(quadrants(), K=6)
    lam = np.array([1.0, 0.8, 0.4, 0.2, 0.1, 0.05])
    for ev, weight in [(None, np.ones(3)), (lam, lam[1:4]), (eigvals, eigvals[1:4].astype(np.float64))]:
        rgb = A.pca_rgb(eigvecs, clip=(0, 100), eigvals=ev).reshape(-1, 3).astype(np.float64)
        x = eigvecs[1:4].reshape(3, -1).T.astype(np.float64)
        y = weight * (x - x.mean(0))                                                 # [N, 3]
        a = ((rgb - 0.5) * y).sum(0) / (y * y).sum(0)                                # least-squares factor [3]
        np.testing.assert_allclose(rgb - 0.5, a * y, atol=1e-6)
        np.testing.assert_allclose(np.abs(a), np.abs(a[0]), rtol=1e-5)               # one scale, signs per channel
        assert abs(np.abs(rgb - 0.5).max() - 0.5) < 1e-6                             # the largest |y| reaches 0 or 1
    assert np.abs(A.pca_rgb(eigvecs[:3]).reshape(-1, 3)[:, 2] - 0.5).max() == 0.0   # missing channel: grey


def test_pca_rgb_near_degenerate_spectrum_is_stable():
    """Four equal blocks: λ_1 = λ_2 = λ_3. Equal or 1e-9-apart eigenvalues, copies and tiny perturbations of the
    eigenvectors give (nearly) the same colours; PCA's axes would rotate arbitrarily here."""
    lay = quadrants()
    eigvecs, eigvals = planted_eigs(lay, K=5, spatial=0.0)
    assert np.ptp(eigvals[1:4]) < 1e-5                                              # degenerate indeed
    rng = np.random.default_rng(1)
    for lam in (None, np.array([1.0, 0.5, 0.5, 0.5, 0.1]), eigvals):
        rgb = A.pca_rgb(eigvecs, eigvals=lam)
        np.testing.assert_array_equal(A.pca_rgb(eigvecs.copy(), eigvals=lam), rgb)
        np.testing.assert_array_equal(A.pca_rgb(eigvecs[:, ::-1][:, ::-1], eigvals=lam), rgb)  # strided view
        if lam is not None:
            near = np.asarray(lam, np.float64) + np.array([0.0, 1e-9, -1e-9, 0.0, 0.0])
            np.testing.assert_allclose(A.pca_rgb(eigvecs, eigvals=near), rgb, atol=1e-6)
        for scale in (1e-7, 1e-5):
            bumped = eigvecs + scale * rng.normal(size=eigvecs.shape).astype(np.float32)
            change = np.abs(A.pca_rgb(bumped, eigvals=lam) - rgb).max()
            assert change < 100 * scale, (scale, change)


def test_pca_rgb_small_perturbation_small_change():
    """Lipschitz in the input on a generic (non-degenerate) case: a 1e-6 nudge moves no colour by more than 1e-4."""
    eigvecs, eigvals = planted_eigs(quadrants(), K=8)
    rng = np.random.default_rng(2)
    bumped = eigvecs + 1e-6 * rng.normal(size=eigvecs.shape).astype(np.float32)
    for lam in (None, eigvals):
        assert np.abs(A.pca_rgb(bumped, eigvals=lam) - A.pca_rgb(eigvecs, eigvals=lam)).max() < 1e-4


def test_pca_rgb_rejects_bad_options():
    eigvecs, eigvals = planted_eigs(quadrants(), K=4)
    for kwargs, name in [({"clip": (50, 50)}, "clip"), ({"t": -1.0}, "t"), ({"t": float("nan")}, "t"),
                         ({"eigvals": eigvals[:3]}, "eigvals")]:
        with pytest.raises(InputError, match=name):
            A.pca_rgb(eigvecs, **kwargs)


def test_pca_rgb_colours_blocks():
    lay = quadrants()
    eigvecs, _ = planted_eigs(lay, K=4, spatial=0.0)  # piecewise-constant eigenvectors
    rgb = A.pca_rgb(eigvecs).reshape(-1, 3)
    colours = np.stack([rgb[lay.reshape(-1) == c].mean(0) for c in range(4)])
    for c in range(4):
        np.testing.assert_allclose(rgb[lay.reshape(-1) == c], np.broadcast_to(colours[c], (36, 3)), atol=1e-4)
    dist = np.sqrt(((colours[:, None] - colours[None]) ** 2).sum(-1))
    assert dist[~np.eye(4, dtype=bool)].min() > 0.3


# ---------------------------------------------------------------------------------------------------- figure/ground


def test_an_embedding_without_structure_is_refused_not_split_arbitrarily():
    """Eigenvalues all ≤ 0 beside the first weight every nontrivial eigenvector to 0 (and constant eigenvectors
    give one point for all pixels): k-means put one pixel apart as a second segment, `describe` made it an
    instance. Refused for a given k ≥ 2; automatic k (and k = 1) is one segment."""
    rng = np.random.default_rng(0)
    e = rng.normal(size=(4, 6, 6))
    for eigvecs, eigvals in ((e, np.array([1.0, 0.0, -0.2, -0.5])), (np.ones((4, 6, 6)), None)):
        for k in (2, 3):
            with pytest.raises(InputError, match="^eigvecs: give every pixel the same spectral embedding"):
                A.segment(eigvecs, k, eigvals=eigvals)
        assert (A.segment(eigvecs, 1, eigvals=eigvals) == 0).all() and (A.segment(eigvecs, eigvals=eigvals) == 0).all()
        km, auto = A.cluster_embedding(A.spectral_features(eigvecs, eigvals=eigvals))
        assert auto.method == "no structure" and auto.k == 1 and auto.ks.size == 0 and (km.labels == 0).all()
    assert len(np.unique(A.segment(e, 3, eigvals=np.array([1.0, 0.5, 0.2, 0.1])))) == 3


def test_bipartition_planted_square():
    lay = np.zeros((16, 16), np.int64)
    lay[2:14, 3:13] = 1  # object: 120 of 256 pixels, off the border
    eigvecs, _ = planted_eigs(lay, K=4)
    obj = lay == 1
    for sign in (1, -1):
        e = eigvecs.copy()
        e[1] *= sign
        np.testing.assert_array_equal(A.bipartition(e), obj)
        np.testing.assert_array_equal(A.bipartition(e, threshold="mean"), obj)
    assert A.bipartition(eigvecs).dtype == bool


def test_bipartition_border_prior_beats_area_prior():
    lay = np.zeros((16, 16), np.int64)
    lay[2:14, 2:14] = 1  # object larger than the background (144 of 256) — the area prior gets it wrong
    eigvecs, _ = planted_eigs(lay, K=4)
    np.testing.assert_array_equal(A.bipartition(eigvecs, image_prior="border"), lay == 1)
    np.testing.assert_array_equal(A.bipartition(eigvecs, image_prior="area"), lay == 0)
    pos = eigvecs[1] > 0
    np.testing.assert_array_equal(A.bipartition(eigvecs, image_prior=None), pos)
    assert not A.bipartition(np.ones((2, 4, 4), np.float32)).any()  # one empty side: no object


# ---------------------------------------------------------------------------------------------------- instances


def two_blobs():
    lay = np.zeros((12, 16), np.int64)
    lay[3:8, 2:6] = 1
    lay[4:10, 10:14] = 1  # the same cluster, disconnected
    return lay


def test_instance_masks_separates_disconnected_blobs():
    lay = two_blobs()
    eigvecs, eigvals = planted_eigs(lay, K=6)
    assert same_partition(A.segment(eigvecs, k=2, eigvals=eigvals), lay)  # one k-means cluster holds both blobs
    blob_a = np.zeros_like(lay, bool)
    blob_a[3:8, 2:6] = True
    blob_b = np.zeros_like(lay, bool)
    blob_b[4:10, 10:14] = True
    for kw in (dict(ks=[2]), dict()):  # k given, k chosen by silhouette
        masks, scores = A.instance_masks(eigvecs, seed=0, eigvals=eigvals, **kw)
        assert len(masks) == 2, kw  # the background holds the whole border and is dropped
        got = sorted((m.sum(), m.tobytes()) for m in masks)
        assert [g[1] for g in got] == [blob_a.tobytes(), blob_b.tobytes()]
        assert scores.shape == (2,) and np.all(np.diff(scores) <= 0)
    masks, _ = A.instance_masks(eigvecs, ks=[2], eigvals=eigvals, max_border=1.0)
    assert len(masks) == 3  # keep the background when asked


def test_instance_masks_merges_small_components_and_nms():
    # a 1-pixel speck of a different segment inside a block is merged back into its surroundings
    lab = np.zeros((10, 10), np.int64)
    lab[:, 5:] = 1
    lab[2, 2] = 1
    comp = _components(lab, 4)
    assert comp.max() + 1 == 3
    merged = _merge_small(comp, min_pixels=2, connectivity=4)
    assert same_partition(merged, (np.arange(100).reshape(10, 10) % 10) >= 5)
    # NMS: of two masks overlapping with IoU 0.8, only the better-scored survives
    m1 = np.zeros((10, 10), bool)
    m1[:, :5] = True
    m2 = m1.copy()
    m2[:, 5] = True
    m3 = ~m2
    keep = _nms([m1, m2, m3], np.array([0.5, 0.9, 0.1]), 0.5)
    assert keep == [1, 2]


def test_instance_masks_deterministic():
    eigvecs, eigvals = planted_eigs(two_blobs(), K=6)
    a = A.instance_masks(eigvecs, seed=4, eigvals=eigvals)
    b = A.instance_masks(eigvecs, seed=4, eigvals=eigvals)
    assert len(a[0]) == len(b[0]) and all((x == y).all() for x, y in zip(a[0], b[0]))
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------- metrics


def test_iou_hand_computed():
    p = np.array([[1, 1, 0], [0, 1, 0]], bool)
    g = np.array([[1, 0, 0], [1, 1, 1]], bool)
    assert A.iou(p, g) == pytest.approx(2 / 5)  # |p∧g| = 2, |p∨g| = 5
    assert A.iou(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert A.iou(p, ~p) == 0.0
    with pytest.raises(InputError):
        A.iou(p, g[:, :2])
    assert A.iou(p.astype(np.uint8), g.astype(np.float32)) == pytest.approx(2 / 5)     # 0/1 numbers are masks


@pytest.mark.parametrize("bad", [np.array([np.nan, 0.0]), np.array([0.3, 0.0]), np.array([255, 0], np.uint8)])
def test_iou_refuses_what_a_bool_cast_would_count_as_foreground(bad):
    """NaN, a soft mask and 0/255 were cast to bool: every nonzero value foreground (NaN against [1, 0]: IoU 1)."""
    with pytest.raises(InputError, match="^pred: is not a mask of 0/1"):
        A.iou(bad, np.array([1, 0]))
    with pytest.raises(InputError, match="^gt: is not a mask of 0/1"):
        A.iou(np.array([1, 0]), bad)


def test_miou_refuses_nan_labels():
    """A NaN label was a class of its own (np.unique keeps each NaN), scored as if real."""
    with pytest.raises(InputError, match="^gt_labels: holds NaN labels"):
        A.miou_hungarian(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, np.nan, np.nan]))
    with pytest.raises(InputError, match="^pred_labels: holds NaN labels"):
        A.miou_hungarian(np.array([0, 0, 1, np.nan]), np.array([0, 0, 1, 1]))
    assert A.miou_hungarian(np.array([0., 0., 1., 1.]), np.array([0, 0, 1, 1]))[0] == 1.0


def test_miou_permuted_labelling_is_one():
    gt = np.random.default_rng(0).integers(0, 5, size=(8, 9))
    perm = np.array([3, 0, 4, 1, 2])
    pred = perm[gt] + 10
    miou, matching = A.miou_hungarian(pred, gt)
    assert miou == pytest.approx(1.0)
    assert matching == {int(perm[g]) + 10: g for g in range(5)}


def test_miou_hand_computed():
    pred = np.array([0, 0, 1, 1, 1, 2])
    gt = np.array([5, 5, 5, 7, 7, 7])
    # confusion (rows pred 0,1,2; cols gt 5,7): [[2,0],[1,2],[0,1]] -> match 0->5, 1->7
    # IoU(0,5) = 2 / (2 + 3 - 2) = 2/3;  IoU(1,7) = 2 / (3 + 3 - 2) = 1/2
    miou, matching = A.miou_hungarian(pred, gt)
    assert matching == {0: 5, 1: 7}
    assert miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    # ignore: dropping gt-7 pixels leaves one class, matched to pred 0 with IoU 2/3
    miou, matching = A.miou_hungarian(pred, gt, ignore=7)
    assert matching == {0: 5} and miou == pytest.approx(2 / 3)
    # more classes than segments: unmatched classes score 0
    miou, _ = A.miou_hungarian(np.zeros(4, int), np.array([0, 1, 2, 3]))
    assert miou == pytest.approx((1 / 4) / 4)


# ---------------------------------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("mode,pil", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
@pytest.mark.parametrize("size", [(20, 31), (14, 18), (3, 4)])
def test_upsample_matches_pil(mode, pil, size):
    x = np.random.default_rng(0).normal(size=(7, 9)).astype(np.float32)
    ref = np.asarray(Image.fromarray(x, mode="F").resize(size[::-1], pil))
    out = A.upsample(x, size, mode)
    assert out.dtype == np.float32 and out.shape == size
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_upsample_nearest_labels_and_channels():
    lab = np.random.default_rng(0).integers(0, 50, size=(7, 9)).astype(np.int32)
    for size in [(20, 31), (10, 13)]:
        ref = np.asarray(Image.fromarray(lab, mode="I").resize(size[::-1], Image.NEAREST))
        np.testing.assert_array_equal(A.upsample(lab, size), ref)
    up = A.upsample(lab, (14, 27))
    assert up.dtype == np.int32
    np.testing.assert_array_equal(up, np.repeat(np.repeat(lab, 2, 0), 3, 1))
    assert A.upsample(lab > 20, (14, 18)).dtype == bool
    maps = np.random.default_rng(1).normal(size=(5, 6, 3))
    up = A.upsample(maps, (10, 12))
    assert up.shape == (10, 12, 3) and up.dtype == np.float64
    np.testing.assert_allclose(up[..., 1], A.upsample(maps[..., 1], (10, 12)))


# ---------------------------------------------------------------------------------------------------- probes


def test_linear_probe_exact_and_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    w = rng.normal(size=(6, 2))
    y = x @ w + np.array([1.0, -2.0])
    p = A.linear_probe(x, y, ridge=1e-8, holdout=0.2)
    assert p.score > 1 - 1e-9 and p.train_score > 1 - 1e-9
    np.testing.assert_allclose(p.weights, w, atol=1e-6)
    np.testing.assert_allclose(p.bias, [1.0, -2.0], atol=1e-6)
    xn = rng.normal(size=(4000, 6))
    noise = A.linear_probe(xn, rng.normal(size=(4000,)), holdout=0.5, seed=1)
    assert abs(noise.score) < 0.02 and abs(noise.train_score) < 0.02 and noise.weights.shape == (6, 1)


def test_linear_probe_labels_and_where():
    x, y, _ = gaussian_blobs(sizes=(50, 50, 50))
    p = A.linear_probe(x, y + 3, holdout=0.3)
    assert p.classes.tolist() == [3, 4, 5] and p.score == 1.0
    np.testing.assert_array_equal(p.predict(x), y + 3)
    # "where": smooth spatial eigenvectors predict pixel position; block indicators do not
    coords = A.grid_coords(12, 12)
    spatial, _ = planted_eigs(np.zeros((12, 12), np.int64), K=6, spatial=1.0, sigma=3.0)
    blocks, _ = planted_eigs(np.arange(144).reshape(12, 12) % 2, K=2, spatial=0.0)
    where = A.linear_probe(A.spectral_features(spatial, normalize=False), coords).score
    not_where = A.linear_probe(A.spectral_features(blocks, normalize=False), coords).score
    assert where > 0.9 and not_where < 0.05


def test_grid_coords():
    c = A.grid_coords(2, 4)
    assert c.shape == (8, 2)
    np.testing.assert_allclose(c[5], [0.75, 0.375])


# ---------------------------------------------------------------------------------------------------- views


def test_import_needs_no_jax_and_describe_runs():
    """Importing analysis loads no JAX (describe's k-means loads it on its first call: `analysis.lloyd`)."""
    child = textwrap.dedent("""
        import sys, types
        import numpy as np
        import spectral_jax.analysis as A
        print(sorted(m for m in ("jax", "jaxlib", "flax", "optax", "torch") if m in sys.modules))
        ev = np.random.default_rng(0).normal(size=(1, 4, 6, 6))
        views = A.describe(types.SimpleNamespace(eigvecs=ev, eigvals=np.array([1.0, 0.9, 0.8, 0.7])))
        assert len(views) == 1 and isinstance(views[0], A.View), views
    """)
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-3000:]


def test_describe_is_segment_bipartition_instances_per_image():
    from spectral_jax.solvers.result import Result

    blobs, quads = two_blobs(), quadrants(12, 16)
    e0, l0 = planted_eigs(blobs, K=6)
    e1, l1 = planted_eigs(quads, K=6)
    eigvecs = np.stack([e0, e1])  # [B=2, K, h, w] float32, as solvers return them
    per_image = Result(eigvecs, np.stack([l0, l1]), np.zeros((2, 1, 6)), np.zeros(2), 0.0, 0, 0.0, "exact")
    shared = types.SimpleNamespace(eigvecs=eigvecs, eigvals=l0)  # eigvals [K], shared by the images
    for res in (per_image, shared):
        views = A.describe(res, seed=1)
        assert len(views) == 2 and all(isinstance(v, A.View) for v in views)
        for b, v in enumerate(views):
            ev = eigvecs[b].astype(np.float64)
            lam = np.asarray(res.eigvals if res.eigvals.ndim == 1 else res.eigvals[b], np.float64)
            assert v.eigvecs.dtype == v.eigvals.dtype == np.float64
            np.testing.assert_array_equal(v.eigvecs, ev)
            np.testing.assert_array_equal(v.eigvals, lam)
            seg = A.segment(ev, eigvals=lam, seed=1)
            np.testing.assert_array_equal(v.segments, seg)
            assert v.k == int(seg.max()) + 1
            np.testing.assert_array_equal(v.foreground, A.bipartition(ev))
            masks, scores = A.instance_masks(ev, eigvals=lam, seed=1)
            assert len(v.instances) == len(masks) and all((x == y).all() for x, y in zip(v.instances, masks))
            np.testing.assert_array_equal(v.instance_scores, scores)
    # and what they say on the planted cases (per-image eigvals)
    blob_view, quad_view = A.describe(per_image)
    left = np.arange(blobs.shape[1])[None, :] < 8
    want = {((blobs == 1) & left).tobytes(), ((blobs == 1) & ~left).tobytes()}
    assert len(blob_view.instances) == 2 and {m.tobytes() for m in blob_view.instances} == want  # one per blob
    assert quad_view.k == 4 and same_partition(quad_view.segments, quads)
