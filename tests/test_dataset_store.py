"""The exact method's on-disk feature store and its memory estimate.

1. `kill -9` of the `spectral-jax dataset` console script mid-forward (once a given number of shards is on disk),
   then `--resume`: only the missing batches are computed, the run says how many images were cached (stderr and
   summary.json), and the graph and eigenvectors are those of an uninterrupted run, bit for bit.
2. A damaged shard (a flipped byte) is refused in one line naming it; OUT is left as it was.
3. The memory estimate against a measured run: the features' bytes on disk and the graph's arrays exactly, the
   coalesced operator's measured peak (tracemalloc) within a factor of 3 below the estimate.
4. A run whose estimate exceeds SPECTRAL_JAX_MAX_MEMORY is refused up front: exit 2, one line, nothing written.
5. Shards of another batch layout or of two processes are read where they cover whole batches; a kNN search stopped
   midway resumes at its first missing layer (parts), and a damaged part is one line.

CLI cases use the tiny random-weight DINOv2-S of test_dataset_badinput (28×28 → a 2×2 grid); API cases the
synthetic backbone of test_dataset.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tracemalloc

import numpy as np
import pytest

from spectral_jax import dataset
from spectral_jax.dataset import memory, store
from test_dataset import _env, make_folder, synthetic
from test_dataset_badinput import SCRIPT, _one_line_exit_2, _tree
from test_dataset_exact import EXACT

CLI = ["--model", "dinov2_vits14", "--weights", "random", "--size", "28", "--method", "exact", "--batch-size", "1",
       "--num-eigs", "3", "--k-intra", "3", "--k-inter", "3"]
IMAGES = 40


def _cli(*args, env=None, timeout=300):
    return subprocess.run([SCRIPT, "dataset", *args], env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _shards(out):
    return store.finished(os.path.join(out, "checkpoints"))


def kill_mid_forward(args, out, shards, env=None, timeout=300):
    """Start `spectral-jax dataset *args --out out` and SIGKILL it as soon as `shards` shards are on disk (the
    store's folder polled every 2 ms), asserting it was still running (in the forward) then."""
    p = subprocess.Popen([SCRIPT, "dataset", *args, "--out", out], env=env or _env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while len(_shards(out)) < shards and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert p.poll() is None, p.communicate()[1][-3000:]         # still in the forward
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """imgs/ (40 PNGs); killed/: a run killed with SIGKILL once 3 shards were on disk; whole/: an uninterrupted
    run of the same images and settings."""
    root = tmp_path_factory.mktemp("store")
    imgs = make_folder(str(root / "imgs"), IMAGES)
    kill_mid_forward([imgs, *CLI], str(root / "killed"), 3)
    whole = _cli(imgs, *CLI, "--out", str(root / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    return root


def test_resume_after_kill_computes_only_the_missing_images_and_gives_the_same_eigvecs(killed):
    out = str(killed / "killed")
    assert p_killed(out)
    done = len(_shards(out))
    assert 3 <= done < IMAGES and not os.path.exists(os.path.join(out, "checkpoints", "graph.npz"))
    refused = _cli(str(killed / "imgs"), *CLI, "--out", out)                 # no --resume: refused, nothing changed
    _one_line_exit_2(refused, "holds the cached features of an earlier run", "--resume")
    r = _cli(str(killed / "imgs"), *CLI, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{done} of {IMAGES} images' features read from" in r.stderr, r.stderr[-3000:]
    s = json.load(open(os.path.join(out, "summary.json")))
    whole = json.load(open(killed / "whole" / "summary.json"))
    assert s["images_cached"] == done and whole["images_cached"] == 0 and s["cached"] == []
    assert len(_shards(out)) == IMAGES and not [d for d in os.listdir(os.path.join(out, "checkpoints", "features"))
                                                if d.startswith(".tmp")]
    for name in ("idx0", "w0", "deg0"):
        np.testing.assert_array_equal(np.load(os.path.join(out, "checkpoints", "graph.npz"))[name],
                                      np.load(killed / "whole" / "checkpoints" / "graph.npz")[name])
    a, b = np.load(os.path.join(out, "eigvecs.npz")), np.load(killed / "whole" / "eigvecs.npz")
    np.testing.assert_array_equal(a["eigvecs"], b["eigvecs"])
    assert s["eigvals"] == whole["eigvals"]
    # a second resume with the graph gone reads every image's features and computes none
    os.remove(os.path.join(out, "checkpoints", "graph.npz"))
    r = _cli(str(killed / "imgs"), *CLI, "--out", out, "--resume")
    assert r.returncode == 0 and f"{IMAGES} of {IMAGES} images' features read" in r.stderr, r.stderr[-3000:]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["images_cached"] == IMAGES and s["cached"] == ["features"] and s["seconds_forward"] < 60
    np.testing.assert_array_equal(np.load(os.path.join(out, "eigvecs.npz"))["eigvecs"], b["eigvecs"])


def p_killed(out):
    """The killed run left whole shards only (a shard folder appears by one rename)."""
    for d in _shards(out):
        meta = json.load(open(os.path.join(out, "checkpoints", "features", d, "meta.json")))
        assert meta["count"] == 1 and sorted(meta["arrays"]) == ["a0", "b0"]
    return True


def test_damaged_shard_is_refused_in_one_line(killed, tmp_path):
    out = str(tmp_path / "whole")
    import shutil

    shutil.copytree(killed / "whole", out)
    os.remove(os.path.join(out, "checkpoints", "graph.npz"))
    shard = os.path.join(out, "checkpoints", "features", _shards(out)[5])
    path = os.path.join(shard, "b0.npy")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 5)
        byte = f.read(1)[0]
        f.seek(os.path.getsize(path) - 5)
        f.write(bytes([byte ^ 0x10]))
    before = _tree(out)
    r = _cli(str(killed / "imgs"), *CLI, "--out", out, "--resume")
    _one_line_exit_2(r, f"{shard}: is damaged (b0.npy changed since it was written (CRC-32))",
                     "run again without --resume")
    assert _tree(out) == before


def test_estimate_against_a_measured_run(tmp_path):
    """The estimate's features equal the shards' bytes, its graph twice the graph's arrays (host and device copy);
    the coalesced operator's measured peak (tracemalloc over `solvers.sparse.knn_csr`) lies within a factor of 3
    below the estimate's operator term."""
    from spectral_jax import graphs
    from spectral_jax.solvers.sparse import knn_csr

    folder = make_folder(str(tmp_path / "imgs"), 12)
    res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **EXACT)
    est = res.summary()["memory"]
    ck = str(tmp_path / "out" / "checkpoints")
    assert est["features_disk"] == sum(store.load_all(ck, x).nbytes for x in ("a0", "b0"))
    with np.load(os.path.join(ck, "graph.npz")) as f:
        assert est["graph"] == 2 * sum(f[x].nbytes for x in ("idx0", "w0", "deg0"))
        g = graphs.KnnGraph(f["idx0"], f["w0"], f["deg0"], (4, 4), (2,), 12)
    assert 0 < est["peak"] <= est["available"]
    width = store.load_all(ck, "a0").shape[-1]
    sparse = memory.estimate([((4, 4), 2, width)], 12, k=(5, 5), num_eigs=6, dense_max=0)
    for key in ("features_disk", "graph"):
        assert sparse[key] == est[key]
    tracemalloc.start()
    knn_csr([g], [np.full(2, 0.5, np.float32)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= sparse["operator"] <= 3 * peak, (peak, sparse["operator"])


def test_run_over_the_memory_limit_is_refused_up_front(tmp_path):
    imgs = make_folder(str(tmp_path / "imgs"), 4)
    from concurrent.futures import ThreadPoolExecutor

    limits = ("1M", "lots")
    with ThreadPoolExecutor(2) as pool:                  # two independent refusals, side by side
        small, bad = pool.map(lambda m: _cli(imgs, *CLI, "--out", str(tmp_path / f"out-{m}"),
                                             env=_env(SPECTRAL_JAX_MAX_MEMORY=m)), limits)
    _one_line_exit_2(small, "the run: needs about", "but 1.0 MiB is available (SPECTRAL_JAX_MAX_MEMORY)",
                     "set SPECTRAL_JAX_MAX_MEMORY if more memory is available")
    _one_line_exit_2(bad, "SPECTRAL_JAX_MAX_MEMORY='lots': is not a positive number of bytes")
    assert sorted(os.listdir(tmp_path)) == ["imgs"]                          # neither OUT written


def test_estimate_model_matches_the_run(killed):
    """The library estimate for a model name, size, layers and image count (no checkpoint: random weights, the
    forward traced abstractly) is the estimate the CLI run made and wrote in summary.json."""
    s = json.load(open(killed / "whole" / "summary.json"))
    est = memory.estimate_model("dinov2_vits14", IMAGES, size=28, k_intra=3, k_inter=3, num_eigs=3, batch_size=1)
    assert est["groups"] == [[[2, 2], 12, 384]]
    assert {k: v for k, v in est.items() if k != "groups"} == {k: v for k, v in s["memory"].items()
                                                               if k != "available"}


@pytest.fixture(scope="module")
def ref10(tmp_path_factory):
    """(folder of 10 PNGs, OUT of their uninterrupted EXACT run on the synthetic backbone (batches of 4), its
    Result): the reference the API resume tests compare with."""
    root = tmp_path_factory.mktemp("ref10")
    folder = make_folder(str(root / "imgs"), 10)
    return folder, root / "ref", dataset.run(folder, str(root / "ref"), backbone=synthetic(), **EXACT)


def test_shards_of_another_layout_are_read_where_they_fit(tmp_path, ref10):
    """Shards written with batches of 2 are read by a resume with batches of 4 (each batch of 4 covered by two
    shards); a batch only partly covered is computed again and its stale shard replaced. The eigenvectors are those
    of an uninterrupted run."""
    folder, _, ref = ref10
    out = str(tmp_path / "out")
    dataset.run(folder, out, backbone=synthetic(), **{**EXACT, "batch_size": 2})
    ck = os.path.join(out, "checkpoints")
    os.remove(os.path.join(ck, "graph.npz"))
    import shutil

    shutil.rmtree(os.path.join(ck, "features", "images-000000006-000000008"))       # batch [4, 8) half covered
    res = dataset.run(folder, out, backbone=synthetic(), resume=True, **EXACT)
    assert res.summary()["images_cached"] == 6                                         # [0, 4) and [8, 10)
    assert _shards(out) == ["images-000000000-000000002", "images-000000002-000000004",
                            "images-000000004-000000008", "images-000000008-000000010"]
    np.testing.assert_allclose(res.eigvecs, ref.eigvecs, atol=1e-5)


def test_two_processes_write_their_own_shards_and_a_resume_reads_them(tmp_path):
    """Two processes (jax.distributed on localhost): each writes the shards of its own images (process 1's first
    shard starts at its first image); a one-process --resume of that OUT (graph removed) reads all 12 images from
    those shards, computes none and gives the two-process eigenvectors."""
    from test_dataset import run_two_processes

    folder = make_folder(str(tmp_path / "imgs"), 12)
    out = str(tmp_path / "multi")
    run_two_processes(folder, out, "**EXACT, exact_solver='gathered'",          # the path that caches its graph
                      head="from test_dataset_exact import EXACT\n")
    assert _shards(out) == [store.shard_name(i, 2) for i in range(0, 12, 2)]         # batches of 4: 2 per process
    multi = dataset.load_result(out)
    os.remove(os.path.join(out, "checkpoints", "graph.npz"))
    import jax

    res = dataset.run(folder, out, backbone=synthetic(), resume=True, mesh=dataset.make_mesh(jax.devices()[:1]),
                      **EXACT)
    assert res.summary()["images_cached"] == 12 and res.summary()["cached"] == ["features"]
    np.testing.assert_allclose(res.eigvecs, multi.eigvecs, atol=1e-5)


class _Stop(Exception):
    pass


def test_search_stopped_midway_resumes_at_its_first_missing_layer(tmp_path, monkeypatch, ref10):
    """The kNN search stopped after its first layer (an error in the second): layer 0's edges are kept as a part;
    --resume reads every image's features and that part, searches layer 1 only, and gives the uninterrupted run's
    graph; the parts go once graph.npz is saved. A damaged part is one line naming it."""
    from spectral_jax.dataset import whole

    folder, ref_out, ref = ref10
    out = str(tmp_path / "out")
    calls, real = [], whole._rows_tile

    def rows_tile(*a):
        calls.append(1)
        if len(calls) == 2:
            raise _Stop()
        return real(*a)

    monkeypatch.setattr(whole, "_rows_tile", rows_tile)
    with pytest.raises(_Stop):
        dataset.run(folder, out, backbone=synthetic(), **EXACT)
    ck = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(os.path.join(ck, store.PARTS))) == ["g0-l0"] and not os.path.exists(
        os.path.join(ck, "graph.npz"))
    part = os.path.join(ck, store.PARTS, "g0-l0")
    kept = open(os.path.join(part, "idx.npy"), "rb").read()
    with open(os.path.join(part, "idx.npy"), "r+b") as f:                     # damaged: refused, nothing changed
        f.truncate(100)
    before = _tree(out)
    with pytest.raises(dataset.InputError) as e:
        dataset.run(folder, out, backbone=synthetic(), resume=True, **EXACT)
    assert str(e.value).startswith(f"{part}: is damaged (idx.npy unreadable") and _tree(out) == before
    open(os.path.join(part, "idx.npy"), "wb").write(kept)
    calls.clear()
    res = dataset.run(folder, out, backbone=synthetic(), resume=True, **EXACT)
    assert len(calls) == 1 and res.summary()["images_cached"] == 10                # layer 1's one row tile only
    assert not os.path.exists(os.path.join(ck, store.PARTS))
    for name in ("idx0", "w0", "deg0"):
        np.testing.assert_array_equal(np.load(os.path.join(ck, "graph.npz"))[name],
                                      np.load(ref_out / "checkpoints" / "graph.npz")[name])
    np.testing.assert_allclose(res.eigvecs, ref.eigvecs, atol=1e-6)
