"""The dataset graph's edge weights (cosine, the paper's; rbf with the median σ, ncut-pytorch's rule) and its kNN
search (exact from the store, or approximate with its recall reported): the RBF graph against a dense numpy
construction, σ's determinism under the seed and its agreement between the store's path and the in-memory one,
the caches' keys, the gd path, and the CLI's refusals.

Synthetic backbone of test_dataset (32×32 inputs → a 4×4 grid, 16 tokens per image).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from spectral_jax import dataset, graphs, knn_search
from spectral_jax.errors import InputError
from spectral_jax.dataset import settings as S
from spectral_jax.dataset import whole
from test_dataset import _cli, _dense_knn, make_folder, synthetic

EXACT = dict(size=32, batch_size=4, num_eigs=6, k_intra=5, k_inter=5, figure_images=0, method="exact",
             graph="knn-vv")


def _dense_rbf(a, n_img, per, k_intra, k_inter, valid, sigma, min_cos=0.1):
    """`_dense_knn` of a with itself, its kept edges weighted exp(−|u_i − u_j|² / 2σ²) of the unit rows u."""
    return _dense_knn(a, a, n_img, per, k_intra, k_inter, valid, min_cos, sigma=sigma)


def _np_sigma(x, i, j):
    """The median distance of the unit rows' pairs (i ≠ j), in float64."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    keep = i != j
    return float(np.median(np.linalg.norm(u[i[keep]] - u[j[keep]], axis=1)))


def test_rbf_graph_matches_dense_numpy_reference(rng):
    grid, n_img, per = (3, 4), 5, 12
    a = rng.normal(size=(2, n_img * per, 6)).astype(np.float32)
    valid = np.array([True, True, False, True, True])
    rows = np.repeat(valid, per)
    g = graphs.knn(a, a, grid, n_img, k_intra=4, k_inter=6, valid=valid, search="exact")
    gw, sigma = graphs.weight_edges(g, a, "rbf", 3, rows)
    i, j = (np.asarray(x) for x in graphs.sigma_pairs(rows, 3))
    assert rows[i].all() and rows[j].all() and len(i) == graphs.SIGMA_PAIRS     # only valid tokens are drawn
    for layer in range(2):
        want = _np_sigma(a[layer], i, j)
        assert abs(float(sigma[layer]) - want) < 1e-5 * want
        np.testing.assert_allclose(np.asarray(gw.dense())[layer],
                                   _dense_rbf(a[layer], n_img, per, 4, 6, valid, want), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(gw.idx), np.asarray(g.idx))        # the same edges, reweighted
    assert (np.asarray(gw.w) > 0).sum() == (np.asarray(g.w) > 0).sum()
    same, none = graphs.weight_edges(g, a, "cosine", 3, rows)
    assert same is g and none is None
    with pytest.raises(graphs.InputError, match="edge weighting"):
        graphs.weight_edges(g, a, "binary", 3, rows)


def test_sigma_is_deterministic_under_the_seed(rng):
    rows = np.ones(500, bool)
    rows[100:150] = False
    p0, p0b, p1 = graphs.sigma_pairs(rows, 0), graphs.sigma_pairs(rows, 0), graphs.sigma_pairs(rows, 1)
    np.testing.assert_array_equal(np.asarray(p0[0]), np.asarray(p0b[0]))
    np.testing.assert_array_equal(np.asarray(p0[1]), np.asarray(p0b[1]))
    assert (np.asarray(p0[0]) != np.asarray(p1[0])).any()
    x = rng.normal(size=(500, 7)).astype(np.float32)
    i, j = (np.asarray(v) for v in p0)
    s = float(graphs.median_sigma(x[i], x[j], i == j))
    assert abs(s - _np_sigma(x, i, j)) < 1e-5 and s == float(graphs.median_sigma(x[i], x[j], i == j))
    assert S.EDGES == graphs.EDGES                  # the settings' list (no JAX there) is the library's


def test_dataset_rbf_run_store_and_memory_paths_agree(tmp_path, capsys):
    """A cosine run and an rbf run of the same folder: the same neighbours; the rbf weights are exp(−(2 − 2cos)/2σ²)
    of the cosine run's weights with the summary's σ per layer (the store's path, `store_sigma`); an approximate
    search (one graph's features at a time from the store) applies the same σ and reports its search, its recall
    and its tries (the in-memory σ, `graphs.weight_edges`, is compared with the store's in the two-process test).
    The same seed twice gives the same σ; another seed another σ."""
    folder = make_folder(str(tmp_path / "imgs"), 12)
    bb = synthetic()
    cos = dataset.run(folder, str(tmp_path / "cos"), backbone=bb, **{**EXACT, "edge_weights": "cosine"})
    rbf = dataset.run(folder, str(tmp_path / "rbf"), backbone=bb, **{**EXACT, "edge_weights": "rbf"})
    sc, sr = cos.summary(), rbf.summary()
    assert sc["edge_weights"] == {"kind": "cosine"} and sr["edge_weights"]["kind"] == "rbf"
    assert sc["knn_search"]["used"] == "exact" and sc["knn_search"]["recall_min"] == 1.0
    sigma = sr["edge_weights"]["sigma"]
    assert set(sigma) == {"0", "1"} and sr["edge_weights"]["sigma_seed"] == 0
    with np.load(tmp_path / "cos" / "checkpoints" / "graph.npz") as f:
        idx_c, w_c = f["idx0"], f["w0"]
    with np.load(tmp_path / "rbf" / "checkpoints" / "graph.npz") as f:
        idx_r, w_r, deg_r = f["idx0"], f["w0"], f["deg0"]
    np.testing.assert_array_equal(idx_c, idx_r)
    for layer in range(2):
        s = sigma[str(layer)]
        want = np.where(w_c[layer] != 0, np.exp(-(2 - 2 * w_c[layer].astype(np.float64)) / (2 * s * s)), 0)
        np.testing.assert_allclose(w_r[layer], want, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(deg_r[layer], 0.5 * (w_r[layer].sum(1) + np.bincount(
            idx_r[layer].ravel(), w_r[layer].ravel(), minlength=len(deg_r[layer]))), rtol=1e-5)
    assert not np.allclose(rbf.eigvecs, cos.eigvecs, atol=1e-3)
    ivf = dataset.run(folder, str(tmp_path / "ivf"), backbone=bb, **{**EXACT, "edge_weights": "rbf",
                                                                        "search": "ivf"})
    si = ivf.summary()
    err = [line for line in capsys.readouterr().err.splitlines() if "recall" in line]
    assert len(err) == 1 and "kNN search ivf" in err[0] and f"recall {si['knn_search']['recall_min']:.4f}" in err[0]
    for layer in ("0", "1"):
        assert abs(si["edge_weights"]["sigma"][layer] - sigma[layer]) < 1e-5
    ks = si["knn_search"]
    assert ks["asked"] == "ivf" and ks["used"] == "ivf" and set(ks["recall"]) == {"0", "1"}
    assert 0 < ks["recall_min"] <= 1 and ks["recall_rows"] == 192 and ks["nlist"] >= 1
    assert ks["min_recall"] == knn_search.AUTO_MIN_RECALL and ks["recall_min"] >= ks["min_recall"]   # checked
    (group,) = ks["tries"]                                       # one layer group: per graph, its tries
    assert len(group) == 2 and min(t[-1]["recall"] for t in group) == ks["recall_min"]
    again = dataset.run(folder, str(tmp_path / "rbf2"), backbone=bb, **{**EXACT, "edge_weights": "rbf"})
    assert again.summary()["edge_weights"]["sigma"] == sigma
    other = dataset.run(folder, str(tmp_path / "rbf3"), backbone=bb, **{**EXACT, "edge_weights": "rbf", "seed": 5})
    assert other.summary()["edge_weights"]["sigma"] != sigma
    half = dataset.run(folder, str(tmp_path / "bf16"), backbone=bb, **{**EXACT, "edge_weights": "rbf",
                                                                         "features_dtype": "bfloat16"})
    for layer, v in half.summary()["edge_weights"]["sigma"].items():     # σ from the stored bfloat16 features
        assert abs(v - sigma[layer]) < 1e-2 * sigma[layer]
    # the graph cache brings σ back
    back = dataset.run(folder, str(tmp_path / "rbf"), backbone=bb, resume=True,
                       **{**EXACT, "edge_weights": "rbf", "num_eigs": 4})
    assert back.summary()["cached"] == ["graph"] and back.summary()["edge_weights"]["sigma"] == sigma


def test_auto_takes_the_checked_search_above_its_size_one_layer_at_a_time(tmp_path, monkeypatch, capsys):
    """`--search auto` at dataset level: exact below knn_search.AUTO_MIN_COLUMNS tokens; above it (lowered here) the
    checked approximate search, graph by graph from the store — recall ≥ min_recall or exact, its tries and the
    search in the summary, the memory estimate's features term one graph's features (not the tiles); a resumed run
    reads the graph back."""
    folder = make_folder(str(tmp_path / "imgs"), 12)
    bb = synthetic()
    below = dataset.run(folder, str(tmp_path / "below"), backbone=bb, **EXACT).summary()
    assert below["knn_search"]["used"] == "exact" and "tries" not in below["knn_search"]
    monkeypatch.setattr(knn_search, "AUTO_MIN_COLUMNS", 100)
    monkeypatch.setattr(knn_search, "AUTO_CELL", 8)
    monkeypatch.setattr(knn_search, "AUTO_NPROBE", 1)            # one cell / list first: a recall under 1 to keep
    monkeypatch.setattr(knn_search, "AUTO_FAISS_NPROBE", 1)
    monkeypatch.setattr(knn_search, "AUTO_MIN_RECALL", 0.05)
    out = str(tmp_path / "above")
    res = dataset.run(folder, out, backbone=bb, **EXACT)
    ks = res.summary()["knn_search"]
    assert ks["asked"] == "auto" and ks["used"] in ("ivf", "faiss", "exact") and len(ks["tries"][0]) == 2
    assert ks["min_recall"] == knn_search.AUTO_MIN_RECALL
    assert ks["used"] == "exact" or ks["recall_min"] >= knn_search.AUTO_MIN_RECALL
    assert ks["recall"]["0"] < 1, ks                             # so that the resume below must keep it
    grid_nodes = 12 * 4 * 4                                      # synthetic: 32² input, patch 8; F = 2 heads × 8
    sr = knn_search.auto_search(grid_nodes)                          # with faiss: + the rows' probes, widest try
    probes = grid_nodes * knn_search.last_try(grid_nodes, 1, sr).nprobe * 4 if sr.kind == "faiss" else 0
    assert res.summary()["memory"]["features_memory"] == grid_nodes * 16 * (4 + 4 * 2) + probes   # one graph
    assert below["memory"]["features_memory"] > grid_nodes * 16 * 12
    back = dataset.run(folder, out, backbone=bb, resume=True, **{**EXACT, "num_eigs": 4})
    assert back.summary()["cached"] == ["graph"]
    with np.load(os.path.join(out, "checkpoints", "graph.npz")) as f:
        assert (f["w0"] >= 0).all() and f["idx0"].max() < grid_nodes
        whole_graph = {k: f[k] for k in ("idx0", "w0")}
    # stopped after its first layer: --resume reads layer 0 back with its recall and searches layer 1 only
    stop_out, calls, real = str(tmp_path / "stopped"), [], graphs.knn

    def knn(*a, **kw):
        calls.append(a[0] is a[1])                               # knn-vv: the rows are the columns, one array
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(graphs, "knn", knn)
    with pytest.raises(KeyboardInterrupt):
        dataset.run(folder, stop_out, backbone=bb, **EXACT)
    calls.clear()
    again = dataset.run(folder, stop_out, backbone=bb, resume=True, **EXACT).summary()["knn_search"]
    assert len(calls) == 1 and again["recall"] == ks["recall"] and again["tries"][0][0] == []
    assert calls == [True], "the VV graph's rows reached graphs.knn as a copy of its columns (no reuse of lists)"
    with np.load(os.path.join(stop_out, "checkpoints", "graph.npz")) as f:
        for k, v in whole_graph.items():
            np.testing.assert_array_equal(f[k], v)


def test_min_recall_is_the_checked_search_floor_and_part_of_the_result(tmp_path, monkeypatch):
    """`min_recall` (--min-recall) is the floor the dataset's checked search reaches before it stops probing more:
    a low floor keeps the first try, a floor of 1 probes on (to the exact search, or a try that finds every
    sampled neighbour); the summary records the floor used; a resumed run with another floor is refused (it is a
    result setting: the graph depends on it); beside --search exact, or out of (0, 1], it is one InputError line."""
    monkeypatch.setattr(knn_search, "AUTO_MIN_COLUMNS", 100)
    monkeypatch.setattr(knn_search, "AUTO_CELL", 8)
    monkeypatch.setattr(knn_search, "AUTO_NPROBE", 1)            # one cell / list first: a recall under 1
    monkeypatch.setattr(knn_search, "AUTO_FAISS_NPROBE", 1)
    folder = make_folder(str(tmp_path / "imgs"), 12)
    bb = synthetic()
    low = dataset.run(folder, str(tmp_path / "low"), backbone=bb, **EXACT, min_recall=0.05).summary()["knn_search"]
    assert low["min_recall"] == 0.05 and low["used"] != "exact" and low["recall_min"] < 1, low
    assert all(len(t) == 1 for t in low["tries"][0]), low["tries"]           # the first try reached the floor
    high = dataset.run(folder, str(tmp_path / "high"), backbone=bb, **EXACT, min_recall=1.0).summary()["knn_search"]
    assert high["min_recall"] == 1.0 and (high["used"] == "exact" or high["recall_min"] == 1.0), high
    assert high["tries"] != low["tries"] or high["used"] != low["used"]       # it searched on past the first try
    assert S.Settings(min_recall=0.98).result_fields()["min_recall"] == 0.98
    with pytest.raises(dataset.InputError, match=r"min_recall 0.05 → 1.0"):
        dataset.run(folder, str(tmp_path / "low"), backbone=bb, resume=True, **EXACT, min_recall=1.0)
    for bad, match in ((0, r"--min-recall: must be a recall in \(0, 1\], got 0"), (1.5, r"got 1.5"),
                       (float("nan"), r"got nan"), ("0.9", r"must be a number")):
        with pytest.raises(dataset.InputError, match=match):
            S.Settings(min_recall=bad)
    with pytest.raises(dataset.InputError, match=r"--min-recall: .*--search exact is exact — drop --min-recall"):
        S.Settings(search="exact", min_recall=0.99)
    with pytest.raises(dataset.InputError, match=r"--min-recall.* --method exact only"):
        S.Settings(method="gd", min_recall=0.99)


def test_cache_keys_differ_and_a_run_with_other_weights_is_refused(tmp_path):
    fp = dict(model="m", weights="w", layers="all", size=[32, 32], files={}, num_images=1, graph="knn-vv",
              features_dtype="float32", k_intra_effective=5, k_inter_effective=5, min_cos=0.1, block=512,
              search="exact", seed=0)
    keys = {e: whole.cache_key("graph", {**fp, "edge_weights": e}) for e in S.EDGES}
    assert keys["cosine"] != keys["rbf"] and keys["rbf"]["edge_weights"] == "rbf"
    assert "seed" in keys["rbf"] and "seed" not in keys["cosine"]              # σ's pairs are drawn with the seed
    assert whole.cache_key("graph", {**fp, "edge_weights": "cosine", "search": "ivf"}) != keys["cosine"]
    assert whole.cache_key("graph", {**fp, "edge_weights": "cosine", "min_recall": 0.99}) != keys["cosine"]
    # the features do not depend on the weights: their key is the same
    assert (whole.cache_key("features", {**fp, "edge_weights": "cosine"})
            == whole.cache_key("features", {**fp, "edge_weights": "rbf"}))
    folder = make_folder(str(tmp_path / "imgs"), 4)
    dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**EXACT, "edge_weights": "cosine"})
    with pytest.raises(dataset.InputError, match="edge_weights 'cosine' → 'rbf'"):
        dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), resume=True,
                    **{**EXACT, "edge_weights": "rbf"})


def test_a_graph_cached_before_edge_weights_and_search_existed_still_resumes(tmp_path):
    """A graph.npz whose key has no edge_weights / search and which holds no info record (what runs made before the
    two options wrote) is read back on --resume as the cosine graph of an exact search, not refused."""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    first = dataset.run(folder, out, backbone=synthetic(), **EXACT)
    path = os.path.join(out, "checkpoints", "graph.npz")
    with np.load(path) as f:
        d = {k: f[k] for k in f.files}
    key = json.loads(str(d.pop("key")))
    assert key["edge_weights"] == "cosine" and key["search"] == "auto" and "seed" not in key
    del key["edge_weights"], key["search"], d["info"]
    np.savez(path, key=np.array(json.dumps(key)), **d)
    again = dataset.run(folder, out, backbone=synthetic(), resume=True, **EXACT)
    assert "graph" in again.summary()["cached"]
    assert again.summary()["knn_search"]["used"] == "exact"
    np.testing.assert_array_equal(np.asarray(again.eigvecs), np.asarray(first.eigvecs))


@pytest.mark.filterwarnings("ignore:dataset gd. not converged")
def test_gd_batches_take_the_rbf_weights(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 8)
    kw = dict(size=32, batch_size=4, num_eigs=4, k_intra=5, k_inter=5, figure_images=0, method="gd", epochs=1,
              graph="knn-vv")
    a = dataset.run(folder, str(tmp_path / "a"), backbone=synthetic(), **{**kw, "edge_weights": "rbf"})
    b = dataset.run(folder, str(tmp_path / "b"), backbone=synthetic(), **{**kw, "edge_weights": "cosine"})
    assert a.summary()["edge_weights"]["kind"] == "rbf" and b.summary()["edge_weights"]["kind"] == "cosine"
    assert not np.allclose(a.eigvecs, b.eigvecs, atol=1e-4)


@pytest.mark.parametrize("case", ["weights", "search", "search-gd", "min-recall", "min-recall-exact"])
def test_cli_refuses_bad_graph_options_in_one_line(tmp_path, case):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    extra = {"weights": ["--edge-weights", "binary"], "search": ["--search", "hnsw"],
             "search-gd": ["--method", "gd", "--search", "ivf"], "min-recall": ["--min-recall", "1.5"],
             "min-recall-exact": ["--search", "exact", "--min-recall", "0.99"]}[case]
    r = _cli(folder, "--model", "dinov2_vits14", "--weights", "random", *extra, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("spectral-jax dataset: error:"), r.stderr
    assert {"search": "--search", "weights": "--edge-weights", "min": "--min-recall"}[case.split("-")[0]] in r.stderr
    assert not (tmp_path / "out").exists()


def test_sharded_path_builds_cosine_edges_only():
    """`whole.solver_path`: the sharded path (cosine edges only) asked for with --edge-weights rbf is one InputError
    naming both flags and the fix, before any work; auto stays gathered for rbf."""
    from spectral_jax.dataset.layout import Geometry

    one = Geometry((((2, 2), (10, 11)),), (2, 2), (28, 28), 24, 64, 1, 3, 6)
    assert whole.solver_path(dataset.Settings(edge_weights="rbf"), one) == "gathered"
    with pytest.raises(dataset.InputError, match=r"--solver sharded: cannot run with --edge-weights rbf.* — pass "
                                                 r"--solver gathered"):
        whole.solver_path(dataset.Settings(edge_weights="rbf", exact_solver="sharded"), one)
    with pytest.raises(dataset.InputError, match=r"--edge-weights 'binary': unknown"):
        dataset.Settings(edge_weights="binary")


@pytest.mark.slow  # two processes; the store and in-memory σ are compared in one process above
@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_two_processes_give_the_one_process_rbf_graph(tmp_path, search):
    """Two processes on the gathered path (exact: each searches its own rows; ivf: each its share of the layers'
    graphs, on their gathered rows; σ drawn from the sharded features either way): the same σ, graph and
    eigenvectors as one process (whose graph comes from the store's search and `store_sigma`)."""
    from test_dataset import run_two_processes

    folder = make_folder(str(tmp_path / "imgs"), 12)
    out = str(tmp_path / "multi")
    run_two_processes(folder, out, f"**EXACT, edge_weights='rbf', exact_solver='gathered', search={search!r}",
                      head="from test_dataset_graph_weights import EXACT\n")
    single = dataset.run(folder, str(tmp_path / "single"), backbone=synthetic(),
                         **{**EXACT, "edge_weights": "rbf", "search": search})
    multi = dataset.load_result(out)
    s_multi = json.load(open(os.path.join(out, "summary.json")))["edge_weights"]["sigma"]
    for layer, v in single.summary()["edge_weights"]["sigma"].items():
        assert abs(s_multi[layer] - v) < 1e-6 * v
    with np.load(f"{out}/checkpoints/graph.npz") as m, np.load(tmp_path / "single" / "checkpoints" / "graph.npz") as s:
        np.testing.assert_array_equal(m["idx0"], s["idx0"])
        np.testing.assert_allclose(m["w0"], s["w0"], rtol=1e-6)
    np.testing.assert_allclose(np.abs(multi.eigvecs), np.abs(single.eigvecs), atol=1e-4)


def test_two_processes_search_approximately_and_give_the_one_process_graph(tmp_path, monkeypatch):
    """--search ivf with two processes: --solver auto takes the gathered path (--solver sharded runs the ring IVF
    instead, test_sharded_ivf; faiss there is one line), each process gathers all tokens of its share of the
    layers' graphs (graph j: process j mod 2), searches them and broadcasts them, so every process weighs the same graphs — the same approximate graph
    (recall under 1: 16 lists, one probed, the floor lowered to keep the first try), summary and eigenvectors as
    one process, whose graph comes from the store one layer at a time."""
    from spectral_jax.dataset.layout import Geometry
    from test_dataset import run_two_processes

    out = str(tmp_path / "multi")
    small = "from spectral_jax import knn_search\nknn_search.AUTO_CELL, knn_search.AUTO_NPROBE = 8, 1\n" + (
        # each process records the graphs it searches (whole._search_graph calls) and whose gathered features it
        # kept (whole._owned_features' keys) into OUT.searched{i}
        "import atexit\nfrom spectral_jax.dataset import whole as W\nsearched, kept = [], []\n"
        "search_graph, owned_features = W._search_graph, W._owned_features\n"
        "W._search_graph = lambda *a, **k: searched.append(1) or search_graph(*a, **k)\n"
        "W._owned_features = lambda *a, **k: kept.append(sorted(r := owned_features(*a, **k))) or r\n"
        f"atexit.register(lambda: json.dump([len(searched), kept], open({out!r} + "
        "f'.searched{jax.process_index()}', 'w')))\n")
    monkeypatch.setattr(knn_search, "AUTO_CELL", 8)
    monkeypatch.setattr(knn_search, "AUTO_NPROBE", 1)
    folder = make_folder(str(tmp_path / "imgs"), 12)
    run_two_processes(folder, out, "**EXACT, search='ivf', min_recall=0.05",
                      head="from test_dataset_graph_weights import EXACT\n" + small)
    single = dataset.run(folder, str(tmp_path / "single"), backbone=synthetic(), **EXACT, search="ivf",
                         min_recall=0.05)
    s_multi = json.load(open(os.path.join(out, "summary.json")))
    ks = single.summary()["knn_search"]
    assert ks["used"] == "ivf" and ks["recall_min"] < 1 and ks["nlist"] == 16, ks
    assert s_multi["exact_solver"]["path"] == "gathered" and s_multi["knn_search"] == ks
    with np.load(f"{out}/checkpoints/graph.npz") as m, np.load(tmp_path / "single" / "checkpoints" / "graph.npz") as s:
        for key in ("idx0", "w0"):
            np.testing.assert_array_equal(m[key], s[key])
        graphs = m["idx0"].shape[0]
    # the group's graphs were shared out (graph j: process j mod 2), not each searched by both processes, and each
    # process kept all rows of its own graphs only
    searched, kept = zip(*(json.load(open(f"{out}.searched{i}")) for i in range(2)))
    assert graphs >= 2 and list(searched) == [(graphs + 1) // 2, graphs // 2], (graphs, searched)
    assert [k[0] for k in kept] == [list(range(0, graphs, 2)), list(range(1, graphs, 2))], kept
    np.testing.assert_allclose(np.abs(dataset.load_result(out).eigvecs), np.abs(single.eigvecs), atol=1e-4)
    one = Geometry((((4, 4), (0, 1)),), (4, 4), (32, 32), 12, 16, 1, 5, 5)
    monkeypatch.setattr(whole.jax, "process_count", lambda: 2)
    assert whole.solver_path(dataset.Settings(search="ivf"), one) == "gathered"
    assert whole.solver_path(dataset.Settings(), one) == "sharded"
    assert whole.solver_path(dataset.Settings(search="ivf", exact_solver="sharded"), one) == "sharded"  # ring IVF
    with pytest.raises(dataset.InputError, match=r"--search faiss: does not run on the sharded path .* — pass "
                                                 r"--search ivf or auto, or --solver gathered"):
        whole.solver_path(dataset.Settings(search="faiss", exact_solver="sharded"), one)


def test_diffusion_timesteps_get_one_sigma_each_on_both_paths(tmp_path):
    """Diffusion taps (one graph per layer and timestep): σ per (layer, timestep) in the summary ("layer/t"), the
    same with the exact search and the ivf one (each graph's timestep columns read from the store); the timesteps'
    σ differ (each timestep's own heads)."""
    from test_dataset_diffusion import square_folder

    folder = square_folder(str(tmp_path / "imgs"), 3, 32)
    kw = dict(model="pixart_tiny", weights="random", size=32, batch_size=1, num_eigs=4, k_intra=3, k_inter=3,
              layers="0,2", figure_images=0, model_options={"timesteps": (10, 200)}, graph="knn-vv",
              edge_weights="rbf")
    store = dataset.run(folder, str(tmp_path / "store"), **kw).summary()["edge_weights"]["sigma"]
    memory = dataset.run(folder, str(tmp_path / "memory"), **{**kw, "search": "ivf"}).summary()
    assert set(store) == {"0/0", "0/1", "2/0", "2/1"} and store["0/0"] != store["0/1"]
    for key, v in store.items():
        assert abs(memory["edge_weights"]["sigma"][key] - v) < 1e-5 * v
    assert memory["knn_search"]["used"] == "ivf" and set(memory["knn_search"]["recall"]) == set(store)


def test_isolated_tokens_are_recorded_and_a_mostly_empty_graph_is_said(tmp_path, capsys):
    """summary.json's isolated: per graph the fraction of the read tokens with no edge (every cosine at or below
    --min-cos), checked against the cached graph's degrees; over half in a graph gives one stderr warning. (A v·v
    graph keeps each token's self-edge of cosine 1, so the emptied graph is a q·k one.)"""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    low = dataset.run(folder, str(tmp_path / "low"), backbone=synthetic(), **EXACT).summary()["isolated"]
    assert "no edge" not in capsys.readouterr().err
    high_out = str(tmp_path / "high")
    high = dataset.run(folder, high_out, backbone=synthetic(), **{**EXACT, "graph": "knn-qk", "min_cos": 0.8}
                   ).summary()["isolated"]                  # layer 1 left without an edge, layer 0 with 6 %
    err = capsys.readouterr().err
    with np.load(os.path.join(high_out, "checkpoints", "graph.npz")) as f:
        deg = f["deg0"]
    want = {str(layer): round(float((deg[layer] <= 0).mean()), 6) for layer in range(deg.shape[0])}
    assert high["fraction"] == want and high["max"] == max(want.values()) > 0.5
    assert low["max"] < 0.5 and set(low["fraction"]) == set(want)
    lines = [line for line in err.splitlines() if "no edge" in line]
    assert len(lines) == 1 and f"graph {high['graph']}" in lines[0] and "--min-cos 0.8" in lines[0]
    with pytest.raises(InputError, match="--min-cos 0.9: leaves no edge between two tokens in any graph"):     # both layers empty
        dataset.run(folder, str(tmp_path / "none"), backbone=synthetic(), **{**EXACT, "graph": "knn-qk",
                                                                               "min_cos": 0.9})


@pytest.mark.parametrize("rule", ["select", "eigengap", "uniform"])
def test_a_rule_that_weighs_an_early_layer_most_says_so_in_one_line(rule, capsys):
    """At dataset level the eigengap rules favour early layers (their kNN graphs have the largest gaps): where the
    largest weight lands in the first half of the tapped layers, `whole.layer_weights` prints one stderr line naming
    that layer; where it lands on a late layer (or for "uniform") nothing. Spectra injected: layer 1 of 0…3 has
    the largest gap, then layer 3."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3 * 6, 5)).astype(np.float32)
    g = graphs.knn(a, a, (2, 3), 3, k_intra=2, k_inter=2, search="exact")
    geom = SimpleNamespace(groups=[((2, 3), (0, 1, 2, 3))])
    flat = np.array([1.0, 0.9, 0.85, 0.8])
    for big, other in ((1, 3), (3, 1)):
        spec = np.tile(flat, (4, 1))
        spec[big] = [1.0, 0.9, 0.2, 0.1]                       # the largest gap
        spec[other] = [1.0, 0.9, 0.5, 0.4]
        _, chosen = whole.layer_weights([g], geom, S.LayerWeights.parse(rule), S.Settings(num_eigs=4),
                                        spectra=lambda *_, s=spec: s)
        err = capsys.readouterr().err.strip().splitlines()
        w = chosen["weights"]
        assert max(w, key=w.get) == (str(big) if rule != "uniform" else "0")
        if rule != "uniform" and big == 1:
            assert len(err) == 1 and f"--layer-weights {rule}" in err[0] and "on layer 1," in err[0], err
        else:
            assert err == [], err


@pytest.mark.slow      # two CLI runs (~10-30 s); CI keeps the property by test_default_layer_weights_per_method_...
def test_cli_default_layer_weights_is_geometric_and_a_run_made_before_resumes_uniform(tmp_path):
    """`spectral-jax dataset` without --layer-weights (a ViT, exact): the "geometric" rule, w ∝ 2^layer, recorded
    in the summary. A finished run made before the default changed (its summary.json records "uniform", as every
    run without --layer-weights did — simulated by rewriting the record over the same caches) resumes with equal
    weights, not the new default."""
    folder = make_folder(str(tmp_path / "imgs"), 3)
    out = tmp_path / "out"
    args = [folder, "--model", "dinov2_vits14", "--weights", "random", "--size", "28", "--batch-size", "2",
            "--num-eigs", "3", "--layers", "10,11", "--out", str(out)]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["layer_weights"] == {"rule": "geometric", "weights": {"10": 1 / 3, "11": 2 / 3}}
    s["layer_weights"] = {"rule": "uniform", "weights": {"10": 0.5, "11": 0.5}}       # what the old default wrote
    (out / "summary.json").write_text(json.dumps(s))
    r = _cli(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["layer_weights"] == {"rule": "uniform", "weights": {"10": 0.5, "11": 0.5}}
    assert "graph" in again["cached"]


def test_default_layer_weights_per_method_model_and_recorded_run(tmp_path, monkeypatch):
    """The settings `spectral-jax dataset` hands to `dataset.run` (its own parser and `run_dataset`, stopped at
    `dataset.run`): without --layer-weights, "geometric" for a ViT under exact; equal weights (None) for gd and a
    diffusion model; the main_cls recipe's own 32/res weights; a typed rule as typed. Under --resume: the finished
    run's record (`_default_layer_weights`) — a rule, "given" weights as pairs, "uniform" where its summary holds no
    record (made before layer weights were recorded) — and the default where no summary was written (never solved)
    or it is unreadable."""
    from types import SimpleNamespace

    from spectral_jax import dataset as D
    from spectral_jax.cli import build_parser
    from spectral_jax.cli.dataset import _default_layer_weights, run_dataset

    folder = make_folder(str(tmp_path / "imgs"), 1)
    out = tmp_path / "out"

    class Handed(Exception):
        pass

    def handed(*_, **kw):
        raise Handed(_[2])

    monkeypatch.setattr(D, "run", handed)

    def settings(*flags):
        with pytest.raises(Handed) as e:
            run_dataset(build_parser().parse_args(["dataset", folder, "--out", str(out), *flags]))
        return e.value.args[0].layer_weights

    vit = ["--model", "dinov2_vits14", "--weights", "random"]
    assert settings(*vit).rule == S.DEFAULT_LAYER_WEIGHTS == "geometric"
    assert settings(*vit, "--method", "gd") is None
    assert settings(*vit, "--layer-weights", "uniform").rule == "uniform"
    assert settings("--model", "sd_tiny", "--weights", "random") is None
    assert settings("--model", "sd_tiny", "--weights", "random", "--recipe", "main_cls").pairs is not None

    out.mkdir()
    ns = lambda method="exact", resume=False: SimpleNamespace(method=method, resume=resume, out=str(out))
    assert _default_layer_weights(ns(resume=True), False) == "geometric"               # no summary: never solved
    for record, want in (({"rule": "uniform", "weights": {"0": 0.5}}, "uniform"), ({"rule": "select"}, "select"),
                         ({"rule": "given", "weights": {"10": 0.25, "11": 0.75}}, "10:0.25,11:0.75"),
                         (None, "uniform"), ("absent", "uniform")):
        (out / "summary.json").write_text(json.dumps({} if record == "absent" else {"layer_weights": record}))
        assert _default_layer_weights(ns(resume=True), False) == want, record
        assert _default_layer_weights(ns(resume=False), False) == "geometric"
        assert _default_layer_weights(ns("gd", resume=True), False) is None
    (out / "summary.json").write_text("{not json")
    assert _default_layer_weights(ns(resume=True), False) == "geometric"
