"""Dataset bad input (issue #10): K and k against the graph, OUT against FOLDER and the disk, folders without a
readable image, every numeric option, and what a failed run leaves behind.

CLI cases run the installed `spectral-jax` console script, as a user does, with a tiny random-weight DINOv2-S at
28×28 (a 2×2 grid): exit 2, exactly one stderr line, nothing written. `dataset.run` cases use the synthetic
backbone of test_dataset (32×32 inputs → a 4×4 grid, 16 tokens per image).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from spectral_jax import dataset
from spectral_jax import folder as F
from test_dataset import SMALL, _env, make_folder, synthetic

EXT = synthetic()      # one object: runs with equal settings and image counts reuse its compiled step (JAX's cache)
SCRIPT = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
TINY = ["--model", "dinov2_vits14", "--weights", "random", "--size", "28", "--method", "gd", "--epochs", "1", "--batch-size", "2",
        "--num-eigs", "3"]                   # k_intra/k_inter: the defaults (50, clamped to 4 and 4 tokens)


def _cli(*args, timeout=300):
    assert os.path.isfile(SCRIPT), f"the console script is not installed next to {sys.executable}"
    return subprocess.run([SCRIPT, "dataset", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_line_exit_2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spectral-jax dataset: error:"), r.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == ""


def _tree(root):
    """{relative path: bytes, "-> target" (link) or None (folder)} of everything under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        for x in dirs:
            out[os.path.relpath(os.path.join(d, x), root)] = None
        for x in files:
            path = os.path.join(d, x)
            if os.path.islink(path):
                out[os.path.relpath(path, root)] = "-> " + os.readlink(path)
                continue
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Shared read-only inputs: imgs/ (3 PNGs), one/ (1 PNG), bad/ (3 corrupt .jpg), txt/ (no image), afile."""
    root = tmp_path_factory.mktemp("inputs")
    make_folder(str(root / "imgs"), 3)
    make_folder(str(root / "one"), 1)
    (root / "bad").mkdir()
    for i in range(3):
        (root / "bad" / f"b{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg " + bytes([i]))
    (root / "bad" / "notes.txt").write_text("x")
    (root / "txt").mkdir()
    (root / "txt" / "a.txt").write_text("x")
    (root / "afile").write_text("keep me")
    return root


# ------------------------------------------------------------------------------------------------- CLI, one line

CASES = {
    # 1. K and k against the graph (one image at 28×28: a 4-node graph per batch)
    "num-eigs-10000": (["one", "--num-eigs", "10000", "--k-inter", "0"], ["--num-eigs", "4 nodes"]),
    "k-intra-over-tokens": (["imgs", "--k-intra", "5"], ["--k-intra", "4 tokens"]),
    "k-inter-one-image": (["one", "--k-inter", "2"], ["--k-inter", "0 tokens"]),
    "no-edges": (["imgs", "--k-intra", "0", "--k-inter", "0"], ["--k-intra"]),
    "no-edges-clamped": (["one", "--batch-size", "1", "--k-intra", "0"], ["no edges"]),
    # 3. no readable image, no image at all
    "all-corrupt": (["bad"], ["no readable images", "b0.jpg"]),
    "no-images": (["txt"], ["no image files"]),
    # 4. numeric options
    "min-cos-nan": (["imgs", "--min-cos", "nan"], ["--min-cos", "nan"]),
    "min-cos-1": (["imgs", "--min-cos", "1"], ["--min-cos"]),
    "lr-inf": (["imgs", "--lr", "inf"], ["--lr"]),
    "lr-negative": (["imgs", "--lr", "-1"], ["--lr"]),
    "ema-1": (["imgs", "--ema", "1"], ["--ema"]),
    "seed-negative": (["imgs", "--seed", "-1"], ["--seed"]),
    "epochs-0": (["imgs", "--epochs", "0"], ["--epochs"]),
    "process-id": (["imgs", "--num-processes", "2", "--process-id", "2"], ["--process-id"]),
    "layer-weights-pair": (["imgs", "--layer-weights", "11:x"], ["--layer-weights", "LAYER:WEIGHT"]),
    "layer-weights-rule": (["imgs", "--layer-weights", "best"], ["--layer-weights 'best'", "eigengap"]),
    "layer-weights-rule-gd": (["imgs", "--method", "gd", "--layer-weights", "select"], ["--layer-weights"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input(place, tmp_path, case):
    args, needles = CASES[case]
    folder, extra = args[0], args[1:]
    r = _cli(str(place / folder), *TINY, *extra, "--out", str(tmp_path / "out"))
    _one_line_exit_2(r, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_cli_out_in_the_input_folder_is_refused(tmp_path, where):
    folder = make_folder(str(tmp_path / "imgs"), 3)
    before = _tree(folder)
    out = folder if where == "same" else os.path.join(folder, "run")
    _one_line_exit_2(_cli(folder, *TINY, "--out", out), "--out", "input folder")
    assert _tree(folder) == before


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_cli_unwritable_out_is_refused_before_the_model(place, tmp_path, where):
    target = tmp_path / "target"
    target.write_text("keep me")
    out = target if where == "file" else target / "sub"
    _one_line_exit_2(_cli(str(place / "imgs"), *TINY, "--out", str(out), timeout=120), "--out")
    assert target.read_text() == "keep me"


def test_cli_read_only_out_is_refused_before_the_model(place, tmp_path, monkeypatch, capsys):
    """A read-only --out folder, simulated (tests run as root in CI, who writes anywhere): no file can be created
    in it. One line, exit 2, before the backbone loads, nothing written."""
    import tempfile

    from spectral_jax import models
    from spectral_jax.cli import main

    target = tmp_path / "target"
    target.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(target):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **k)

    loads = []
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(models, "load_backbone", lambda *a, **k: loads.append(a))
    assert main(["dataset", str(place / "imgs"), *TINY, "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spectral-jax dataset: error: --out") and "Permission denied" in err[0]
    assert loads == [] and list(target.iterdir()) == []


def test_cli_rerun_says_how_to_resume_or_start_over_and_resume_works(place, tmp_path):
    out = str(tmp_path / "out")
    first = _cli(str(place / "imgs"), *TINY, "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    _one_line_exit_2(_cli(str(place / "imgs"), *TINY, "--out", out), "--resume", "start over")
    again = _cli(str(place / "imgs"), *TINY, "--out", out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = (json.loads(r.stdout.splitlines()[-1]) for r in (first, again))
    a.pop("seconds"), b.pop("seconds")
    assert a == b and a["steps"] == 2 and a["images"] == 3                  # the finished run, re-exported


# ------------------------------------------------------------------------------------------------- dataset.run

BAD_RUN = {
    "num_eigs": (dict(num_eigs=2.5), "--num-eigs"),
    "num_eigs_1": (dict(num_eigs=1), "--num-eigs"),
    "batch_size": (dict(batch_size=0), "--batch-size"),
    "inner_steps": (dict(inner_steps=0), "--inner-steps"),
    "lr_nan": (dict(lr=float("nan")), "--lr"),
    "lr_zero": (dict(lr=0.0), "--lr"),
    "lr_str": (dict(lr="0.1"), "--lr"),
    "weight_decay": (dict(weight_decay=-1.0), "weight_decay"),
    "ema_nan": (dict(ema=float("nan")), "--ema"),
    "ema_neg": (dict(ema=-0.1), "--ema"),
    "min_cos_nan": (dict(min_cos=float("nan")), "--min-cos"),
    "min_cos_low": (dict(min_cos=-1.5), "--min-cos"),
    "lam_inf": (dict(lam=float("inf")), "lam"),
    "k_intra_neg": (dict(k_intra=-1), "--k-intra"),
    "k_both_0": (dict(k_intra=0, k_inter=0), "--k-intra"),
    "k_bool": (dict(k_intra=True), "--k-intra"),
    "layer_weights_nan": (dict(layer_weights={0: float("nan")}), "--layer-weights"),
    "layer_weights_zero": (dict(layer_weights={0: 0.0, 1: 0.0}), "--layer-weights"),
    "layer_weights_rule": (dict(layer_weights="best"), "--layer-weights"),
    "seed_neg": (dict(seed=-1), "--seed"),
    "seed_big": (dict(seed=2 ** 32), "--seed"),
    "epochs": (dict(epochs=0), "--epochs"),
    "checkpoint_every": (dict(checkpoint_every=0), "--checkpoint-every"),
    "prefetch": (dict(prefetch=0), "--prefetch"),
    "size_str": (dict(size="abc"), "size"),
    "size_one": (dict(size=(112,)), "size"),
    "num_eigs_nodes": (dict(num_eigs=17), "16 nodes"),            # one image × 16 tokens
    "k_intra_tokens": (dict(k_intra=17), "16 tokens"),
    "k_inter_others": (dict(k_inter=1), "0 tokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN))
def test_run_validates_before_anything_is_written(tmp_path, monkeypatch, case):
    folder = make_folder(str(tmp_path / "imgs"), 1)
    kw, needle = BAD_RUN[case]
    monkeypatch.setattr(dataset.step, "compile_step", lambda *a: pytest.fail("compiled despite bad input"))
    with pytest.raises(dataset.InputError, match=needle.replace("-", r"\-")):
        dataset.run(folder, str(tmp_path / "out"), backbone=EXT, **{**SMALL, "k_inter": 0, **kw})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, images, num_eigs", [("gd", 1, 16), ("exact", 3, 47)])
def test_num_eigs_up_to_the_nodes_of_a_batch_runs(tmp_path, method, images, num_eigs):
    """K at its bound runs and gives K orthonormal eigenvectors: gd K = the 16 nodes of its one-image batch graph
    (the paper preset's global SVD: orthonormal over all pixels; its convergence is the loss settling over epochs,
    which one epoch cannot show); exact K = 47 < the 48 nodes of the whole dataset's graph, every pair converged
    (relative residual ≤ tol)."""
    folder = make_folder(str(tmp_path / "imgs"), images)
    res = dataset.run(folder, str(tmp_path / "out"), backbone=EXT, **({"epochs": 1} if method == "gd" else {}),
                      **{**SMALL, "method": method, "num_eigs": num_eigs, "k_intra": 16, "k_inter": None})
    assert res.eigvecs.shape == (images, num_eigs, 4, 4) and np.isfinite(res.eigvecs).all()
    assert res.summary()["k_inter"] == 16 * (3 if method == "gd" else images - 1)   # the default, clamped
    v = res.eigvecs.transpose(1, 0, 2, 3).reshape(num_eigs, -1).astype(np.float64)    # [K, all pixels]
    np.testing.assert_allclose(v @ v.T, np.eye(num_eigs), atol=1e-4)                 # VᵀV = I
    if method == "exact":
        conv = res.summary()["convergence"]
        assert conv["converged"] and len(conv["residuals"]) == num_eigs
        assert max(conv["residuals"]) <= conv["tol"], conv
        assert np.all(np.diff(res.eigvals[0]) <= 0) and res.eigvals.shape == (images, num_eigs)


@pytest.mark.parametrize("where", ["same", "inside", "file", "under-file", "dangling-link", "empty"])
def test_out_checked_against_the_folder_and_the_disk(tmp_path, where):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    (tmp_path / "f").write_text("keep")
    out = {"same": folder, "inside": os.path.join(folder, "a", "b"), "file": str(tmp_path / "f"),
           "under-file": str(tmp_path / "f" / "x"), "dangling-link": str(tmp_path / "link"), "empty": ""}[where]
    if where == "dangling-link":
        os.symlink(tmp_path / "nowhere", out)
    before = _tree(str(tmp_path))
    with pytest.raises(dataset.InputError, match="--out"):
        dataset.run(folder, out, backbone=EXT, **SMALL)
    assert _tree(str(tmp_path)) == before


def test_out_not_writable_is_refused(tmp_path, monkeypatch):
    """A probe file that cannot be created (EACCES, as in a read-only folder for a non-root user)."""
    import tempfile

    folder = make_folder(str(tmp_path / "imgs"), 2)
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir == str(tmp_path):
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(dataset.InputError, match="cannot write in .*Permission denied"):
        dataset.run(folder, str(tmp_path / "new" / "out"), backbone=EXT, **SMALL)
    assert not (tmp_path / "new").exists()


def test_output_name_of_the_wrong_kind_is_refused(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    (tmp_path / "out" / "summary.json").mkdir(parents=True)
    with pytest.raises(dataset.InputError, match="summary.json: exists and is not a file"):
        dataset.run(folder, str(tmp_path / "out"), backbone=EXT, **SMALL)


# ------------------------------------------------------------------------------------------------- failed runs


class Boom(RuntimeError):
    pass


def _fail_at(monkeypatch, step):
    """Reading the batch of global step `step` raises (the prefetcher hands it to the loop at that step)."""
    read = F.read_slots
    calls = {"n": 0}

    def read_slots(*a, **k):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise Boom(f"disk gone at step {step}")
        return read(*a, **k)

    monkeypatch.setattr(F, "read_slots", read_slots)


@pytest.mark.parametrize("existing", [False, True])
def test_failure_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, existing):
    folder = make_folder(str(tmp_path / "imgs"), 10)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    _fail_at(monkeypatch, 1)
    with pytest.raises(Boom):
        dataset.run(folder, str(out), backbone=EXT, epochs=1, checkpoint_every=2, **SMALL)
    assert (list(out.iterdir()) == []) if existing else not out.exists()
    monkeypatch.undo()
    res = dataset.run(folder, str(out), backbone=EXT, epochs=1, **SMALL)    # a plain rerun works
    assert res.summary()["steps"] == 3


def test_failure_after_a_checkpoint_keeps_it_and_resume_finishes_the_same_table(tmp_path, monkeypatch):
    folder = make_folder(str(tmp_path / "imgs"), 10)
    out = str(tmp_path / "out")
    ext = EXT
    _fail_at(monkeypatch, 3)
    with pytest.raises(Boom):
        dataset.run(folder, out, backbone=ext, epochs=2, checkpoint_every=2, **SMALL)
    monkeypatch.undo()
    with pytest.raises(dataset.InputError, match=r"step 2\) — pass --resume .* delete .*checkpoints to start over"):
        dataset.run(folder, out, backbone=ext, epochs=2, checkpoint_every=2, **SMALL)
    resumed = dataset.run(folder, out, backbone=ext, epochs=2, checkpoint_every=2, resume=True, **SMALL)
    whole = dataset.run(folder, str(tmp_path / "whole"), backbone=ext, epochs=2, checkpoint_every=2, **SMALL)
    assert resumed.summary()["resumed_from"] == 2 and resumed.summary()["steps"] == 6
    np.testing.assert_array_equal(resumed.table, whole.table)


@pytest.mark.parametrize("existing", [False, True])
def test_no_image_readable_during_the_run_leaves_nothing(tmp_path, monkeypatch, existing):
    """The up-front check passed (files replaced underneath): the run stops after epoch 1, checkpoints removed."""
    folder = str(tmp_path / "bad")
    os.makedirs(folder)
    for i in range(6):
        (tmp_path / "bad" / f"b{i}.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    monkeypatch.setattr(F, "first_readable", lambda root, files: (0, ""))
    with pytest.raises(dataset.InputError, match="no readable images: none of its 6"):
        dataset.run(folder, str(out), backbone=EXT, epochs=3, checkpoint_every=1, **SMALL)
    assert (list(out.iterdir()) == []) if existing else not out.exists()


def test_first_readable_reads_until_one_decodes(tmp_path):
    make_folder(str(tmp_path), 2)
    (tmp_path / "a.png").write_bytes(b"junk")
    files, _ = F.scan(str(tmp_path))
    assert files[0] == "a.png"
    i, why = F.first_readable(str(tmp_path), files)
    assert i == 1 and why.startswith("a.png: cannot read")
    assert F.first_readable(str(tmp_path), files[:1]) == (None, why)


def test_scan_walks_each_linked_folder_once(tmp_path):
    make_folder(str(tmp_path / "imgs"), 2)
    make_folder(str(tmp_path / "imgs" / "sub"), 1)
    os.symlink("..", tmp_path / "imgs" / "sub" / "up")                # a cycle
    os.symlink("sub", tmp_path / "imgs" / "again")                    # a second way into sub/
    files, ignored = F.scan(str(tmp_path / "imgs"))
    assert files == ["again/img000.png", "img000.png", "img001.png"]
    assert sorted(d["file"] for d in ignored) == [os.path.join("again", "up") + os.sep, "sub" + os.sep]


def test_failure_while_exporting_keeps_the_run_and_resume_exports_it(tmp_path, monkeypatch):
    from spectral_jax import viz

    folder = make_folder(str(tmp_path / "imgs"), 10)
    out = str(tmp_path / "out")

    def save_png(*a, **k):
        raise Boom("disk full")

    monkeypatch.setattr(viz, "save_png", save_png)
    with pytest.raises(Boom):
        dataset.run(folder, out, backbone=EXT, epochs=1, **{**SMALL, "figure_images": 4})
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["checkpoints"]                       # no half export beside them
    with pytest.raises(dataset.InputError, match="holds no eigvecs.npz"):
        dataset.load_result(out)
    res = dataset.run(folder, out, backbone=EXT, epochs=1, resume=True, **{**SMALL, "figure_images": 4})
    assert res.summary()["steps_this_run"] == 0 and res.summary()["steps"] == 3
    assert dataset.load_result(out).names == res.names


def test_load_result_without_summary_is_one_line(tmp_path):
    np.savez(tmp_path / "eigvecs.npz", eigvecs=np.zeros((1, 2, 2, 2), np.float32))
    with pytest.raises(dataset.InputError, match="incomplete export .* --resume"):
        dataset.load_result(str(tmp_path))


def test_thumbnail_of_a_file_gone_since_the_run_is_grey(tmp_path):
    make_folder(str(tmp_path), 1)
    ok, gone = dataset.thumbnails(str(tmp_path), ["img000.png", "gone.png"], 8)
    assert ok.shape == gone.shape == (8, 8, 3) and (gone == 128).all() and ok.std() > 0
