"""analysis.auto_k's "silhouette-tol" rule (segment's default): the smallest k within `tol` of the best mean
silhouette. Planted block graphs (numpy eigh, `test_analysis.planted_eigs`) and Gaussian blobs; edge cases."""

import numpy as np
import pytest
from sjtest import bench_module
from test_analysis import gaussian_blobs, planted_eigs, same_partition

from spectral_jax import analysis as A
from spectral_jax.analysis.cluster import SILHOUETTE_TOL
from spectral_jax.errors import InputError


def blocks(groups: int, h: int = 12, w: int = 12) -> np.ndarray:
    """Layout `[h, w]` of `groups` (3: vertical stripes; 6: 2 × 3 blocks) rectangles."""
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    if groups == 3:
        return xx // (w // 3)
    return (yy // (h // 2)) * 3 + xx // (w // 3)


@pytest.mark.parametrize("groups", [3, 6])
def test_segment_default_recovers_planted_groups(groups):
    lay = blocks(groups)
    eigvecs, eigvals = planted_eigs(lay, K=10)
    f = A.spectral_features(eigvecs, eigvals=eigvals)
    for k_range in [(2, 10), (2, 8), (groups - 1, groups + 3)]:  # the planted k inside, not at either end
        r = A.auto_k(f, k_range, method="silhouette-tol")
        assert r.k == groups and r.ks[0] < r.k < r.ks[-1], (k_range, r)
        assert r.method == "silhouette-tol" and r.scores.shape == r.ks.shape
        # the scores are the plain silhouettes: its maximum is the planted k too, the tolerance keeps it
        np.testing.assert_array_equal(r.scores, A.auto_k(f, k_range, method="silhouette").scores)
    labels = A.segment(eigvecs, eigvals=eigvals, seed=0)  # the default rule
    assert labels.max() + 1 == groups and same_partition(labels, lay)
    np.testing.assert_array_equal(labels, A.segment(eigvecs, eigvals=eigvals, method="silhouette-tol", seed=0))


def test_smallest_k_within_tol_not_the_top():
    """Six blobs in three tight pairs: the silhouette is highest at 6 but 3 (the pairs) is within 0.05 of it and
    wins; at tol 0 the rule is the plain silhouette; a huge tol gives the range's lower end."""
    rng = np.random.default_rng(0)
    pair_centres = 10.0 * np.eye(3)
    centres = np.concatenate([pair_centres + d for d in (0.0, 4.4 * np.eye(3)[[1, 2, 0]])])  # [6, 3]
    x = np.concatenate([c + 0.35 * rng.normal(size=(40, 3)) for c in centres])
    sil = A.auto_k(x, (2, 10), method="silhouette")
    tol = A.auto_k(x, (2, 10), method="silhouette-tol")
    assert sil.k == 6
    s = dict(zip(tol.ks.tolist(), tol.scores))
    assert s[6] - s[3] < SILHOUETTE_TOL and s[6] - s[2] > SILHOUETTE_TOL  # the case the test is about
    assert tol.k == 3
    assert A.auto_k(x, (2, 10), method="silhouette-tol", tol=0.0).k == 6
    assert A.auto_k(x, (2, 10), method="silhouette-tol", tol=10.0).k == 2
    assert A.auto_k(x, (4, 10), method="silhouette-tol").k == 4  # 3 outside the range: 4 is within tol of 6


def test_deterministic_and_subsampled():
    x, _, _ = gaussian_blobs(sizes=(50, 50, 50, 50))
    a = A.auto_k(x, (2, 7), method="silhouette-tol", seed=3, max_samples=80)
    b = A.auto_k(x, (2, 7), method="silhouette-tol", seed=3, max_samples=80)
    assert a.k == b.k == 4
    np.testing.assert_array_equal(a.scores, b.scores)


def test_edge_cases():
    x, _, _ = gaussian_blobs(sizes=(30, 30, 30))
    one = A.auto_k(x, (4, 4), method="silhouette-tol")  # k_range of one value: that value
    assert one.k == 4 and one.ks.tolist() == [4] and one.scores.shape == (1,)
    with pytest.raises(InputError, match="k_range"):  # too few points for any k in the range
        A.auto_k(x[:5], (6, 9), method="silhouette-tol")
    with pytest.raises(InputError, match="k_range"):
        A.auto_k(x, (5, 3), method="silhouette-tol")
    with pytest.raises(InputError, match="tol"):
        A.auto_k(x, method="silhouette-tol", tol=-0.1)
    with pytest.raises(InputError, match="silhouette-tol"):  # the unknown-method error lists the rules
        A.auto_k(x, method="silhoutte")
    # K too small for the range: eigengap needs K > hi's lower end, the embedding (K = 2: one column) is fine
    eigvecs, eigvals = planted_eigs(blocks(3), K=3)
    with pytest.raises(InputError, match="eigvals"):
        A.segment(eigvecs, eigvals=eigvals, method="eigengap", k_range=(5, 8))
    with pytest.raises(InputError, match="k_range"):
        A.segment(eigvecs[:, :2, :2], eigvals=eigvals, k_range=(4, 6))  # 4 pixels: k <= 3


def test_eval_autok_metrics_and_ground_truth():
    """benchmarks/eval_autok's scores: ARI/NMI label-permutation free, 1 on equal partitions, ARI's known value on a
    hand case; the patch majority and the COCO rasterisation with a crowd RLE."""
    ev = bench_module("eval_autok")
    a = np.array([0, 0, 0, 1, 1, 1])
    assert ev.ari(a, 5 - a) == pytest.approx(1.0) and ev.nmi(a, 5 - a) == pytest.approx(1.0)
    # b = [0, 0, 1, 1, 1, 1]: contingency [[2, 1], [0, 3]], Σ C(n_ij, 2) = 1 + 3 = 4, rows 3 + 3 = 6,
    # columns 1 + 6 = 7, expected 6·7/15 = 2.8, ARI = (4 − 2.8) / (6.5 − 2.8)
    assert ev.ari(a, np.array([0, 0, 1, 1, 1, 1])) == pytest.approx(1.2 / 3.7)
    assert ev.nmi(a, np.zeros(6)) == pytest.approx(0.0)
    label = np.zeros((6, 9), np.int64)
    label[:, :5] = 3  # columns 0..4 of 9 → patch 0 (columns 0..2) all 3, patch 1 (3..5) two of three 3
    np.testing.assert_array_equal(ev.patch_majority(label, (2, 3)), [[3, 3, 0], [3, 3, 0]])
    np.testing.assert_array_equal(ev.merge_small(np.array([0, 0, 0, 7, 2, 2]), 0.3), [0, 0, 0, 0, 2, 2])
    # the COCO rasterisation (eval_where_what.label_map): a crowd RLE, column-major runs from 0 (0, then 1 1, then
    # 0 0 0), under a larger polygon painted first
    rle = {"segmentation": {"counts": [1, 2, 3], "size": [2, 3]}, "area": 2, "category_id": 5}
    poly = {"segmentation": [[0, 0, 3, 0, 3, 2, 0, 2]], "area": 6, "category_id": 9}
    lab = ev.coco_label({"height": 2, "width": 3}, [rle, poly])
    np.testing.assert_array_equal(lab, [[9, 5, 9], [5, 9, 9]])
