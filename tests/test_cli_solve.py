"""`spectral-jax solve`: the contract of docs/design.md — RESULT.npz + one JSON line; bad input → one line, exit 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sjtest import planted_qk

from spectral_jax.acts import save_acts
from spectral_jax.cli import main
from spectral_jax.taps import LayerTap, Taps


def _acts(path, rng, batch=1, grid=(6, 6), layers=2):
    q, k, _ = planted_qk(rng, grid, groups=3, layers=layers, heads=2, dim=8)
    q = np.repeat(q[:, None], batch, 1)
    k = np.repeat(k[:, None], batch, 1)
    taps = Taps({i: LayerTap(q[i], k[i], q[i] + k[i], grid, 0) for i in range(layers)})
    save_acts(str(path), taps, "test", (grid[0] * 14, grid[1] * 14))
    return path


@pytest.mark.parametrize("graph", ["qk", "vv", "knn-qk", "knn-vv"])
def test_solve_writes_result_and_json(tmp_path, rng, capsys, graph):
    acts = _acts(tmp_path / "a.npz", rng, batch=2)
    out = tmp_path / "r.npz"
    knn = ["--k-intra", "10"] if graph.startswith("knn") else []
    assert main(["solve", str(acts), "--graph", graph, "--num-eigs", "4", *knn, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("objective", "seconds", "method", "num_eigs", "steps"):
        assert key in summary
    with np.load(out) as f:
        assert f["eigvecs"].shape == (2, 4, 6, 6)
        assert np.all(np.isfinite(f["eigvecs"]))
        # DESIGN.md: eigvals [K] for a joint kNN solve (one solve's values); 2 images solved one by one: [B, K]
        assert f["eigvals"].shape == ((4,) if graph.startswith("knn") else (2, 4))


def test_solve_gd_paper(tmp_path, rng, capsys):
    acts = _acts(tmp_path / "a.npz", rng)
    out = tmp_path / "r.npz"
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--method", "gd", "--preset", "paper",
                 "--param", "conv", "--steps", "20", "--seed", "1", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "gd-paper"


def _expect_exit2(capsys, argv, out, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".tmp-")]


def test_solve_bad_inputs_exit_2(tmp_path, rng, capsys):
    out = str(tmp_path / "r.npz")
    # malformed npz
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    _expect_exit2(capsys, ["solve", str(bad), "--graph", "qk", "--out", out], out, "not a readable .npz")
    # missing file
    _expect_exit2(capsys, ["solve", str(tmp_path / "nope.npz"), "--graph", "qk", "--out", out], out, "no such file")
    # mismatched shapes: q has 30 tokens for a 6×6 grid
    q = np.zeros((1, 2, 30, 8), np.float32)
    np.savez(tmp_path / "shape.npz", **{"layer0/q": q, "layer0/k": q, "layer0/v": q, "layer0/grid": np.array([6, 6])})
    _expect_exit2(capsys, ["solve", str(tmp_path / "shape.npz"), "--graph", "qk", "--out", out], out, "grid")
    # NaN
    q = rng.normal(size=(1, 2, 36, 8)).astype(np.float32)
    q[0, 0, 3, 1] = np.nan
    np.savez(tmp_path / "nan.npz", **{"layer0/q": q, "layer0/k": q, "layer0/v": q, "layer0/grid": np.array([6, 6])})
    _expect_exit2(capsys, ["solve", str(tmp_path / "nan.npz"), "--graph", "qk", "--out", out], out, "NaN")
    # K ≥ N
    acts = _acts(tmp_path / "a.npz", rng)
    _expect_exit2(capsys, ["solve", str(acts), "--graph", "qk", "--num-eigs", "36", "--out", out], out, "--num-eigs")
    # bad option values
    _expect_exit2(capsys, ["solve", str(acts), "--graph", "vv", "--tau", "0", "--out", out], out, "--tau")
    # a graph option the graph does not read: refused, not ignored
    _expect_exit2(capsys, ["solve", str(acts), "--graph", "qk", "--tau", "0.5", "--out", out], out,
                  "--tau: is not read by the qk graph")
    _expect_exit2(capsys, ["solve", str(acts), "--graph", "vv", "--k-intra", "5", "--k-inter", "3", "--out", out],
                  out, "--k-intra, --k-inter: are not read by the vv graph")
    _expect_exit2(capsys, ["solve", str(acts), "--graph", "knn-vv", "--tau", "0.5", "--out", out], out,
                  "use the vv graph")
    _expect_exit2(capsys, ["solve", str(acts), "--graph", "qk", "--preset", "paper", "--out", out], out, "gd")


def test_console_script_runs_and_exits_2_on_unknown_graph(tmp_path, rng):
    acts = _acts(tmp_path / "a.npz", rng)
    out = tmp_path / "r.npz"
    exe = [sys.executable, "-m", "spectral_jax"]
    ok = subprocess.run(exe + ["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["num_eigs"] == 3
    bad = subprocess.run(exe + ["solve", str(acts), "--graph", "xx", "--out", str(tmp_path / "z.npz")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_solve_layers_layer_weights_graph_dtype_as_the_api(tmp_path, rng, capsys):
    """--layers (a subset of the file's layers, in the order given), --layer-weights (numbers pair with that
    order) and --graph-dtype: the same result as `sj.solve` on those layers with those options."""
    import spectral_jax as sj
    from spectral_jax.acts import load_acts

    acts = _acts(tmp_path / "a.npz", rng, layers=3)
    out = tmp_path / "r.npz"
    assert main(["solve", str(acts), "--graph", "vv", "--num-eigs", "4", "--layers", "2,0", "--layer-weights",
                 "1,0.5", "--graph-dtype", "bfloat16", "--out", str(out)]) == 0
    taps = load_acts(str(acts)).taps
    sub = Taps({i: taps.layers[i] for i in (0, 2)})
    want = sj.solve(sub, sj.GraphSpec("vv", dtype="bfloat16"), 4, layer_weights={2: 1.0, 0: 0.5})
    with np.load(out) as f:
        np.testing.assert_array_equal(f["eigvals"], want.eigvals[0])
        np.testing.assert_array_equal(f["eigvecs"], want.eigvecs)
        np.testing.assert_array_equal(f["provenance/layers"], [0, 2])
        np.testing.assert_allclose(f["provenance/layer_weights"], [1 / 3, 2 / 3])
    capsys.readouterr()
    for argv, needle in ((["--layers", "5"], "--layers 5: names layer(s) 5 the file does not hold"),
                         (["--layers", "a,b"], "--layers a,b: is not 'all'"),
                         (["--layer-weights", "1,2"], "--layer-weights (2 numbers)"),
                         (["--graph-dtype", "float16"], "--graph-dtype")):
        code = None
        try:
            code = main(["solve", str(acts), "--graph", "vv", "--num-eigs", "4", *argv, "--out",
                         str(tmp_path / "x.npz")])
        except SystemExit as e:                                    # argparse's choices: exit 2 with usage
            code = e.code
        assert code == 2 and needle in capsys.readouterr().err, argv
        assert not (tmp_path / "x.npz").exists()
