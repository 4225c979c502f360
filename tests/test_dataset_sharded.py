"""The exact dataset method on the sharded path (`whole.solver_path`, `whole.solve_sharded`), through the console
script with local processes (--coordinator, --num-processes, --process-id: what a cluster user types).

Two processes, one of them killed with SIGKILL once every image's features are on disk (during the sharded graph
build and solve, which have no checkpoint of their own), then both started again with --resume:
1. the survivor stops at its next collective with one line on stderr, exit 1, no result written;
2. the resumed run (started as `srun` starts it: SLURM's environment, no cluster flags) reads every image's features from the store, keeps the kNN graph sharded by rows (summary.json's
   exact_solver path "sharded", solver "exact-lobpcg-distributed", no whole-graph cache, each process's rows cached) and gives the eigenvectors of
   one process on the gathered path (ARPACK on the whole graph): subspace agreement ≥ 0.9999, eigenvalues equal at
   float32 — with layer weights chosen by the eigengap rule (`distributed.layer_spectra`), the same weights.
(The resumed run recomputes the whole graph and solve from the stored features, so it is the uninterrupted
sharded run; a kill mid-forward and its resume, and two processes' shards read back: test_dataset_store.)
3. `--solver` with --method gd: one line, exit 2, nothing written.

The tiny random-weight DINOv2-S at 28×28 (a 2×2 grid) of test_dataset_badinput, two of its layers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from sjtest import subspace_alignment
from test_dataset import _env, _free_port, make_folder
from test_dataset_badinput import SCRIPT, _one_line_exit_2
from spectral_jax.dataset import store

IMAGES = 24
CLI = ["--model", "dinov2_vits14", "--weights", "random", "--size", "28", "--method", "exact", "--layers", "10,11",
       "--layer-weights", "eigengap", "--num-eigs", "4", "--k-intra", "3", "--k-inter", "6", "--tol", "1e-5"]


def _slurm_job_id() -> int:
    """A SLURM job id whose coordinator port (JAX's rule: 61440 + id mod 4096) is free here."""
    import random
    import socket

    for port in random.Random().sample(range(61440, 65536), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port - 61440
    pytest.skip("no free port in JAX's SLURM range [61440, 65535]")


def _launch(folder, out, *extra, procs=2, slurm=False):
    """The console script as `procs` local processes of one run (procs=1: a plain one-process run): given
    --coordinator/--num-processes/--process-id, or (slurm) none of them and the environment `srun` sets; no
    progress bars (TQDM_DISABLE), so that stderr holds only what the run says."""
    port, job = _free_port(), _slurm_job_id() if slurm else None
    cluster = (lambda i: ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(procs), "--process-id",
                          str(i)]) if procs > 1 and not slurm else (lambda i: [])
    env = (lambda i: dict(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS=str(procs),
                          SLURM_PROCID=str(i), SLURM_LOCALID="0")) if slurm else (lambda i: {})
    return [subprocess.Popen([SCRIPT, "dataset", folder, *CLI, "--out", out, *extra, *cluster(i)],
                             env=_env(TQDM_DISABLE="1", **env(i)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(procs)]


def _wait(ps, timeout=300):
    try:
        return [p.communicate(timeout=timeout) for p in ps]
    finally:
        for p in ps:                           # one failed process leaves the other waiting at a collective
            if p.poll() is None:
                p.kill()
                p.wait()


def _images_on_disk(ckdir):
    return sum(hi - lo for lo, hi in map(store.span, store.finished(ckdir)))


def _table(out):
    """eigvecs `[n, K, h, w]` → `[n·h·w, K]`, eigenvalues, summary."""
    with np.load(os.path.join(out, "eigvecs.npz")) as f:
        e = f["eigvecs"]
    s = json.load(open(os.path.join(out, "summary.json")))
    return e.transpose(0, 2, 3, 1).reshape(-1, e.shape[1]), np.asarray(s["eigvals"]), s


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """imgs/; gathered/: one process, --solver gathered; killed/: two processes (default solver), process 1 killed
    once all images' features are on disk — both runs started at once."""
    root = tmp_path_factory.mktemp("sharded")
    imgs = make_folder(str(root / "imgs"), IMAGES)
    one = _launch(imgs, str(root / "gathered"), "--solver", "gathered", procs=1)
    killed = _launch(imgs, str(root / "killed"))
    ck = str(root / "killed" / "checkpoints")
    deadline = time.time() + 240
    while _images_on_disk(ck) < IMAGES and killed[1].poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(killed[1].pid, signal.SIGKILL)
    t_kill = time.time()
    k0 = _wait(killed[:1], timeout=240)[0]
    stopped = time.time() - t_kill
    _wait(killed[1:])
    got = _wait(one)
    assert one[0].returncode == 0, got[0][1][-3000:]
    return dict(root=root, imgs=imgs, survivor=(killed[0].returncode, k0, stopped))


def test_a_killed_process_stops_the_other_in_one_line(runs):
    code, (_, err), stopped = runs["survivor"]
    outk = str(runs["root"] / "killed")
    assert code == 1 and stopped < 60, (code, stopped, err[-3000:])
    lines = [x for x in err.strip().splitlines() if not x.startswith("[Gloo] ")]    # gloo's own connection note
    assert len(lines) == 1 and lines[0].startswith("spectral-jax dataset: error: process 0 of 2: another process of "
                                                   "the run stopped"), err[-3000:]
    assert "with --resume" in lines[0]
    assert not os.path.exists(os.path.join(outk, "summary.json"))
    assert _images_on_disk(os.path.join(outk, "checkpoints")) == IMAGES


def test_resumed_two_processes_keep_the_graph_sharded_and_give_the_one_process_eigenvectors(runs):
    outk = str(runs["root"] / "killed")
    ps = _launch(runs["imgs"], outk, "--resume", slurm=True)       # started as srun would: no cluster flags
    got = _wait(ps)
    assert all(p.returncode == 0 for p in ps), [e[-3000:] for _, e in got]
    v2, l2, s2 = _table(outk)
    v1, l1, s1 = _table(str(runs["root"] / "gathered"))
    assert s2["images_cached"] == IMAGES and "features" in s2["cached"]
    assert s2["processes"] == 2 and s2["exact_solver"]["path"] == "sharded" and s2["exact_solver"]["asked"] == "auto"
    assert s2["solver"] == "exact-lobpcg-distributed" and "graph-rows" in s2["exact_solver"]["graph_cache"]
    assert "graph" not in s2["cached"]                             # the killed run left no rows: searched again
    assert sorted(os.listdir(os.path.join(outk, "checkpoints", "graph-rows"))) == ["rows-0-of-2.npz",
                                                                                 "rows-1-of-2.npz"]
    assert s1["processes"] == 1 and s1["exact_solver"]["path"] == "gathered" and s1["solver"] != s2["solver"]
    assert not os.path.exists(os.path.join(outk, "checkpoints", "graph.npz"))
    assert os.path.isfile(runs["root"] / "gathered" / "checkpoints" / "graph.npz")
    assert s2["convergence"]["converged"] and s2["convergence"]["max_residual"] <= 1e-5
    assert s2["edges"] == s1["edges"] > 0
    w1, w2 = s1["layer_weights"], s2["layer_weights"]
    assert w1["rule"] == w2["rule"] == "eigengap" and w1["weights"].keys() == w2["weights"].keys()
    np.testing.assert_allclose(list(w2["weights"].values()), list(w1["weights"].values()), atol=1e-4)
    assert len(set(w1["weights"].values())) > 1                    # the rule did weigh the two layers apart
    assert subspace_alignment(v2, v1) >= 0.9999
    np.testing.assert_allclose(l2, l1, rtol=0, atol=2e-6 * float(np.max(l1)))


def test_solver_with_gd_is_one_line(tmp_path):
    imgs = make_folder(str(tmp_path / "imgs"), 2)
    r = subprocess.run([SCRIPT, "dataset", imgs, "--model", "dinov2_vits14", "--weights", "random", "--method", "gd",
                        "--solver", "sharded", "--out", str(tmp_path / "out")], env=_env(), capture_output=True,
                       text=True, timeout=120)
    _one_line_exit_2(r, "--solver")
    assert not (tmp_path / "out").exists()


def test_solver_path_choice_and_refusal():
    """`whole.solver_path`: auto is gathered on one process; sharded asked for with layers on two grids or with
    diffusion timesteps (graphs [L, T]) is one InputError naming --solver and the fix, raised before any work (the
    first thing `whole.solve` does)."""
    from spectral_jax.dataset import Settings, whole
    from spectral_jax.dataset.layout import Geometry
    from spectral_jax.errors import InputError

    one = Geometry((((2, 2), (10, 11)),), (2, 2), (28, 28), 24, 64, 1, 3, 6)
    two = Geometry((((4, 4), (0,)), ((2, 2), (1,))), (4, 4), (64, 64), 24, 64, 1, 3, 6)
    steps = Geometry((((2, 2), (10, 11)),), (2, 2), (28, 28), 24, 64, 1, 3, 6, steps=2)
    assert whole.solver_path(Settings(), one) == "gathered"
    assert whole.solver_path(Settings(exact_solver="sharded"), one) == "sharded"
    assert whole.solver_path(Settings(exact_solver="gathered"), one) == "gathered"
    for geom, why in ((two, "the layers sit on 2 grids"), (steps, "the taps have diffusion timesteps")):
        with pytest.raises(InputError, match=rf"--solver sharded: cannot run here: {why}.* — pass --solver gathered"):
            whole.solver_path(Settings(exact_solver="sharded"), geom)
    with pytest.raises(InputError, match=r"--solver 'nope': unknown"):
        Settings(exact_solver="nope")
