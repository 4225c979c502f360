"""Dataset level: batch kNN graph vs a dense construction, epoch order, compile-once, resume (in process and after
SIGKILL), unreadable files, 8 devices vs 1, two processes vs one, and the CLI contract.

Most tests use a synthetic backbone (random linear q/k/v of 8×8 pixel patches, 2 layers × 2 heads;
`Backbone.from_function`) through `backbone=`, so no real backbone forward is compiled; 32×32 inputs → a 4×4 grid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import dataset, graphs, viz
from spectral_jax.models import Backbone
from sjtest import xla_flags

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SMALL = dict(size=32, batch_size=4, num_eigs=6, k_intra=5, k_inter=5, figure_images=0, method="gd")


def synthetic(patch: int = 8, layers: int = 2, heads: int = 2, dim: int = 8, seed: int = 0) -> Backbone:
    """q/k/v = tanh(patch pixels @ W) per layer and head: cheap to compile, image-dependent, deterministic."""
    rng = np.random.default_rng(seed)
    f = patch * patch * 3
    params = {"w": jnp.asarray(rng.normal(size=(layers, 3, f, heads * dim)).astype(np.float32) / np.sqrt(f))}

    def apply(params, x, chosen):
        b, hh, ww, _ = x.shape
        h, w = hh // patch, ww // patch
        p = x.reshape(b, h, patch, w, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, f)
        return {i: tuple(jnp.tanh(p @ params["w"][i, j]).reshape(b, h * w, heads, dim).transpose(0, 2, 1, 3)
                         for j in range(3)) for i in (range(layers) if chosen is None else chosen)}

    return Backbone.from_function("synthetic", apply, params, patch_size=patch, num_layers=layers, size=32,
                                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_folder(root: str, n: int = 10, seed: int = 0) -> str:
    """n PNGs (40×48, two kinds of upper half so that images differ in a structured way)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        a = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
        a[:20] = a[:20] // 4 + 128 * (i % 2)
        Image.fromarray(a).save(os.path.join(root, f"img{i:03d}.png"))
    return root


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    env["XLA_FLAGS"] = xla_flags()          # the suite's level, no fake devices (`sjtest.xla_flags`)
    env.update(extra)
    return env


CHILD_HEAD = """
import os, sys, json
import jax
jax.config.update("jax_default_matmul_precision", "float32")
import numpy as np
from spectral_jax import dataset
from test_dataset import synthetic, SMALL
"""


# ---------------------------------------------------------------------------------------------------- kNN graph


def _dense_knn(a, b, n_img, per, k_intra, k_inter, valid, min_cos=0.1, sigma=None):
    """P = D⁻¹ ½(A + Aᵀ) by brute force: a token's k_intra / k_inter nearest (cosine of a's and b's unit rows) valid
    tokens in / outside its image, kept where cos > min_cos, weighted by that cosine, or with sigma by
    exp(−|a_i − b_j|² / 2σ²) of the unit rows (the RBF edges)."""
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = an @ bn.T
    n = a.shape[0]
    img = np.arange(n) // per
    ok = valid[img]
    adj = np.zeros((n, n))
    for i in range(n):
        if not ok[i]:
            continue
        same = np.where((img == img[i]) & ok)[0]
        other = np.where((img != img[i]) & ok)[0]
        for cand, kk in ((same, k_intra), (other, k_inter)):
            top = cand[np.argsort(-cos[i, cand], kind="stable")[:kk]]
            w = cos[i, top] if sigma is None else np.exp(-((an[i] - bn[top]) ** 2).sum(1) / (2 * sigma ** 2))
            adj[i, top] = np.where(cos[i, top] > min_cos, w, 0.0)
    s = 0.5 * (adj + adj.T)
    deg = s.sum(1)
    return np.where(deg[:, None] > 0, s / np.where(deg > 0, deg, 1)[:, None], 0.0)


@pytest.mark.parametrize("block", [7, 512])
def test_batch_knn_matches_dense_construction(rng, block):
    grid, n_img, layers = (3, 4), 4, 2
    per = 12
    a = rng.normal(size=(layers, n_img * per, 6)).astype(np.float32)
    b = rng.normal(size=(layers, n_img * per, 6)).astype(np.float32)
    valid = np.array([True, True, False, True])
    g = jax.jit(lambda a, b, v: graphs.knn(a, b, grid, n_img, k_intra=4, k_inter=5, block=block, valid=v))(
        a, b, valid)
    dense = np.asarray(g.dense())
    img = np.arange(n_img * per) // per
    for l in range(layers):
        np.testing.assert_allclose(dense[l], _dense_knn(a[l], b[l], n_img, per, 4, 5, valid), atol=1e-6)
        idx, w = np.asarray(g.idx[l]), np.asarray(g.w[l])
        assert idx.shape == (n_img * per, 9)
        live = valid[img]
        # every live node: exactly k_intra slots in its own image, k_inter in other (live) images
        assert (img[idx[live, :4]] == img[live, None]).all()
        assert (img[idx[live, 4:]] != img[live, None]).all()
        assert valid[img[idx[live]]].all()
        # the masked image: no edges out, none in
        assert (w[~live] == 0).all() and (w[np.isin(idx, np.flatnonzero(~live))] == 0).all()
        np.testing.assert_allclose(dense[l].sum(1)[live], 1.0, atol=1e-5)


def test_batch_knn_equals_graphs_knn(rng):
    """The dataset's search (rows under shard_map on its mesh) is the same graph as the plain one."""
    a = rng.normal(size=(3, 5 * 16, 8)).astype(np.float32)
    b = rng.normal(size=(3, 5 * 16, 8)).astype(np.float32)
    ours = graphs.knn(a, b, (4, 4), 5, k_intra=6, k_inter=10, mesh=dataset.make_mesh(jax.devices()[:1]))
    ref = graphs.knn(a, b, (4, 4), 5, k_intra=6, k_inter=10, min_cos=0.1)
    np.testing.assert_allclose(np.asarray(ours.dense()), np.asarray(ref.dense()), atol=1e-6)
    z = rng.normal(size=(80, 3)).astype(np.float32)
    np.testing.assert_allclose(ours.matvec(z), ref.matvec(z), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- order


def test_epoch_order_and_padding():
    n, b = 10, 4
    steps = [dataset.batch_indices(3, s, n, b) for s in range(6)]            # 2 epochs × 3 batches
    for e in range(2):
        ep = np.concatenate(steps[3 * e:3 * e + 3])
        assert sorted(ep[ep >= 0]) == list(range(n))                        # every image once per epoch
        assert (ep[-2:] == -1).all() and (ep[:-2] >= 0).all()              # the last batch padded
    assert not np.array_equal(steps[0], steps[3])                           # a new permutation each epoch
    np.testing.assert_array_equal(dataset.batch_indices(3, 4, n, b), steps[4])     # a function of (seed, step)
    assert not np.array_equal(dataset.batch_indices(4, 0, n, b), steps[0])


# ---------------------------------------------------------------------------------------------------- runs


def traces(caplog, name: str) -> int:
    """Traces of the jitted function `name` logged so far (JAX's own log: run under `jax.log_compiles(True)`)."""
    return sum(r.getMessage().startswith(f"Finished tracing {name} ") for r in caplog.records)


def test_run_compiles_once_and_writes_outputs(tmp_path, caplog):
    folder = make_folder(str(tmp_path / "imgs"), 10)
    ext = synthetic()
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        res = dataset.run(folder, str(tmp_path / "out"), backbone=ext, epochs=2, checkpoint_every=4,
                          **{**SMALL, "figure_images": 100})
        assert traces(caplog, "dataset_step") == 1                           # 6 steps, padded last batches: 1 trace
        dataset.run(folder, str(tmp_path / "more"), backbone=ext, epochs=1, **SMALL)
        assert traces(caplog, "dataset_step") == 1                           # a second run, other epochs: none
    s = res.summary()
    assert s["steps"] == 6 and s["steps_per_epoch"] == 3 and s["images"] == 10 and s["skipped"] == []
    assert [h[3] for h in s["history"]] == [4, 4, 2, 4, 4, 2]              # valid images per batch
    assert s["history"][0][1] < s["history"][0][0]                          # the inner steps lower the loss
    assert res.eigvecs.shape == (10, 6, 4, 4) and res.names == [f"img{i:03d}.png" for i in range(10)]
    # paper preset: eigvecs = global SVD of the per-pixel-normalised soft maps → orthonormal over all pixels
    u = np.transpose(res.eigvecs, (0, 2, 3, 1)).reshape(-1, 6)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-4)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-5)
    back = dataset.load_result(str(tmp_path / "out"))
    np.testing.assert_array_equal(back.eigvecs, res.eigvecs)
    assert back.names == res.names and back.summary()["steps"] == 6
    from PIL import Image

    assert Image.open(tmp_path / "out" / "eigvecs.png").size[0] > 100
    for key in ("objective", "seconds", "method", "num_eigs", "steps", "skipped", "images"):
        assert key in json.loads((tmp_path / "out" / "summary.json").read_text())


def test_resume_continues_to_the_same_table(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 10)
    ext = synthetic()
    a = dataset.run(folder, str(tmp_path / "a"), backbone=ext, epochs=1, checkpoint_every=2, **SMALL)
    assert a.summary()["steps"] == 3
    with pytest.raises(dataset.InputError, match="--resume"):
        dataset.run(folder, str(tmp_path / "a"), backbone=ext, epochs=3, **SMALL)
    with pytest.raises(dataset.InputError, match="other settings"):
        dataset.run(folder, str(tmp_path / "a"), backbone=ext, epochs=3, resume=True, **{**SMALL, "num_eigs": 5})
    a = dataset.run(folder, str(tmp_path / "a"), backbone=ext, epochs=3, resume=True, **SMALL)
    b = dataset.run(folder, str(tmp_path / "b"), backbone=ext, epochs=3, **SMALL)
    assert a.summary()["steps"] == b.summary()["steps"] == 9 and a.summary()["resumed_from"] == 3
    np.testing.assert_array_equal(a.table, b.table)                         # bit for bit
    assert a.summary()["history"] == b.summary()["history"]
    # a finished run re-opens without stepping and exports the same result
    c = dataset.run(folder, str(tmp_path / "b"), backbone=ext, epochs=3, resume=True, **SMALL)
    assert c.summary()["steps_this_run"] == 0
    np.testing.assert_array_equal(c.eigvecs, b.eigvecs)


def test_eigen_preset_raises_the_objective(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 8)
    res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), preset="eigen", epochs=3,
                      **{**SMALL, "batch_size": 8})
    h = np.asarray(res.summary()["history"])
    assert (h[:, 1] < h[:, 0]).all()                                        # −Brockett cost falls in every batch
    assert h[-1, 2] > h[0, 2]
    u = np.transpose(res.eigvecs, (0, 2, 3, 1)).reshape(-1, 6)
    np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, atol=1e-5)


def test_unreadable_and_non_image_files_are_reported(tmp_path, capsys):
    folder = make_folder(str(tmp_path / "imgs"), 6)
    make_folder(str(tmp_path / "imgs" / "sub"), 1, seed=1)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "imgs" / "text.png").write_text("hello")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), epochs=2, **SMALL)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [d["file"] for d in s["skipped"]] == ["broken.jpg", "text.png"]
    assert all("cannot read" in d["reason"] for d in s["skipped"])
    assert [d["file"] for d in s["ignored"]] == ["notes.txt"] and "not an image" in s["ignored"][0]["reason"]
    assert s["images"] == 7 and s["images_listed"] == 9 and os.path.join("sub", "img000.png") in res.names
    assert res.eigvecs.shape[0] == 7 and "broken.jpg" not in res.names
    err = capsys.readouterr().err
    assert err.count("skipping broken.jpg") == 1                            # reported once, not every epoch


def test_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(dataset.InputError, match="no such folder"):
        dataset.run(str(tmp_path / "nope"), str(tmp_path / "out"), backbone=synthetic())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(dataset.InputError, match="no image files"):
        dataset.run(str(tmp_path / "empty"), str(tmp_path / "out"), backbone=synthetic())
    folder = make_folder(str(tmp_path / "imgs"), 3)
    with pytest.raises(dataset.InputError, match="multiple of the patch"):
        dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), **{**SMALL, "size": 30})
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- crash


def _committed(ckdir):
    return [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 12)
    out = str(tmp_path / "killed")
    # the child reads each batch slowly (0.3 s) so that it is killed mid-run, between checkpoints 2 and 18
    child = CHILD_HEAD + textwrap.dedent(f"""
        from spectral_jax import folder as F
        import time
        slow = F.read_slots
        def read_slots(*a, **k):
            time.sleep(0.3)
            return slow(*a, **k)
        F.read_slots = read_slots
        dataset.run({folder!r}, {out!r}, backbone=synthetic(), epochs=6, checkpoint_every=1, **SMALL)
        print("FINISHED")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckdir = os.path.join(out, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and max(_committed(ckdir), default=0) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at_kill = max(_committed(ckdir))
    assert 3 <= at_kill < 18
    resumed = dataset.run(folder, out, backbone=synthetic(), epochs=6, resume=True, **SMALL)
    assert resumed.summary()["resumed_from"] >= 3 and resumed.summary()["steps"] == 18
    whole = dataset.run(folder, str(tmp_path / "whole"), backbone=synthetic(), epochs=6, **SMALL)
    np.testing.assert_array_equal(resumed.table, whole.table)
    np.testing.assert_array_equal(resumed.eigvecs, whole.eigvecs)


# ---------------------------------------------------------------------------------------------------- devices


def test_eight_devices_give_the_one_device_table(tmp_path):
    """Same process, 8 fake CPU devices: mesh of 8 vs mesh of 1. The kNN search, the inner solve and the row
    gathers do the same float operations on either mesh; only the forward's per-device batch differs (1 image vs
    8), which can change the accumulation order of its matmuls (last-bit differences, ~1e-7 relative), carried
    through 4 batches × 5 AdamW steps (Adam's normalised steps do not amplify them). Observed max difference
    6.6e-7 on logits of size ~1; rtol = atol = 1e-5 leaves a 15× margin and still catches any real divergence
    (a wrong row, edge or step moves entries by ≫ 1e-3)."""
    folder = make_folder(str(tmp_path / "imgs"), 16)
    child = CHILD_HEAD + textwrap.dedent(f"""
        assert len(jax.devices()) == 8, jax.devices()
        kw = dict(backbone=synthetic(), epochs=2, **{{**SMALL, "batch_size": 8}})
        one = dataset.run({folder!r}, {str(tmp_path / "one")!r}, mesh=dataset.make_mesh(jax.devices()[:1]), **kw)
        eight = dataset.run({folder!r}, {str(tmp_path / "eight")!r}, **kw)
        assert one.summary()["devices"] == 1 and eight.summary()["devices"] == 8
        np.savez({str(tmp_path / "tables.npz")!r}, one=one.table, eight=eight.table)
    """)
    eight = xla_flags("--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", child], env=_env(XLA_FLAGS=eight),
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    t = np.load(tmp_path / "tables.npz")
    diff = np.abs(t["one"] - t["eight"]).max()
    np.testing.assert_allclose(t["eight"], t["one"], rtol=1e-5, atol=1e-5, err_msg=f"max diff {diff}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(folder: str, out: str, run_call: str, head: str = "") -> None:
    """Run `dataset.run(folder, out, backbone=synthetic(), <run_call>)` in two processes on localhost (1 CPU device
    each, gloo collectives; `head`: extra imports); each records the image slots it read in OUT.read{i}.json."""
    port = _free_port()
    procs = []
    for i in range(2):
        child = textwrap.dedent(f"""
            import jax
            jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={i})
        """) + CHILD_HEAD + head + textwrap.dedent(f"""
            from spectral_jax import folder as F
            seen = []
            read = F.read_slots
            def read_slots(root, files, idx, *a):
                seen.extend(int(i) for i in idx if i >= 0)
                return read(root, files, idx, *a)
            F.read_slots = read_slots
            res = dataset.run({folder!r}, {out!r}, backbone=synthetic(), {run_call})
            assert res.summary()["devices"] == 2 and res.summary()["processes"] == 2
            json.dump(seen, open({out!r} + ".read{i}.json", "w"))
        """)
        procs.append(subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    try:
        errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    finally:
        for p in procs:                         # one failed process leaves the other waiting at a barrier
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)


def test_two_processes_give_the_one_process_result(tmp_path):
    """Two processes on localhost (1 CPU device each, gloo collectives) vs this process on one device. Each
    process reads only its own batch slots. Same tolerance argument as the 8-device test."""
    folder = make_folder(str(tmp_path / "imgs"), 10)
    out = str(tmp_path / "multi")
    run_two_processes(folder, out, "epochs=2, checkpoint_every=2, **SMALL")
    multi = dataset.load_result(out)
    single = dataset.run(folder, str(tmp_path / "single"), backbone=synthetic(), epochs=2,
                         mesh=dataset.make_mesh(jax.devices()[:1]), **SMALL)
    assert multi.names == single.names and multi.summary()["steps"] == single.summary()["steps"]
    np.testing.assert_allclose(multi.table, single.table, rtol=1e-5, atol=1e-5)
    # each process read only the images of its own slots (first / second half of every batch)
    reads = [json.load(open(f"{out}.read{i}.json")) for i in range(2)]
    expect = [[], []]
    for s in range(6):
        idx = dataset.batch_indices(0, s, 10, 4)
        expect[0] += [int(i) for i in idx[:2] if i >= 0]
        expect[1] += [int(i) for i in idx[2:] if i >= 0]
    assert reads == expect


# ---------------------------------------------------------------------------------------------------- CLI


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "spectral_jax", "dataset", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["missing", "empty", "model", "family", "size", "batch"])
def test_cli_bad_input_one_line_exit_2(tmp_path, case):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    (tmp_path / "empty").mkdir()
    args = {"missing": [str(tmp_path / "nope"), "--model", "dinov2_vits14"],
            "empty": [str(tmp_path / "empty"), "--model", "dinov2_vits14"],
            "model": [folder, "--model", "no_such_model"],
            "family": [folder, "--model", "dinov2_vits14", "--weights", "random", "--timesteps", "10"],
            "size": [folder, "--model", "dinov2_vits14", "--weights", "random", "--size", "50"],
            "batch": [folder, "--model", "dinov2_vits14", "--weights", "random", "--batch-size", "0"]}[case]
    r = _cli(*args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("spectral-jax dataset: error:"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_real_backbone_tiny(tmp_path):
    """The whole command on DINOv2-S/14 (random weights) at 56×56 (4×4 grid), 2 epochs."""
    folder = make_folder(str(tmp_path / "imgs"), 6)
    r = _cli(folder, "--model", "dinov2_vits14", "--weights", "random", "--graph", "knn-vv", "--size", "56",
             "--method", "gd", "--batch-size", "4", "--epochs", "2", "--num-eigs", "6", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["images"] == 6 and line["steps"] == 4
    with np.load(tmp_path / "out" / "eigvecs.npz") as f:
        assert f["eigvecs"].shape == (6, 6, 4, 4) and len(f["names"]) == 6
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["k_intra"] == 16 and s["k_inter"] == 48 and s["layers"] == "all" and s["grid"] == [4, 4]


def test_figure_layout_three_eigenvectors_per_rgb_tile(rng):
    e = rng.normal(size=(7, 16, 4, 4)).astype(np.float32)
    thumbs = [np.full((10, 10, 3), 200, np.uint8)] * 7
    fig = viz.dataset_figure(e, thumbs, num_vecs=15, tile=10, cols=3, titles=False)
    # 3 cells per row, each: image + 5 RGB tiles (1px apart), 6px between cells; 3 rows of cells
    assert fig.shape == (3 * (10 + 6), 3 * (6 * 11 - 1 + 6), 3)
    assert (fig[:10, :10] == 200).all()                                     # the image comes first
    # eigenvectors 1–3 of image 0 → the RGB channels of its first tile (percentile scaling is monotone)
    tile = fig[:10, 11:21].astype(float)
    small = viz.dataset_figure(e[:, :3], None, num_vecs=3, tile=4, cols=1, titles=False)
    for c in range(3):
        order = np.argsort(e[0, c].ravel())
        assert np.all(np.diff(small[:4, :4, c].astype(float).ravel()[order]) >= 0)
    assert tile.std() > 0


def test_global_eigvecs_orthonormal_and_spanning(rng):
    probs = rng.random((5, 4, 3, 3)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    u = dataset.global_eigvecs(probs)
    flat = np.transpose(u, (0, 2, 3, 1)).reshape(-1, 4)
    np.testing.assert_allclose(flat.T @ flat, np.eye(4), atol=1e-5)
    f = np.transpose(probs, (0, 2, 3, 1)).reshape(-1, 4)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    ref = np.linalg.svd(f, full_matrices=False)[0]
    np.testing.assert_allclose(np.abs(flat.T @ ref), np.eye(4), atol=1e-4)    # the SVD's left vectors, up to sign
