"""Dataset-wide segments (issue #12, item 4): one k-means over every token's spectral embedding.

Planted cases build a `DatasetResult` whose eigenvectors are prototypes plus noise, so the right answer is known:
the same seed gives the same segments, one id means one cluster in every image (whatever the layout), "auto" finds
the planted number (eigengap with eigenvalues, silhouette without). Runs use the synthetic backbone of test_dataset
(32×32 inputs → 4×4 grid) through both methods; the CLI cases run the console script with a random-weight DINOv2-S
at 28×28 (2×2 grid), as test_dataset_badinput does: bad --segments → one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import dataset, viz
from spectral_jax.dataset.export import DatasetResult
from test_dataset import SMALL, make_folder, synthetic
from test_dataset_badinput import TINY, _cli, _one_line_exit_2, _tree

EXT = synthetic()


def planted(layouts, k_eigs: int = 8, noise: float = 0.05, seed: int = 0, eigvals=None) -> DatasetResult:
    """Images whose tokens carry one of P prototype embeddings: layouts `[n, h, w]` prototype ids → eigvecs
    `[n, K, h, w]` (x_0 constant, x_1 … x_{K−1} = the prototype + noise)."""
    lay = np.asarray(layouts)
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(lay.max() + 1, k_eigs - 1)) * 3.0
    e = protos[lay] + noise * rng.normal(size=(*lay.shape, k_eigs - 1))         # [n, h, w, K−1]
    e = np.concatenate([np.ones((*lay.shape, 1)), e], -1).transpose(0, 3, 1, 2).astype(np.float32)
    summary = {} if eigvals is None else {"eigvals": list(eigvals)}
    return DatasetResult.from_table(e, [f"img{i}.png" for i in range(len(lay))], e, None, summary)


def halves(n: int, h: int = 6, w: int = 6) -> np.ndarray:
    """n layouts of two prototypes placed differently in each image: left/right, top/bottom, diagonal, …"""
    yy, xx = np.mgrid[:h, :w]
    masks = [xx < w // 2, yy >= h // 2, xx > yy, (xx + yy) % 2 == 0]
    return np.stack([masks[i % len(masks)] ^ bool(i % 2) for i in range(n)]).astype(np.int64)


def test_same_seed_same_segments_and_one_id_one_cluster_across_images():
    lay = halves(4)
    res = planted(lay)
    a = dataset.segments(res, 2, seed=0)
    b = dataset.segments(res, 2, seed=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.labels.shape == (4, 6, 6) and a.labels.dtype == np.int32 and a.rule == "given"
    # one id ↔ one prototype in every image, whatever the layout
    ids = {int(p): set(np.unique(a.labels[lay == p]).tolist()) for p in (0, 1)}
    assert ids[0] != ids[1] and all(len(v) == 1 for v in ids.values())
    # sizes, images per segment; ids numbered by size (largest first)
    assert a.sizes.tolist() == sorted(a.sizes.tolist(), reverse=True) and a.sizes.sum() == lay.size
    assert a.images.tolist() == [4, 4]
    # 4 segments: still deterministic; every seed gives a valid partition numbered 0…3
    c, d = dataset.segments(res, 4, seed=3), dataset.segments(res, 4, seed=3)
    np.testing.assert_array_equal(c.labels, d.labels)
    assert set(np.unique(c.labels).tolist()) == {0, 1, 2, 3}


def test_auto_finds_the_planted_number():
    rng = np.random.default_rng(1)
    lay = rng.integers(0, 3, size=(5, 4, 4))
    lay[:, 0, :3] = [0, 1, 2]                                        # every prototype in every image
    gap = [1.0, 0.97, 0.95, 0.40, 0.38, 0.35, 0.33, 0.30]            # 3 eigenvalues near the top, then a gap
    e = dataset.segments(planted(lay, eigvals=gap), "auto", seed=0)
    assert (e.rule, e.num_segments, e.asked) == ("eigengap", 3, "auto")
    assert e.candidates.tolist() == list(range(2, 8)) and int(np.argmax(e.scores)) == 1
    # the same partition as the planted one, up to the names of the ids
    pairs = {(int(p), int(q)) for p, q in zip(lay.ravel(), e.labels.ravel())}
    assert len(pairs) == 3
    s = dataset.segments(planted(lay), "auto", seed=0)              # no eigenvalues (a gd run): silhouette
    assert (s.rule, s.num_segments) == ("silhouette", 3)
    assert len({(int(p), int(q)) for p, q in zip(lay.ravel(), s.labels.ravel())}) == 3


def test_embedding_drops_the_first_and_weights_by_eigenvalue():
    from spectral_jax.analysis import spectral_features

    rng = np.random.default_rng(2)
    e = rng.normal(size=(3, 5, 2, 4))
    lam = np.array([1.0, 0.9, 0.5, 0.2, 0.1])
    f = dataset.cluster.embedding(e, lam)
    assert f.shape == (3 * 2 * 4, 4)
    np.testing.assert_allclose(f[8:16], spectral_features(e[1], eigvals=lam))      # image 1 = rows 8…15
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0)


@pytest.mark.parametrize("bad", [0, -1, "x", "2.5", True, 1.5])
def test_settings_refuse_bad_segments(bad):
    with pytest.raises(dataset.InputError, match="segments"):
        dataset.Settings(segments=bad)
    assert dataset.Settings(segments="7").segments == 7 and dataset.Settings(segments="AUTO").segments == "auto"


def test_more_segments_than_tokens_refused():
    res = planted(halves(2, 2, 2))
    with pytest.raises(dataset.InputError, match="more than the 8 tokens"):
        dataset.segments(res, 9)
    assert dataset.segments(res, 8).num_segments == 8


@pytest.mark.parametrize("method", ["exact", "gd"])
def test_run_writes_segments(tmp_path, method):
    folder = make_folder(str(tmp_path / "imgs"), 6)
    out = tmp_path / "out"
    res = dataset.run(folder, str(out), backbone=EXT, **{**SMALL, "method": method, "figure_images": 4,
                                                          "segments": 3, **({"epochs": 1} if method == "gd" else {})})
    seg = res.segments
    assert isinstance(res, sj.Result) and res.num_images == 6 and res.joint and res.eigvals.shape == (6, 6)
    if method == "gd":     # no whole-dataset eigensolve: NaN eigvals, no graph quotients, the minibatch objective
        assert np.isnan(res.eigvals).all() and res.rq.shape == (6, 0, 6) and res.convergence.stationarity is None
        assert (res.objective == res.summary()["objective"]).all() and res.method == "dataset-paper"
        u = res.eigvecs.transpose(0, 2, 3, 1).reshape(-1, 6).astype(np.float64)
        assert res.orth_error == pytest.approx(np.abs(u.T @ u - np.eye(6)).max(), abs=1e-9)
        assert res.orth_error < 1e-4
    else:
        assert np.isfinite(res.eigvals).all() and res.rq.shape[1] >= 1 and res.convergence.converged
    assert seg.num_segments == 3 and seg.labels.shape == (6, 4, 4) and seg.rule == "given"
    with np.load(out / "segments.npz") as f:
        np.testing.assert_array_equal(f["segments"], seg.labels)
        assert f["names"].tolist() == res.names and int(f["num_segments"]) == 3 and str(f["rule"]) == "given"
        assert f["centers"].shape == (3, 5)
    s = json.loads((out / "summary.json").read_text())["segments"]
    assert s["num_segments"] == 3 and sum(s["sizes"]) == 6 * 16 and all(1 <= v <= 6 for v in s["images"])
    assert s["kmeans_converged"] is True
    from PIL import Image

    assert Image.open(out / "segments.png").size[0] >= 4 * 64
    back = dataset.load_result(str(out))
    np.testing.assert_array_equal(back.segments.labels, seg.labels)
    # auto by default: exact runs read the eigengap of their eigenvalues, gd runs the silhouette
    auto = dataset.segments(back, "auto")
    assert auto.rule == ("eigengap" if method == "exact" else "silhouette")
    assert np.isfinite(back.eigvals).all() == (method == "exact") and back.eigvals.shape == (6, 6)


def test_export_failure_leaves_only_checkpoints_and_resume_reexports(tmp_path):
    """--segments above the tokens of the listed files is refused before anything is written; above the tokens of
    the images actually read (a corrupt file found during the run) it fails at the export, which writes nothing
    (all outputs reserved first); --resume with a smaller count exports."""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = tmp_path / "out"
    with pytest.raises(dataset.InputError, match="more than the 64 tokens"):
        dataset.run(folder, str(out), backbone=EXT, epochs=1, **{**SMALL, "segments": 65})
    assert not out.exists()
    (tmp_path / "imgs" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")   # listed: 80 tokens
    with pytest.raises(dataset.InputError, match="more than the 64 tokens"):
        dataset.run(folder, str(out), backbone=EXT, epochs=1, **{**SMALL, "segments": 65})
    assert sorted(os.listdir(out)) == ["checkpoints"]
    res = dataset.run(folder, str(out), backbone=EXT, epochs=1, resume=True, **{**SMALL, "segments": 64})
    assert res.segments.num_segments == 64
    assert {"eigvecs.npz", "segments.npz", "summary.json"} <= set(os.listdir(out))


def test_figure_has_one_colour_per_segment_and_a_legend():
    lab = np.zeros((3, 2, 2), np.int64)
    lab[1] = 1
    lab[2, 0] = 2
    thumbs = [np.full((20, 20, 3), 0, np.uint8)] * 3
    fig = viz.dataset_segments_figure(lab, thumbs, 3, cols=3, alpha=1.0, gap=2)
    pal = viz.palette(3)
    assert fig.dtype == np.uint8 and fig.shape[1] == 3 * 22 and fig.shape[0] > 22
    np.testing.assert_array_equal(fig[5, 5], pal[0])                   # image 0: segment 0 everywhere
    np.testing.assert_array_equal(fig[5, 22 + 5], pal[1])              # image 1: segment 1
    np.testing.assert_array_equal(fig[5, 44 + 5], pal[2])              # image 2, top row: segment 2
    np.testing.assert_array_equal(fig[15, 44 + 5], pal[0])             # … bottom row: segment 0, same colour as image 0
    legend = fig[22:]
    for c in pal:
        assert (legend == c).all(-1).any()                            # a swatch of every segment's colour


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    return make_folder(str(tmp_path_factory.mktemp("inputs") / "imgs"), 3)


@pytest.mark.parametrize("value,needles", [("0", ["--segments", "≥ 1"]), ("-1", ["--segments", "≥ 1"]),
                                           ("x", ["--segments", "'x'"]),
                                           ("13", ["--segments", "more than the 12 tokens"])])
def test_cli_bad_segments_one_line_exit_2_nothing_written(tmp_path, imgs, value, needles):
    before = _tree(imgs)
    r = _cli(imgs, *TINY, "--segments", value, "--out", str(tmp_path / "out"))
    _one_line_exit_2(r, *needles)
    assert not (tmp_path / "out").exists() and _tree(imgs) == before
    assert os.listdir(tmp_path) == []


def test_cli_writes_segments_and_their_numbers(tmp_path, imgs):
    out = tmp_path / "out"
    exact = TINY[:TINY.index("--method")] + TINY[TINY.index("--batch-size"):]     # default method, no gd options
    r = _cli(imgs, *exact, "--segments", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["segments"] == 3 and line["segments_rule"] == "given"
    with np.load(out / "segments.npz") as f:
        assert f["segments"].shape == (3, 2, 2) and set(np.unique(f["segments"]).tolist()) == {0, 1, 2}
    s = json.loads((out / "summary.json").read_text())
    assert s["segments_asked"] == 3 and sum(s["segments"]["sizes"]) == 12 and len(s["segments"]["images"]) == 3
    assert (out / "segments.png").stat().st_size > 0
