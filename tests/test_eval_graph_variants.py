"""benchmarks/eval_graph_variants.py: each graph variant against its dense definition, and the --tiny run end to end
on a generated COCO-format set (`sjtest.coco_like`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sjtest import BENCH, bench_module, coco_like

GRID, IMAGES = (8, 8), 3          # 64 tokens per image: the searches keep 64 + 64, the official recipe 50 + 50


def _load():
    return bench_module("eval_graph_variants")


@pytest.fixture(scope="module")
def searched():
    """Planted features (3 images × 64 tokens × 16-d, two directions plus noise), their unit rows, and one
    `search` of them."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    x = (centres[rng.integers(0, 2, IMAGES * 64)] + 0.7 * rng.normal(size=(IMAGES * 64, 16))).astype(np.float32)
    ev = _load()
    assert ev.search_k(GRID, IMAGES) == 64
    idx, cos = ev.search(x, x, GRID, IMAGES, 64)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return ev, x, u, idx, cos


def _dense(idx, w, n):
    a = np.zeros((n, n))
    np.add.at(a, (np.repeat(np.arange(n), idx.shape[1]), idx.ravel()), w.ravel())
    return a


def test_search_is_exact(searched):
    """The shared search: 64 intra then 64 inter neighbours of every token, largest cosine first, equal to the
    brute-force ones."""
    ev, x, u, idx, cos = searched
    c = u @ u.T
    img = np.arange(len(u)) // 64
    assert idx.shape == (len(u), 128)
    for i in (0, 70, 150):
        own, other = img == img[i], img != img[i]
        assert set(idx[i, :64]) == set(np.flatnonzero(own))
        np.testing.assert_allclose(cos[i, 64:], np.sort(c[i, other])[::-1][:64], atol=1e-5)
        np.testing.assert_allclose(cos[i], c[i, idx[i]], atol=1e-5)


def test_official_is_the_library_recipe(searched):
    """"official" cut from the shared search is `graphs.knn`'s own dataset graph (k_intra = k_inter = 50, cos ≤ 0.1
    dropped): the same affinity and degrees; `knn_graph` gives the same P."""
    from spectral_jax import graphs

    ev, x, u, idx, cos = searched
    n = len(u)
    i, w = ev.weighted(idx, cos, "official", 64, None)
    ref = graphs.knn(x[None], x[None], GRID, IMAGES, 50, 50, min_cos=0.1, search="exact")
    np.testing.assert_allclose(_dense(i, w, n), _dense(np.asarray(ref.idx[0]), np.asarray(ref.w[0]), n), atol=1e-6)
    g = ev.knn_graph([(i, w)], GRID, IMAGES)
    np.testing.assert_allclose(np.asarray(g.deg[0]), np.asarray(ref.deg[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g.dense()[0]), np.asarray(ref.dense()[0]), atol=1e-6)


def test_weightings_match_their_definitions(searched):
    """plain-k: the top-k cosines over ALL tokens (no split); k100+100: every searched edge above 0.1; rbf-median:
    exp(−d²/2σ²) on the official edges; self-tuning: exp(−d²/(σ_i σ_j)), σ_i = distance to the 7th neighbour."""
    ev, x, u, idx, cos = searched
    n = len(u)
    c = u @ u.T
    d2 = np.maximum(2 - 2 * c, 0)
    # plain: top 64 over all tokens, brute force
    i, w = ev.weighted(idx, cos, "plain-k100", 64, None)
    for r in (3, 100):
        np.testing.assert_allclose(np.sort(w[r]), np.sort(np.where(np.sort(c[r])[::-1][:64] > 0.1,
                                                                   np.sort(c[r])[::-1][:64], 0)), atol=1e-5)
    i, w = ev.weighted(idx, cos, "k100+100", 64, None)
    np.testing.assert_allclose(_dense(i, w, n), np.where(c > 0.1, c, 0) * (_dense(idx, np.ones_like(cos), n) > 0),
                               atol=1e-5)
    oi, _ = ev.weighted(idx, cos, "official", 64, None)
    mask = _dense(oi, np.ones(oi.shape), n) > 0
    sigma = ev.median_sigma(x, 0)
    i, w = ev.weighted(idx, cos, "rbf-median", 64, sigma)
    np.testing.assert_allclose(_dense(i, w, n), np.exp(-d2 / (2 * sigma ** 2)) * mask, atol=1e-5)
    i, w = ev.weighted(idx, cos, "rbf-cut", 64, sigma)     # what --edge-weights rbf builds at --min-cos 0.1
    np.testing.assert_allclose(_dense(i, w, n), np.exp(-d2 / (2 * sigma ** 2)) * mask * (c > 0.1), atol=1e-5)
    s = np.sqrt(np.sort(d2, axis=1)[:, 6])                   # the 7th nearest (the token itself is the 1st)
    i, w = ev.weighted(idx, cos, "self-tuning", 64, None)
    np.testing.assert_allclose(_dense(i, w, n), np.exp(-d2 / np.outer(s, s)) * mask, atol=1e-4)
    # ncut-pytorch's σ: the median distance of random pairs of unit rows
    pairs = np.sqrt(d2[np.triu_indices(n, 1)])
    assert abs(sigma - np.median(pairs)) < 0.05 * np.median(pairs)


@pytest.mark.slow          # a benchmark's smoke run (CI time): python -m pytest -m slow tests/test_eval_graph_variants.py
def test_tiny_run(tmp_path):
    """--tiny end to end through the script on generated COCO-format images: every variant solved, segmented and
    scored (scores are fractions, the official vv row is there), the table written."""
    data = tmp_path / "coco-mini"
    coco_like(data, bench_module("eval_where_what").ANN, n=6)
    out = tmp_path / "v.md"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "eval_graph_variants.py"), "--tiny", "--data", str(data),
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "v.json").read_text())
    names = [v["variant"] for v in rep["variants"]]
    assert names == ["qk official, all layers", "vv official, all layers", "vv self-tuning, all layers",
                     "hidden official, last block"]
    assert rep["images"] == 6
    for v in rep["variants"]:
        assert 0 < v["miou"] <= 1 and 0 < v["pixel_acc"] <= 1 and v["edges"] > 0
        assert len(v["layers"]) == (1 if "last block" in v["variant"] else rep["layers"])
    text = out.read_text()
    assert "| vv official, all layers |" in text and "Best variant" in text


@pytest.mark.slow          # a benchmark's smoke run (CI time): python -m pytest -m slow tests/test_eval_graph_variants.py
def test_tiny_horse_run(tmp_path):
    """--labels horse --tiny end to end on generated horse-dev-like images (`bench_peers.generated_data`): the vv
    graph over all layers under three layer weightings (each summing to 1), the last layer alone, every single
    layer, and ncut-pytorch, each scored as foreground IoU / mIoU in [0, 1]."""
    pytest.importorskip("ncut_pytorch")
    data = bench_module("bench_peers").generated_data(str(tmp_path / "data"))["horse-dev"]
    out = tmp_path / "h.md"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "eval_graph_variants.py"), "--tiny", "--labels", "horse",
                        "--data", data, "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "h.json").read_text())
    names = [v["variant"] for v in rep["variants"]]
    assert names[:4] == [f"vv official, {lw}" for lw in ("uniform", "quadratic", "select", "last layer")]
    assert "ncut-pytorch" in names[-1] and len(rep["singles"]["vv"]) == rep["layers"]
    assert [round(sum(v["layer_weights"]), 3) for v in rep["variants"][:3]] == [1.0] * 3
    assert rep["images"] == len(os.listdir(os.path.join(data, "images"))) and rep["segments"] == 2
    for v in rep["variants"]:
        assert 0 <= v["fg_iou"] <= 1 and 0 < v["miou"] <= 1
    assert "| vv official, uniform |" in out.read_text()
