"""What a dataset resume compares and what it leaves behind:

1. the fingerprint holds the timesteps as resolved (a diffusion model's default drawn from the seed), not the
   model_options they came from: `--timesteps` set to exactly the timesteps a run drew resumes it (its caches
   read back); other timesteps are refused in one line naming them; records written before (model_options'
   timesteps beside the resolved ones) still resume;
2. a graph cache (graph.npz, graph-rows, a part of the search) made with other graph settings only — the features
   still valid — is refused with a fix that names the cache to delete, and deleting it reuses the features; where
   the features differ too, the fix does not say so;
3. parts of a search by another process count or path are removed once the run keeps its graph whole, and nothing
   of this run's other processes is (`store.release_parts`);
4. a dataset result's provenance records the graph options (as `GraphSpec.reads` names them) and how the graph was
   built (`Provenance.graph_record`), through RESULT.npz; attribution compares them.

The synthetic backbone and the EXACT settings of test_dataset / test_dataset_exact; pixart_tiny (random weights,
32², two layers) for the timesteps.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import dataset
from spectral_jax.dataset import checkpoint, store, whole
from spectral_jax.errors import InputError
from test_dataset import make_folder, synthetic
from test_dataset_diffusion import square_folder
from test_dataset_exact import EXACT

PIXART = dict(model="pixart_tiny", weights="random", size=32, layers="0,2", graph="knn-vv", num_eigs=3, k_intra=3,
              k_inter=3, figure_images=0, method="exact")


def _one_device():
    return dataset.make_mesh(jax.devices()[:1])


# ------------------------------------------------------------------------------------------ 1. resolved timesteps


def test_resume_given_the_timesteps_the_run_drew_reads_its_caches_and_other_timesteps_are_refused(tmp_path):
    folder = square_folder(str(tmp_path / "imgs"), 3, 32)
    out = str(tmp_path / "out")
    first = dataset.run(folder, out, **PIXART)                     # no timesteps: drawn from the seed
    drawn = first.summary()["timesteps"]
    assert len(drawn) == 4 and first.summary()["model_options"] == {}
    again = dataset.run(folder, out, resume=True, **{**PIXART, "model_options": {"timesteps": drawn}})
    assert again.summary()["cached"] == ["graph"] and again.summary()["timesteps"] == drawn
    np.testing.assert_array_equal(again.eigvals, first.eigvals)
    (tmp_path / "out" / "checkpoints" / "graph.npz").unlink()      # the features' key compares them too
    third = dataset.run(folder, out, resume=True, **{**PIXART, "model_options": {"timesteps": drawn}})
    assert third.summary()["cached"] == ["features"] and third.summary()["images_cached"] == 3
    np.testing.assert_allclose(third.eigvals, first.eigvals, rtol=1e-5, atol=1e-7)
    other = [*drawn[:-1], drawn[-1] + 1]
    with pytest.raises(InputError) as e:
        dataset.run(folder, out, resume=True, **{**PIXART, "model_options": {"timesteps": other}})
    msg = str(e.value)
    assert "\n" not in msg and f"other settings: timesteps {drawn} → {other}" in msg and "model_options" not in msg
    assert "delete" not in msg                                     # the features differ: no graph-only fix
    # the run given its timesteps resumes without them (it drew the same) — either way round
    out2 = str(tmp_path / "out2")
    dataset.run(folder, out2, **{**PIXART, "model_options": {"timesteps": drawn}})
    assert dataset.run(folder, out2, resume=True, **PIXART).summary()["cached"] == ["graph"]


def test_gd_resumed_with_its_drawn_timesteps_given_continues_the_uninterrupted_run(tmp_path):
    """The gd checkpoint's fingerprint: one epoch with the timesteps drawn, resumed for a second with --timesteps
    those values, ends at the table of two epochs run at once."""
    folder = square_folder(str(tmp_path / "imgs"), 4, 32)
    gd = {**PIXART, "method": "gd", "batch_size": 2, "checkpoint_every": 1}
    with pytest.warns(RuntimeWarning, match="not converged"):
        whole_run = dataset.run(folder, str(tmp_path / "whole"), epochs=2, **gd)
        half = dataset.run(folder, str(tmp_path / "half"), epochs=1, **gd)
        drawn = half.summary()["timesteps"]
        done = dataset.run(folder, str(tmp_path / "half"), epochs=2, resume=True,
                           **{**gd, "model_options": {"timesteps": drawn}})
    assert done.summary()["resumed_from"] == 2 and done.summary()["steps"] == 4
    np.testing.assert_array_equal(done.table, whole_run.table)


def test_fingerprints_compare_the_resolved_timesteps(tmp_path):
    """The gd checkpoint's check (`check_resumable`) on fingerprints alone, and records written before the
    fingerprint left model_options' timesteps out: given or drawn, the same resolved timesteps are one run."""
    from types import SimpleNamespace

    from spectral_jax.dataset.settings import Settings

    bb = SimpleNamespace(name="pixart_tiny", weights="random", timesteps=(17, 3, 250, 40))
    geom = SimpleNamespace(size=(32, 32), base=(4, 4), rows=16, k_intra=3, k_inter=3)   # base: the lr default
    drawn = Settings(model="pixart_tiny", method="gd")
    given = drawn.replace(model_options={"timesteps": (17, 3, 250, 40)})
    fp_drawn = checkpoint.fingerprint(bb, "0,2", drawn, geom, {"a.png": "00"})
    fp_given = checkpoint.fingerprint(bb, "0,2", given, geom, {"a.png": "00"})
    assert fp_drawn == fp_given and fp_given["timesteps"] == [17, 3, 250, 40]
    assert fp_given["model_options"] == {}
    out = str(tmp_path)
    meta = {"config": fp_drawn}
    checkpoint.check_resumable(out, fp_given, meta)
    old = {**fp_given, "model_options": {"timesteps": [17, 3, 250, 40]}}     # as written before
    checkpoint.check_resumable(out, fp_drawn, {"config": old})
    checkpoint.check_same(out, old, fp_given)
    moved = checkpoint.fingerprint(SimpleNamespace(**{**vars(bb), "timesteps": (17, 3, 250, 41)}), "0,2", given,
                                   geom, {"a.png": "00"})
    with pytest.raises(InputError, match=r"other settings: timesteps \[17, 3, 250, 40\] → \[17, 3, 250, 41\] —"):
        checkpoint.check_resumable(out, moved, {"config": old})
    # a model without timesteps: [] on both sides, model_options untouched
    vit = checkpoint.fingerprint(SimpleNamespace(name="m", weights=None), "all", Settings(), geom, {})
    assert vit["timesteps"] == [] and vit["model_options"] == {}


# ------------------------------------------------------------------------------------------ 2. graph-only hint


def test_a_graph_made_with_other_graph_settings_names_the_cache_to_delete(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 6)
    out = str(tmp_path / "out")
    kw = dict(backbone=synthetic(), mesh=_one_device(), **EXACT)
    first = dataset.run(folder, out, **kw)
    graph = os.path.join(out, "checkpoints", "graph.npz")
    for change, field in (({"min_cos": 0.2}, "min_cos 0.1 → 0.2"),
                          ({"k_inter": 4}, "k_inter_effective 5 → 4"),
                          ({"edge_weights": "rbf"}, "edge_weights 'cosine' → 'rbf'")):
        with pytest.raises(InputError) as e:
            dataset.run(folder, out, resume=True, **{**kw, **change})
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{out}: was made with other settings: {field}"), msg
        assert "the graph's only" in msg and f"delete {graph} to build the graph again from the cached " \
               "features" in msg, msg
    for change in ({"features_dtype": "bfloat16"}, {"graph": "knn-vv", "min_cos": 0.2}):   # the features differ
        with pytest.raises(InputError) as e:
            dataset.run(folder, out, resume=True, **{**kw, **change})
        assert "delete" not in str(e.value) and "resume with the same folder and settings" in str(e.value)
    os.remove(graph)                                                # the fix: the features are read back
    again = dataset.run(folder, out, resume=True, **{**kw, "min_cos": 0.2})
    assert again.summary()["cached"] == ["features"] and again.summary()["images_cached"] == 6
    assert again.summary()["min_cos"] == 0.2 and first.summary()["min_cos"] == 0.1


def test_parts_and_rows_of_other_graph_settings_name_their_folder(tmp_path):
    """A part of a search (graph-parts) and a process's rows (graph-rows) made with other graph settings: the fix
    names the folder; other features: the plain fix."""
    ck = str(tmp_path / "out" / "checkpoints")
    fp = {"model": "m", "weights": None, "layers": "all", "size": [32, 32], "files": {"a.png": "00"},
          "num_images": 1, "graph": "knn-qk", "features_dtype": "float32", "k_intra_effective": 5,
          "k_inter_effective": 5, "min_cos": 0.1, "block": 512, "edge_weights": "cosine", "search": "auto",
          "min_recall": None, "seed": 0, "timesteps": [], "model_options": {}}
    key = {**whole.cache_key("graph", fp), "nodes": 4}
    arrays = {"idx": np.zeros((4, 2), np.int32), "w": np.zeros((4, 2), np.float32)}
    expect = {"idx": ("int32", (4, 2)), "w": ("float32", (4, 2))}
    store.write_part(ck, "g0-l0", key, arrays)
    assert store.read_part(ck, "g0-l0", key, str(tmp_path / "out"), expect) is not None
    with pytest.raises(InputError, match=f"min_cos 0.1 → 0.3 \\(the graph's only.* — delete "
                                         f"{os.path.join(ck, store.PARTS)} to build the graph again"):
        store.read_part(ck, "g0-l0", {**key, "min_cos": 0.3}, str(tmp_path / "out"), expect)
    with pytest.raises(InputError) as e:
        store.read_part(ck, "g0-l0", {**key, "size": [64, 64]}, str(tmp_path / "out"), expect)
    assert "delete" not in str(e.value)
    # a process's rows of the sharded path: load_cache names OUT and the graph-rows folder
    rows = os.path.join(ck, whole.GRAPH_ROWS, "rows-0-of-1.npz")
    os.makedirs(os.path.dirname(rows))
    np.savez(rows, key=np.array(json.dumps({**key, "processes": 1, "process": 0}, sort_keys=True)))
    with pytest.raises(InputError) as e:
        whole.load_cache(rows, {**key, "min_cos": 0.3, "processes": 1, "process": 0}, None,
                         stale=os.path.join(ck, whole.GRAPH_ROWS))
    assert str(e.value).startswith(f"{tmp_path / 'out'}: was made with other settings: min_cos 0.1 → 0.3")
    assert f"delete {os.path.join(ck, whole.GRAPH_ROWS)} to build" in str(e.value)


# ------------------------------------------------------------------------------------------ 3. stale parts


def _plant(root: str, names) -> None:
    for n in names:
        os.makedirs(os.path.join(root, n))
        open(os.path.join(root, n, "meta.json"), "w").write("{}")


def test_release_parts_removes_what_no_process_of_the_run_reads_and_nothing_else(tmp_path):
    ck = str(tmp_path / "checkpoints")
    root = os.path.join(ck, store.PARTS)
    current = ["g0-l0-p0-of-2", "g0-l1-p0-of-2", "g0-l0-p1-of-2", "g0-l1-p1-of-2"]
    stale = ["g0-l0-p0-of-4", "g0-l0-p3-of-4", "g0-l0-p0-of-1", "g0-l0", "g1-l2-t1", ".tmp-p2-ab", ".tmp-p3-cd"]
    _plant(root, current + stale + [".tmp-p0-killed", ".tmp-p1-writing", ".tmp-p10-x"])
    os.makedirs(store.folder(ck))                              # the features: never touched
    store.release_parts(ck, 1, 2)                              # process 1: its own only
    assert sorted(os.listdir(root)) == sorted(["g0-l0-p0-of-2", "g0-l1-p0-of-2", *stale, ".tmp-p0-killed",
                                               ".tmp-p10-x"])
    _plant(root, ["g0-l0-p1-of-2", ".tmp-p1-writing"])         # process 1 still at work when process 0 releases
    store.release_parts(ck, 0, 2)
    assert sorted(os.listdir(root)) == [".tmp-p1-writing", "g0-l0-p1-of-2"]
    store.release_parts(ck, 1, 2)                              # the last one out removes the folder
    assert not os.path.exists(root) and os.path.isdir(store.folder(ck))
    store.release_parts(ck, 0, 2)                              # no folder: nothing to do


def test_sharded_run_removes_the_parts_another_process_count_left(tmp_path):
    """One process on the sharded path, resumed over the parts a killed run of 2 processes and a killed
    one-process search left (planted: their names are what those runs write): once its rows are kept, the parts
    folder is gone; the features and the rows stay; the eigenvectors are the fresh run's. The gathered path reading
    graph.npz back drops leftover parts too."""
    folder = make_folder(str(tmp_path / "imgs"), 6)
    out = str(tmp_path / "out")
    kw = dict(backbone=synthetic(), mesh=_one_device(), exact_solver="sharded", **EXACT)
    first = dataset.run(folder, out, **kw)
    ck = os.path.join(out, "checkpoints")
    rows = os.path.join(ck, whole.GRAPH_ROWS)
    assert os.listdir(rows) == ["rows-0-of-1.npz"] and not os.path.exists(os.path.join(ck, store.PARTS))
    os.remove(os.path.join(rows, "rows-0-of-1.npz"))           # so that the resume searches again
    _plant(os.path.join(ck, store.PARTS), ["g0-l0-p0-of-2", "g0-l0-p1-of-2", "g0-l0", ".tmp-p0-y", ".tmp-p1-z"])
    again = dataset.run(folder, out, resume=True, **kw)
    assert again.summary()["cached"] == ["features"] and again.summary()["exact_solver"]["path"] == "sharded"
    assert not os.path.exists(os.path.join(ck, store.PARTS))
    assert os.listdir(rows) == ["rows-0-of-1.npz"] and store.finished(ck)
    np.testing.assert_array_equal(again.eigvecs, first.eigvecs)
    gkw = {**kw, "exact_solver": "gathered"}
    out2 = str(tmp_path / "out2")
    dataset.run(folder, out2, **gkw)
    _plant(os.path.join(out2, "checkpoints", store.PARTS), ["g0-l0-p0-of-2"])
    assert dataset.run(folder, out2, resume=True, **gkw).summary()["cached"] == ["graph"]
    assert not os.path.exists(os.path.join(out2, "checkpoints", store.PARTS))


# ------------------------------------------------------------------------------------------ 4. provenance


def test_dataset_result_records_its_graph_options_and_attribution_compares_them(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 4)
    bb = synthetic()
    kw = dict(backbone=bb, mesh=_one_device(), **{**EXACT, "num_eigs": 3})
    res = dataset.run(folder, str(tmp_path / "out"), **kw)
    p = res.provenance
    assert p.graph == "knn-qk" and p.layers == (0, 1)
    assert p.graph_options == {"k_intra": 5, "k_inter": 5, "min_cos": 0.1, "graph_dtype": "float32"}
    assert p.graph_options == json.loads(json.dumps(sj.GraphSpec("knn-qk", k_intra=5, k_inter=5).reads()))
    s = res.summary()
    assert p.graph_record["k_used"] == s["k_used"] and p.graph_record["edge_weights"] == s["edge_weights"]
    assert p.graph_record["knn_search"] == s["knn_search"] and s["knn_search"]["used"] == "exact"
    # RESULT.npz alone: an image of it saved and read back keeps them
    path = str(tmp_path / "one.npz")
    res.image(1).save(path)
    back = sj.Result.load(path)
    assert back.provenance.graph_options == p.graph_options and back.provenance.graph_record == p.graph_record
    assert back.summary()["provenance"]["graph_record"]["k_used"] == s["k_used"]
    # attribution: the dataset's graph asked for is taken, another min_cos is refused naming it
    from spectral_jax import io

    x = np.stack([bb.preprocess_image(io.load_image(os.path.join(folder, f)), (32, 32)) for f in res.names])
    taps = bb.taps(x, None)
    assert sj.attribution(taps, "knn-qk", result=res, k_intra=5, k_inter=5) is not None
    with pytest.raises(InputError, match="other graphs: min_cos 0.1 there, 0.3 here"):
        sj.attribution(taps, "knn-qk", result=res, k_intra=5, k_inter=5, min_cos=0.3)
    # RBF edges: no GraphSpec builds that graph, so attribution refuses it
    rbf = dataset.run(folder, str(tmp_path / "rbf"), **{**kw, "edge_weights": "rbf"})
    assert rbf.provenance.graph_options["edge_weights"] == "rbf"
    assert rbf.provenance.graph_record["edge_weights"]["kind"] == "rbf"
    assert len(rbf.provenance.graph_record["edge_weights"]["sigma"]) == 2
    with pytest.raises(InputError, match=r"other graphs: edge_weights 'rbf' there, None here — pass the Result of "
                                          r"solve on these taps: the result's graphs \(edge_weights 'rbf'\) are not"):
        sj.attribution(taps, "knn-qk", result=rbf, k_intra=5, k_inter=5)


def test_a_gd_dataset_result_records_its_provenance_too(tmp_path):
    """gd (no whole-dataset solve) records what its steps used: graph kind, layers, the layer weights of
    summary.json, graph options and a batch's k_used (it was None: unknown)."""
    from test_dataset import SMALL

    folder = make_folder(str(tmp_path / "imgs"), 4)
    with pytest.warns(RuntimeWarning, match="not converged"):
        res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), mesh=_one_device(), epochs=1,
                          **{**SMALL, "layer_weights": "1:3,0:1"})
    p, s = res.provenance, res.summary()
    assert p.graph == s["graph"] and p.layers == (0, 1)
    np.testing.assert_allclose(p.layer_weights, [[0.25, 0.75]] * 4)
    assert {str(l): w for l, w in zip(p.layers, p.layer_weights[0])} == s["layer_weights"]["weights"]
    assert p.graph_options == {"k_intra": 5, "k_inter": 5, "min_cos": 0.1, "graph_dtype": "float32"}
    assert p.graph_record["k_used"] == s["k_used"]


@pytest.mark.parametrize("solver", ["gathered", "sharded"])
def test_a_resume_reading_the_graph_cache_says_so(tmp_path, capsys, solver):
    """The README's "it says how many images were cached, on stderr": a resume whose graph comes from its cache
    said nothing (only a features read was announced)."""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    kw = dict(backbone=synthetic(), mesh=_one_device(), exact_solver=solver, **{**EXACT, "num_eigs": 3})
    dataset.run(folder, out, **kw)
    capsys.readouterr()
    again = dataset.run(folder, out, resume=True, **{**kw, "num_eigs": 4})
    assert again.summary()["cached"] == ["graph"] and again.summary()["images_cached"] == 4
    cache = os.path.join(out, "checkpoints", "graph.npz" if solver == "gathered" else whole.GRAPH_ROWS)
    assert f"4 of 4 images' graph read from {cache} (cached: no forward, no search)" in capsys.readouterr().err


def test_a_run_removes_the_export_temporaries_a_killed_run_left(tmp_path):
    """A run killed while it exported (kill -9) leaves OUT/.tmp-XXXXXXXX.png/.npz/.json; the next run into OUT
    (holding its lock) removes them and nothing else."""
    import tempfile

    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    kw = dict(backbone=synthetic(), mesh=_one_device(), **{**EXACT, "num_eigs": 3})
    dataset.run(folder, out, **kw)
    stale = [os.path.basename(tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=s)[1]) for s in (".png", ".npz",
                                                                                                ".json")]
    keep = [".tmp-notours", "mine.png", ".tmp-abcdefgh.txt"]
    for name in keep:
        open(os.path.join(out, name), "w").close()
    dataset.run(folder, out, resume=True, **{**kw, "num_eigs": 4})
    left = set(os.listdir(out))
    assert not set(stale) & left and set(keep) <= left


@pytest.mark.parametrize("method", ["exact", "gd"])
def test_load_result_reads_the_provenance_back(tmp_path, method):
    """summary.json holds the run's provenance ("provenance"; the weights are its "layer_weights"): `load_result`
    gives the same `Provenance` as the run's own result (it gave None)."""
    from test_dataset import SMALL

    folder = make_folder(str(tmp_path / "imgs"), 4)
    out = str(tmp_path / "out")
    kw = dict(backbone=synthetic(), mesh=_one_device())
    if method == "exact":
        res = dataset.run(folder, out, **kw, **{**EXACT, "num_eigs": 3, "layer_weights": "1:3,0:1"})
    else:
        with pytest.warns(RuntimeWarning, match="not converged"):
            res = dataset.run(folder, out, **kw, epochs=1, **{**SMALL, "layer_weights": "1:3,0:1"})
    back = dataset.load_result(out).provenance
    assert back is not None and back.same_source(res.provenance)
    np.testing.assert_allclose(back.layer_weights, res.provenance.layer_weights, rtol=1e-6)
