"""A red-team pass over `spectral-jax dataset` (2026-12-07): what it used to get silently wrong.

- gd: a batch with no readable image (all its files unreadable) entered the summary's objective and loss and the
  convergence verdict as a loss of masked slots only;
- exact: a forward padded to --batch-size (default 40) on a folder of a few images;
- exact: graphs left without any edge (every cosine at or below --min-cos) were solved, their zero eigenvalues
  marked converged and segmented, and on the sharded path without the `isolated` record the gathered path gives.

Synthetic backbone of test_dataset (32×32 inputs → a 4×4 grid)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from spectral_jax import dataset
from spectral_jax.dataset import summary
from spectral_jax.errors import InputError
from test_dataset import make_folder, synthetic

EXACT = dict(size=32, batch_size=4, num_eigs=4, k_intra=5, k_inter=5, figure_images=0, method="exact")


def test_gd_verdict_leaves_out_batches_without_an_image():
    """The same live batches with an empty one opening every epoch: the same stationarity, from the same start;
    iterations and window still in steps as run."""
    rng = np.random.default_rng(0)
    epochs = 6
    live = [[2.0 - 0.1 * i, 1.5 - 0.2 * np.exp(-i / 3) + 0.01 * rng.normal(), 2.8, 2] for i in range(3 * epochs)]
    empty = [2.0, 2.0, 0.0, 0]
    mixed = [r for e in range(epochs) for r in [empty] + live[3 * e:3 * e + 3]]
    plain, got = summary.gd_convergence(live, 3), summary.gd_convergence(mixed, 4)
    assert plain.stationarity is not None and got.stationarity == pytest.approx(plain.stationarity, rel=1e-12)
    assert (got.iterations, got.stationarity_window) == (4 * epochs, plain.stationarity_window // 3 * 4)
    assert got.converged == plain.converged


def test_gd_summary_objective_counts_batches_with_images_only(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), n=2)
    for i in range(4):                                    # whole batches of unreadable files
        (tmp_path / "imgs" / f"bad{i}.png").write_bytes(b"not a png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # 2 epochs: too few for a verdict
        s = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), size=32, batch_size=2, num_eigs=3,
                        k_intra=5, k_inter=5, figure_images=0, method="gd", epochs=2).summary()
    last = s["history"][-s["steps_per_epoch"]:]
    read = [r for r in last if r[3] > 0]
    assert len(s["skipped"]) == 4 and 0 < len(read) < len(last)   # the last epoch holds an empty batch
    assert s["objective"] == pytest.approx(np.mean([r[2] for r in read]))
    assert s["loss"] == pytest.approx(np.mean([r[1] for r in read]))


@pytest.mark.parametrize("solver", ["gathered", "sharded"])
def test_a_graph_without_edges_is_refused_and_isolated_tokens_are_reported_on_both_paths(tmp_path, solver):
    folder = make_folder(str(tmp_path / "imgs"), n=8)
    with pytest.raises(InputError, match=r"--min-cos 0.999: leaves no edge between two tokens in any graph"):
        dataset.run(folder, str(tmp_path / "none"), backbone=synthetic(), min_cos=0.999, exact_solver=solver,
                    **EXACT)
    res = dataset.run(folder, str(tmp_path / "some"), backbone=synthetic(), min_cos=0.6, exact_solver=solver,
                      **EXACT)
    iso = res.summary()["isolated"]
    assert set(iso["fraction"]) == {"0", "1"} and iso["min_cos"] == 0.6
    assert 0 <= min(iso["fraction"].values()) and iso["max"] == max(iso["fraction"].values()) <= 1


@pytest.mark.parametrize("solver", ["gathered", "sharded"])
def test_knn_vv_tokens_with_only_their_own_edge_are_isolated_and_such_graphs_refused(tmp_path, solver):
    """knn-vv keeps each token's edge to itself (cosine 1, above any --min-cos): it made every token count as
    connected, so a --min-cos that left nothing else ran (all eigenvalues 1, arbitrary eigenvectors) with no word.
    Now the own edge does not count: refused on both paths; at a mid --min-cos the isolated share is > 0."""
    folder = make_folder(str(tmp_path / "imgs"), n=8)
    vv = {**EXACT, "graph": "knn-vv"}
    none = str(tmp_path / "none")
    with pytest.raises(InputError, match=r"--min-cos 0.9999: leaves no edge between two tokens in any graph .* "
                                         r"run again with --resume: the features are kept"):
        dataset.run(folder, none, backbone=synthetic(), min_cos=0.9999, exact_solver=solver, **vv)
    ck = os.path.join(none, "checkpoints")                        # the features kept, no graph cached
    assert os.path.isdir(os.path.join(ck, "features"))
    assert not os.path.exists(os.path.join(ck, "graph.npz")) and not os.path.exists(os.path.join(ck, "graph-rows"))
    res = dataset.run(folder, none, backbone=synthetic(), min_cos=0.9, exact_solver=solver, resume=True, **vv)
    iso = res.summary()["isolated"]
    assert res.summary()["cached"] == ["features"] and 0 < iso["max"] <= 1, iso


def test_the_two_paths_count_the_same_isolated_tokens(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), n=8)
    got = {s: dataset.run(folder, str(tmp_path / s), backbone=synthetic(), min_cos=0.6, exact_solver=s, **EXACT)
           .summary()["isolated"] for s in ("gathered", "sharded")}
    assert got["gathered"] == got["sharded"]
    assert 0 < got["gathered"]["max"] < 1                 # some tokens isolated, not all: the counts are compared


def test_an_exact_forward_is_never_wider_than_the_folder(tmp_path):
    """--batch-size above the images (the default 40 on a small folder): the forward takes the images (rounded up
    to the devices), not 40 slots of padding — the same eigenvectors as asking for that batch, the summary saying
    the batch run."""
    folder = make_folder(str(tmp_path / "imgs"), n=3)
    wide = dataset.run(folder, str(tmp_path / "wide"), backbone=synthetic(), **{**EXACT, "batch_size": 40})
    fit = dataset.run(folder, str(tmp_path / "fit"), backbone=synthetic(), **{**EXACT, "batch_size": 3})
    assert wide.summary()["batch_size"] == 3
    np.testing.assert_array_equal(np.asarray(wide.eigvecs), np.asarray(fit.eigvecs))


def test_resuming_a_gd_run_with_fewer_epochs_says_it_exports_the_longer_run(tmp_path, capsys):
    folder = make_folder(str(tmp_path / "imgs"), n=4)
    kw = dict(size=32, batch_size=2, num_eigs=3, k_intra=5, k_inter=5, figure_images=0, method="gd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), epochs=2, **kw)
        capsys.readouterr()
        s = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), epochs=1, resume=True, **kw).summary()
    assert s["epochs"] == 2 and s["steps"] == 4
    err = [line for line in capsys.readouterr().err.splitlines() if "--epochs 1" in line]
    assert len(err) == 1 and "already taken 4 steps (2 epochs); exporting it as it is" in err[0]


def test_processes_started_with_other_flags_or_folders_are_refused_on_every_process(tmp_path):
    """Two processes whose flags (--seed) or folders differ: before anything is read, every process refuses the run
    in one line naming process 1 and what differs (they used to run on and mix two runs into one result)."""
    import subprocess
    import sys
    import textwrap

    from test_dataset import CHILD_HEAD, _env, _free_port

    folder = make_folder(str(tmp_path / "imgs"), 4)
    other = make_folder(str(tmp_path / "other"), 3, seed=1)
    for case, (a, b) in {"seed": ((folder, 0), (folder, 1)), "folder": ((folder, 0), (other, 0))}.items():
        port, procs = _free_port(), []
        for i, (root, seed) in enumerate((a, b)):
            child = textwrap.dedent(f"""
                import jax
                jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={i})
            """) + CHILD_HEAD + textwrap.dedent(f"""
                from spectral_jax.errors import InputError
                try:
                    dataset.run({root!r}, {str(tmp_path / case)!r}, backbone=synthetic(), seed={seed}, **SMALL)
                except InputError as e:
                    print("REFUSED", e)
            """)
            procs.append(subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        try:
            outs = [p.communicate(timeout=300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for out, err in outs:
            line = next((s for s in out.splitlines() if s.startswith("REFUSED")), err[-2000:])
            assert "REFUSED process 1 of 2: was started with other flags or another folder" in line, line
            assert ("seed 0 ≠ 1" if case == "seed" else "files: 4 images ≠ 3") in line, line


def test_the_search_record_keeps_the_ivf_sizes_when_the_last_layer_fell_back_to_exact(tmp_path, monkeypatch, capsys):
    """--search ivf where the last layer's checked search ended exact: the summary and the stderr line give the
    sizes of the layer that kept the IVF (they said "nlist None, nprobe None … on None sampled rows")."""
    from spectral_jax.dataset import whole

    search_graph, calls = whole._search_graph, []

    def last_exact(*a, **kw):
        idx, w, info = search_graph(*a, **kw)
        calls.append(info["search"])
        if len(calls) == 2:                                # layer 1: as if its tries had all stayed under the floor
            info = {"search": "exact", "recall": 1.0, "tries": [{"nprobe": 8, "recall": 0.5}]}
        return idx, w, info

    monkeypatch.setattr(whole, "_search_graph", last_exact)
    folder = make_folder(str(tmp_path / "imgs"), n=8)
    s = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), search="ivf", min_recall=0.01,
                    exact_solver="gathered", **EXACT).summary()
    ks = s["knn_search"]
    assert calls == ["ivf", "ivf"] and ks["used"] == "ivf"
    assert ks["nlist"] > 0 and ks["nprobe"] > 0 and ks["recall_rows"] > 0, ks
    line = [x for x in capsys.readouterr().err.splitlines() if "kNN search ivf" in x]
    assert len(line) == 1 and "None" not in line[0] and f"nlist {ks['nlist']}" in line[0], line
