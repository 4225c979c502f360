"""Smoke test of the benchmark code: the PyTorch re-implementation of the official loop runs, and its objective
evaluation agrees with `spectral_jax.objective.rayleigh`; the evaluation scripts' tiny modes run end to end — on a
generated labelled set in the benchmark data's layouts (everywhere) and on the real sets of ../shared/data (skipped
where absent) — so the benchmarks cannot silently rot."""

import json
import os

import numpy as np
import pytest
from sjtest import BENCH, SHAPE_CATEGORIES, bench_module, coco_like, horse_like, shared_data

torch = pytest.importorskip("torch")

_load = bench_module


@pytest.fixture(scope="module")
def qk():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 2, 64, 16), np.float32)        # 2 layers × 2 heads × 64 tokens (8×8)
    k = rng.standard_normal((2, 2, 64, 16), np.float32)
    return q, k


def test_official_loop_runs_and_objective_matches_spectral_jax(qk):
    from spectral_jax import graphs
    from spectral_jax.objective import rayleigh

    tof = _load("torch_official")
    q, k = qk
    r = tof.official_loop(q, k, (8, 8), num_eigs=20, passes=3, accum=1, seed=0, threads=1)
    assert r["updates"] == 3 and r["passes"] == 3
    assert np.all(np.isfinite(r["losses"]))
    assert r["vecs"].shape == (1, 20, 8, 8) and r["maps"].shape == (20, 8, 8)
    v = r["vecs"][0].reshape(20, -1)
    np.testing.assert_allclose(v @ v.T, np.eye(20), atol=1e-5)            # SVD output is orthonormal
    np.testing.assert_allclose(r["maps"].sum(0), 1.0, atol=1e-5)           # softmax over channels

    g = graphs.attention(q, k, (8, 8))
    rqs, obj = rayleigh([g], r["vecs"])
    np.testing.assert_allclose(float(obj), r["objective"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rqs[0]).reshape(4, 20), r["rq"], rtol=1e-4, atol=1e-6)

    # Same check on non-orthonormal, non-negative maps (the loss's own input), through the torch helpers.
    x = np.random.default_rng(1).random((20, 8, 8), np.float32)
    p = tof.attention_dense(q, k)
    np.testing.assert_allclose(p.numpy(), np.asarray(g.dense()).reshape(4, 64, 64), atol=1e-6)
    rq_t, obj_t = tof.rayleigh_torch(p, torch.as_tensor(x), (8, 8))
    rqs_j, obj_j = rayleigh([g], x[None])
    np.testing.assert_allclose(float(obj_t), float(obj_j), rtol=1e-5)
    np.testing.assert_allclose(rq_t.numpy(), np.asarray(rqs_j[0]).reshape(4, 20), rtol=1e-4, atol=1e-6)


def test_official_loss_matches_spectral_jax_paper_loss(qk):
    from spectral_jax import graphs
    from spectral_jax.objective import paper_loss

    tof = _load("torch_official")
    q, k = qk
    x = np.random.default_rng(2).random((20, 8, 8), np.float32)
    x /= x.sum(0, keepdims=True)
    lt = tof.paper_loss(tof.attention_dense(q, k), torch.as_tensor(x), (8, 8))
    lj = paper_loss([graphs.attention(q, k, (8, 8))], x[None])
    np.testing.assert_allclose(float(lt), float(lj), rtol=1e-5)


def test_bench_scripts_import():
    for name in ("_common", "bench_graphs", "bench_solvers", "bench_analyze", "bench_forward", "bench_unet",
                 "eval_foreground", "eval_where_what", "eval_joint", "eval_dataset", "eval_layers", "bench_dataset", "bench_kmeans", "eval_autok",
                 "bench_multiprocess_search", "knn_partition_curve",
                 "bench_sharded_search", "knn_floor"):
        _load(name)


def test_knn_floor_tiny(tmp_path):
    """knn_floor --tiny: every kernel timed (faiss's, where it is absent, said so; its IVF rows with their recall
    over the same lists), the seconds for --rows × each --candidates the measured ns per pair scaled; bad
    --candidates or a bad --features file (not an array, not [N, D], too few rows, a row not finite): one line,
    exit 2, nothing written."""
    kf = _load("knn_floor")
    out = tmp_path / "floor.md"
    kf.main(["--tiny", "--candidates", "100,400", "--rows", "1000", "--out", str(out)])
    rep = json.loads((tmp_path / "floor.json").read_text())
    names = [r["kernel"] for r in rep["kernels"]]
    assert names == ["xla-dot", "xla-topk", "xla-dot-bf16", "xla-topk-bf16", "list-scan", "numpy-gemm",
                     "faiss-flat", "faiss-ivf", "faiss-pq4fs", "faiss-sq8", "assign"]
    for r in rep["kernels"]:
        if "note" in r:
            assert r["kernel"].startswith("faiss") and "faiss is not installed" in r["note"]
        else:
            assert r["seconds"] > 0 and r["pairs"] > 0
            assert r["ns_pair"] == pytest.approx(r["seconds"] / r["pairs"] * 1e9)
    ivf = {r["kernel"]: r for r in rep["kernels"] if r["kernel"].startswith("faiss-") and "note" not in r}
    if "faiss-ivf" in ivf:          # the same lists: compressed codes re-ranked find no more than the flat codes
        flat = ivf["faiss-ivf"]["recall"]
        assert 0 < flat <= 1 and "recall_rerank" not in ivf["faiss-ivf"]
        for name in ("faiss-pq4fs", "faiss-sq8"):
            r = ivf[name]
            assert 0 <= r["recall"] <= r["recall_rerank"] + 1e-9 and r["recall_rerank"] <= flat + 1e-9
            assert r["pairs"] == ivf["faiss-ivf"]["pairs"]
    hnsw = rep["hnsw"]                  # --tiny measures the HNSW index too (M 8, efConstruction 16, efSearch 16, 64)
    if "note" in hnsw:
        assert "faiss is not installed" in hnsw["note"]
    else:
        assert (hnsw["m"], hnsw["ef_construction"], hnsw["build_s"] > 0) == (8, 16, True)
        assert [t["ef_search"] for t in hnsw["tries"]] == [16, 64]
        assert all(0 < t["recall"] <= 1 and t["s_per_row"] > 0 and t["rows_timed"] == 128 for t in hnsw["tries"])
        assert "faiss's HNSW graph index" in out.read_text()
    md = out.read_text()
    dot = rep["kernels"][0]
    row = f"| xla-dot | {dot['ns_pair']:.2f} | {dot['seconds']:.2f} | — | {1000 * 100 * dot['ns_pair'] * 1e-9:.1f} |"
    assert row in md, md
    with pytest.raises(SystemExit) as e:
        kf.main(["--tiny", "--candidates", "many", "--out", str(tmp_path / "bad.md")])
    assert e.value.code == 2 and not (tmp_path / "bad.md").exists()
    for hnsw in (["--hnsw", "16"], ["--hnsw", "16:0"], ["--hnsw", "16:40", "--hnsw-ef", "32,x"]):
        with pytest.raises(SystemExit) as e:
            kf.main(["--tiny", *hnsw, "--out", str(tmp_path / "bad.md")])
        assert e.value.code == 2 and not (tmp_path / "bad.md").exists(), hnsw
    feats = tmp_path / "feats.npy"                                # --out onto --features: refused, the input kept
    np.save(feats, np.ones((8, 2), np.float32))
    with pytest.raises(SystemExit) as e:
        kf.main(["--features", str(feats), "--out", str(feats)])
    assert e.value.code == 2 and np.load(feats).shape == (8, 2)
    bad = {"cube.npy": np.ones((4, 4, 4), np.float32), "few.npy": np.ones((100, 8), np.float32),
           "nan.npy": np.ones((512, 8), np.float32), "text.npy": None}
    bad["nan.npy"][300, 2] = np.nan
    for name, arr in bad.items():           # a bad feature file: one line naming it, exit 2, no report
        path, out = tmp_path / name, tmp_path / f"{name}.md"
        if arr is None:
            path.write_text("not an array")
        else:
            np.save(path, arr)
        with pytest.raises(SystemExit) as e:
            kf.main(["--features", str(path), "--per", "64", "--width", "128", "--out", str(out)])
        assert e.value.code == 2 and not out.exists() and not out.with_suffix(".json").exists(), name


def test_eval_joint_labels_and_probes():
    """eval_joint: COCO polygons → supercategory per patch; the probes separate content features from position."""
    ej = _load("eval_joint")
    coco = {"categories": [{"id": 1, "name": "person", "supercategory": "person"},
                           {"id": 18, "name": "dog", "supercategory": "animal"}],
            "images": [{"id": 7, "file_name": "a.jpg", "height": 56, "width": 112}],
            "annotations": [{"image_id": 7, "category_id": 18, "area": 1.0, "iscrowd": 0,
                             "segmentation": [[0, 0, 56, 0, 56, 56, 0, 56]]}]}   # the left half of the image
    lab, supers = ej.supercategory_labels(coco, ["sub/a.jpg"], 56, 14)      # squashed to 56×56: a 4×4 grid
    assert supers == ["animal", "person"] and lab.shape == (1, 4, 4)
    np.testing.assert_array_equal(lab[0], np.array([[1, 1, 0, 0]] * 4))

    rng = np.random.default_rng(0)
    n, h, w = 12, 6, 6
    labels = np.zeros((n, h * w), np.int64)
    for i in range(n):                                      # one object per image, its class alternating, placed randomly
        cells = rng.choice(h * w, 12, replace=False)
        labels[i, cells] = 1 + (i // 2) % 2
    coords = np.stack(np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij"), -1)
    coords = coords.reshape(-1, 2)
    content = np.eye(3)[labels] + 0.05 * rng.standard_normal((n, h * w, 3))
    position = np.broadcast_to(np.concatenate([coords, coords ** 2, coords[:, :1] * coords[:, 1:]], 1),
                               (n, h * w, 5)) + 0.01 * rng.standard_normal((n, h * w, 5))
    train, test = np.arange(0, n, 2), np.arange(1, n, 2)   # both classes on both sides
    c = ej.probes(content, labels, coords, train, test, 1e-3, 0)
    p = ej.probes(position, labels, coords, train, test, 1e-3, 0)
    assert c["obj_bal"] > 0.95 and c["what"] > 0.95 and c["where"] < 0.2
    assert p["where"] > 0.95 and p["obj_bal"] < 0.7 and p["what"] < 0.7
    assert c["clusters"] > p["clusters"]


def test_bench_dataset_tiny():
    """bench_dataset --tiny: the plain numpy/scipy script finds our optimum, the score tells a converged result
    (1) from a perturbed one, and the synthetic scale points solve."""
    bd = _load("bench_dataset")
    rep = bd.run_tiny()
    p = rep["plain"][0]
    assert p["plain_fraction"] > 0.99999 and abs(p["plain_sum"] - p["ours_sum"]) < 1e-4 * p["optimum_sum"]
    assert rep["fraction_exact"] > 0.99999 and rep["fraction_noisy"] < 0.9
    assert [s["n"] for s in rep["scale"]] == [2000, 8000] and all(s["converged"] for s in rep["scale"])
    assert "| random | 8 |" in "\n".join(bd.tables(rep))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A generated labelled set in the benchmark data's layouts (`sjtest.coco_like`, `sjtest.horse_like`): the
    folders {"coco-mini": …, "horse-dev": …} and the COCO-format set's ground truth {file name: `[H, W]` ids}."""
    root = tmp_path_factory.mktemp("generated-data")
    truth = coco_like(root / "coco-mini", _load("eval_where_what").ANN, n=6)
    horse_like(root / "horse-dev", n=2)
    return {"coco-mini": str(root / "coco-mini"), "horse-dev": str(root / "horse-dev")}, truth


# Each tiny run twice: on the generated set (runs everywhere) and on the real sets of ../shared/data (skips, saying
# so, where they are absent: a clone of the project alone) — the skip in the test itself, not in a fixture, so that
# CI's SPECTRAL_JAX_REQUIRE_ALL=1 reports it as the test's failure.
ON_BOTH = pytest.mark.parametrize("source", ["generated", "shared"])


def _data(source, generated):
    """The data folders a tiny run reads: {"coco-mini": …, "horse-dev": …, "truth": the generated COCO-format set's
    ground truth, or None for the real sets}."""
    if source == "generated":
        return {**generated[0], "truth": generated[1]}
    return {**{name: shared_data(name) for name in ("coco-mini", "horse-dev")}, "truth": None}


def test_eval_dataset_metric():
    """eval_dataset: the whole-dataset Hungarian scores on a known confusion (a spare cluster counts as wrong), the
    confusion of upsampled segments."""
    ed = _load("eval_dataset")
    sc = ed.hungarian_scores(np.array([[5, 0], [0, 3], [1, 1]]))          # 3 clusters, 2 classes
    assert sc["matching"] == {0: 0, 1: 1} and sc["clusters"] == 3
    np.testing.assert_allclose(sc["per_class_iou"], [5 / 6, 3 / 4])
    assert sc["miou"] == pytest.approx((5 / 6 + 3 / 4) / 2) and sc["pixel_acc"] == pytest.approx(0.8)
    conf = ed.confusion(np.array([[[0, 1]]]), [np.array([[0, 0, 2, 2]])], 3, np.array([0, 1, 1]))
    np.testing.assert_array_equal(conf, [[2, 0, 0], [0, 2, 0]])          # [1, 2] grid → 4 pixels; class 2 → 1


@ON_BOTH
def test_eval_dataset_tiny_run(tmp_path, source, generated):
    """eval_dataset --tiny end to end through the script (6 images of --data, random weights): every source and
    setting scored, the layer-weight rules run; on the generated set, the ground-truth pixels it counts per class
    are the ones the generator painted."""
    import json
    import subprocess
    import sys

    data = _data(source, generated)
    out = tmp_path / "eval.md"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "eval_dataset.py"), "--tiny", "--data", data["coco-mini"],
                        "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "eval.json").read_text())
    rows = {(s["source"], s["labels"], s["setting"]): s for s in rep["segmentation"]}
    assert rep["sources"] == ["knn-vv", "knn-qk", "last-layer", "knn-vv eigengap", "knn-vv select",
                              "knn-qk eigengap", "knn-qk select"]
    assert len(rows) == 4 * len(rep["sources"]) and rep["images"] == 6
    for src in rep["sources"][3:]:                               # the rule runs: weights per layer, summing to 1
        lw = rep["runs"][src]["layer_weights"]
        assert lw["rule"] == src.split()[1] and abs(sum(lw["weights"].values()) - 1) < 1e-4
    for (src, labels, setting), s in rows.items():
        assert 0 <= s["miou"] <= 1 and 0 <= s["pixel_acc"] <= 1
        if setting == "k = classes":
            assert s["k"] == s["clusters"] == len(s["per_class_iou"])
    text = out.read_text()
    assert "| supercategory | k = classes | knn-vv |" in text
    assert f"({len(rep['supercategories']) + 1} for supercategories" in text
    if data["truth"] is not None:
        truth = np.stack(list(data["truth"].values()))       # [6, H, W] category ids, 0 background
        cats = {c["id"]: c for c in SHAPE_CATEGORIES}
        present = sorted(set(np.unique(truth)) - {0})
        assert rep["categories"] == [cats[c]["name"] for c in present]
        assert rep["supercategories"] == sorted({c["supercategory"] for c in SHAPE_CATEGORIES})
        to_super = {0: 0, **{c: rep["supercategories"].index(cats[c]["supercategory"]) + 1 for c in cats}}
        want_cat = [int((truth == c).sum()) for c in [0] + present]
        want_super = np.bincount(np.vectorize(to_super.get)(truth).ravel(), minlength=len(rep["supercategories"]) + 1)
        for src in rep["sources"]:
            assert rows[src, "category", "k = classes"]["gt_pixels"] == want_cat
            assert rows[src, "supercategory", "auto"]["gt_pixels"] == want_super.tolist()


def test_eval_dataset_tiny_diffusion(tmp_path, generated):
    """eval_dataset --tiny on a diffusion UNet (sd_tiny, random weights) with the official recipe and one timestep,
    end to end through the script on the generated set: both graphs scored in every setting with numbers in range,
    the recipe's layers and 32/res weights and the timestep recorded, the probes in range, and the last-layer source
    skipped with its reason written in the report (the family's taps carry no hidden states)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "eval.md"
    r = subprocess.run([sys.executable, os.path.join(BENCH, "eval_dataset.py"), "--tiny", "--model", "sd_tiny",
                        "--recipe", "main_cls", "--timesteps", "100", "--layer-weights", "--data",
                        generated[0]["coco-mini"], "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", SPECTRAL_JAX_TEST_MODELS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "eval.json").read_text())
    assert rep["sources"] == ["knn-vv", "knn-qk"] and rep["images"] == 6
    assert "no hidden states" in rep["skipped"]["last-layer"]
    b = rep["backbone"]
    assert b["timesteps"] == [100] and b["recipe"] == "main_cls" and b["layers"] == "6,7,8,9,10,11,12"
    w = {int(k): v for k, v in b["layer_weights"]["weights"].items()}
    assert w[6] == pytest.approx(2 * w[7]) and w[7] == pytest.approx(2 * w[10])     # 32/res: 8×8 : 16² : 32²
    rows = {(s["source"], s["labels"], s["setting"]): s for s in rep["segmentation"]}
    assert len(rows) == 2 * 2 * 2
    for (src, labels, setting), s in rows.items():
        assert 0 <= s["miou"] <= 1 and 0 < s["pixel_acc"] <= 1 and s["clusters"] >= 2
        if setting == "k = classes":
            assert s["k"] == s["clusters"] == len(s["per_class_iou"])
    for src in ("knn-vv", "knn-qk", "dct"):
        p = rep["probes"][src]
        assert np.isfinite(p["where"][0]) and p["where"][0] <= 1       # held-out R²: ≤ 1, below 0 when worse than the mean
        assert 0 <= p["obj_bal"][0] <= 1 and 0 <= p["what"][0] <= 1
    for src in ("knn-vv", "knn-qk"):
        run = rep["runs"][src]
        assert run["convergence"]["converged"] and len(run["eigvals"]) == 4
        ev = np.asarray(run["eigvals"])                # the table-grid problem's top: ≈ 1 (the constant), then below
        assert np.all(np.isfinite(ev)) and np.all(np.diff(ev) <= 1e-6) and 0.9 < ev[0] < 1.1 and ev[-1] > 0
        assert all(0 <= v <= 1 for v in rep["position_share"][src])
    text = out.read_text()
    assert "| supercategory | k = classes | knn-vv |" in text and "last-layer not run: sd_tiny" in text
    assert "Timesteps [100]" in text and "recipe `main_cls`" in text


def test_eval_dataset_refuses_a_flag_the_model_does_not_take(tmp_path, generated):
    """eval_dataset: --timesteps for a ViT and --recipe main_cls for a DiT are one line each (exit, the flag named),
    before any model loads or anything is written under --work."""
    import subprocess
    import sys

    for extra, named in ((["--timesteps", "10"], "--timesteps"), (["--model", "pixart_tiny", "--recipe", "main_cls"],
                                                                   "--recipe main_cls")):
        work = tmp_path / "work"
        r = subprocess.run([sys.executable, os.path.join(BENCH, "eval_dataset.py"), "--tiny", *extra, "--data",
                            generated[0]["coco-mini"], "--work", str(work), "--out", str(tmp_path / "x.md")],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, JAX_PLATFORMS="cpu", SPECTRAL_JAX_TEST_MODELS="1"))
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and named in lines[0], r.stderr[-2000:]
        assert not work.exists() and not (tmp_path / "x.md").exists()


@ON_BOTH
def test_eval_layers_tiny(tmp_path, source, generated):
    """eval_layers --tiny: every single layer, uniform and each rule scored on one horse-dev-like and one
    coco-mini-like image of the given folders (random weights, 56×56, layers 0, 5, 11), the Markdown and the JSON
    written."""
    import json

    data = _data(source, generated)
    el = _load("eval_layers")
    out = tmp_path / "layers.md"
    el.main(["--tiny", "--horse-data", data["horse-dev"], "--coco-data", data["coco-mini"], "--out", str(out)])
    blob = json.load(open(tmp_path / "layers.json"))
    for name, metrics in (("horse-dev", {"iou", "where"}), ("coco-mini", {"where", "what"})):
        for graph in ("qk", "vv"):
            s = blob["summary"][name][graph]
            assert set(s["means"]) == {"L0", "L5", "L11", "uniform", "eigengap", "select"}
            assert set(s["means"]["uniform"]) == metrics
            assert abs(sum(blob["images"][name][0][graph]["weights"]["eigengap"]) - 1) < 1e-9
            for scores in s["means"].values():
                assert all(0 <= v <= 1 for m, v in scores.items() if m != "where")
    assert "### coco-mini, VV" in out.read_text()
    out.write_text("")
    el.main(["--report-only", "--out", str(out)])                 # the Markdown again, from the JSON alone
    assert "best single layer" in out.read_text() and "### horse-dev, QK" in out.read_text()


def test_eval_bf16_metrics():
    """eval_bf16's helpers: matching accuracy is label-permutation free and counts a spare segment as wrong; the
    noise control has the asked relative size on the fields it is given only; bfloat16 rounding is ≤ 2⁻⁸ relative."""
    import jax.numpy as jnp

    from spectral_jax.taps import LayerTap, Taps

    eb = _load("eval_bf16")
    ref = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    assert eb.agreement((ref + 1) % 3, ref) == 1.0                       # relabelled: the same segments
    split = ref.copy()
    split[0, 0] = 3                                                      # a fourth segment: its token is wrong
    assert eb.agreement(split, ref) == pytest.approx(11 / 12)

    rng = np.random.default_rng(0)
    t = lambda: jnp.asarray(rng.standard_normal((1, 2, 16, 8)), jnp.float32)
    taps = Taps({0: LayerTap(t(), t(), t(), (4, 4)), 3: LayerTap(t(), t(), t(), (4, 4))})
    noisy = eb.noisy_taps(taps, ("q", "k"), 0.01, np.random.default_rng(1))
    assert eb.rel_change(noisy, taps, ("q", "k")) == pytest.approx(0.01, rel=0.15)
    assert eb.rel_change(noisy, taps, ("v",)) == 0.0
    rounded = eb.round_taps(taps, ("v",))
    assert 0 < eb.rel_change(rounded, taps, ("v",)) < 2 ** -8 and eb.rel_change(rounded, taps, ("q", "k")) == 0.0


@pytest.mark.slow  # a benchmark's smoke run (~26 s each); bf16 features themselves are tests/test_bf16.py
@ON_BOTH
def test_eval_bf16_tiny(tmp_path, source, generated):
    """eval_bf16 --tiny end to end (random weights, the first 2 images of the given coco-mini-like folder at 56²):
    every option and control has its rows, the k-means-seed control leaves the eigenvectors exactly as they are,
    and the JSON holds the per-image numbers."""
    import json

    data = _data(source, generated)
    eb = _load("eval_bf16")
    out = tmp_path / "bf16.md"
    eb.main(["--tiny", "--data", data["coco-mini"], "--out", str(out)])
    blob = json.loads((tmp_path / "bf16.json").read_text())
    for graph in ("qk", "vv"):
        per = blob["per_image"][graph]
        assert set(per) == {"forward bf16", "graphs bf16", "both", *eb.CONTROLS}
        for recs in per.values():
            assert len(recs) == 2
            for r in recs:
                for e in eb.EMBEDDINGS:
                    assert 0 <= r[e]["seg_auto"] <= 1 and 0 <= r[e]["seg_fixed"] <= 1 and r[e]["same_k"] in (0, 1)
        assert all(r["eig_err"] == 0 and r["tap_change"] == 0 for r in per["fp32, k-means seed+1"])
        for r, like in zip(per["fp32 noise ≈ forward bf16"], per["forward bf16"]):
            assert r["tap_change"] == pytest.approx(like["tap_change"], rel=0.2) and r["tap_change"] > 0
    text = out.read_text()
    assert "| vv | *fp32 noise ≈ graphs bf16* |" in text and "segments at fp32's k" in text


def test_eval_tiny_runs_without_their_data_say_where_it_goes(tmp_path, monkeypatch):
    """A data folder that is not there (a clone without ../shared/data, run without --data): each evaluation script
    stops with one line naming the folder and the option to pass, before loading a model or writing anything."""
    absent = str(tmp_path / "absent")
    out = str(tmp_path / "out" / "x.md")
    monkeypatch.setattr("sys.argv", ["eval_dataset.py", "--tiny", "--data", absent, "--work", str(tmp_path / "w"),
                                     "--out", out])
    runs = [("--data", _load("eval_dataset").main),
            ("--data", lambda: _load("eval_bf16").main(["--tiny", "--data", absent, "--out", out])),
            ("--horse-data", lambda: _load("eval_layers").main(["--tiny", "--horse-data", absent, "--out", out])),
            ("--coco-data", lambda: _load("eval_layers").main(["--tiny", "--horse-data", str(tmp_path),
                                                               "--coco-data", absent, "--out", out]))]
    for flag, run in runs:
        with pytest.raises(SystemExit) as e:
            run()
        message = str(e.value.code)
        assert "\n" not in message and os.path.normpath(absent) in message, message
        assert message.endswith(f"pass {flag}"), message
    assert sorted(os.listdir(tmp_path)) == []


def test_knn_partition_curve_runs_and_refuses_bad_input(tmp_path, capsys):
    """knn_partition_curve: a small planted run prints recall @ candidates for every probe, P = nlist reaching
    recall 1; a bad --data, --nlist or --two-level is one line and exit 2 before any work."""
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (optional extra `bench`)")
    pc = _load("knn_partition_curve")
    pc.main(["--data", "uniform:2000", "--per", "100", "--nlist", "16", "--iters", "2", "--sub", "2"])
    out = capsys.readouterr().out
    for probe in ("row", "list", "spill2", "sub2"):
        line = next(x for x in out.splitlines() if x.strip().startswith(probe + " "))
        assert "P16 1.000 @ 2000" in line or probe == "spill2", line
    bad = tmp_path / "bad.npy"
    bad.write_text("not an array")
    small = tmp_path / "small.npy"
    np.save(small, np.ones((10, 4), np.float32))
    bads = (["--data", str(bad)], ["--data", str(small)], ["--data", "uniform:10"], ["--data", "grid:5000"],
            ["--data", "uniform:2000", "--nlist", "x"],
            ["--data", "uniform:2000", "--nlist", "64", "--two-level", "48"])
    for argv in bads:
        with pytest.raises(SystemExit) as e:
            pc.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and "error:" in err[-1], argv
