"""One set of options (`spectral_jax.options`): the specs refuse each bad value in one line, flat keywords and spec
objects give the same solve, one num_eigs rule holds at every entry point (API and CLI), and one layer-weights
syntax means the same for `analyze` and `dataset` (API and CLI), a layer a mapping leaves out weighing 0 in both.
Importing the options imports no JAX."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import dataset, solvers
from spectral_jax.errors import InputError
from spectral_jax.options import ExactSpec, GdSpec, GraphSpec, LayerWeights, specs
from test_dataset import make_folder
from test_dataset_badinput import EXT
from test_redteam_inputs import TAPS, TINY, _cli, place  # noqa: F401 (a fixture)

HEAVY = ("jax", "jaxlib", "flax", "optax", "torch")


def test_importing_the_options_imports_no_jax():
    code = ("import sys, spectral_jax.options, spectral_jax.dataset.settings, spectral_jax.layer_weights; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


BAD_SPECS = {
    "graph-kind": (lambda: GraphSpec("xx"), "graph 'xx': unknown graph"),
    "tau-0": (lambda: GraphSpec("vv", tau=0), "tau 0: must be a finite number > 0"),
    "tau-nan": (lambda: GraphSpec("vv", tau=float("nan")), "tau nan"),
    "tau-str": (lambda: GraphSpec("vv", tau="0.1"), "tau '0.1'"),
    "k-intra-negative": (lambda: GraphSpec("knn-qk", k_intra=-1), "k_intra -1: must be an integer ≥ 0"),
    "k-inter-float": (lambda: GraphSpec("knn-qk", k_inter=2.5), "k_inter 2.5"),
    "k-both-0": (lambda: GraphSpec("knn-qk", k_intra=0, k_inter=0), "no edges"),
    "min-cos-1": (lambda: GraphSpec("knn-qk", min_cos=1.0), "min_cos 1.0: must be in [-1, 1)"),
    "dtype": (lambda: GraphSpec("qk", dtype="float16"), "graph_dtype 'float16'"),
    "exact-tol-0": (lambda: ExactSpec(tol=0), "tol 0: must be a finite number > 0"),
    "exact-maxiter-0": (lambda: ExactSpec(maxiter=0), "maxiter 0: must be an integer ≥ 1"),
    "exact-batch-negative": (lambda: ExactSpec(batch_images=-1), "batch_images -1"),
    "gd-preset": (lambda: GdSpec(preset="fast"), "preset 'fast': unknown preset"),
    "gd-param": (lambda: GdSpec(preset="eigen", param="conv"), "param 'conv': does not fit the preset"),
    "gd-steps-0": (lambda: GdSpec(steps=0), "steps 0: must be an integer ≥ 1"),
    "gd-lr-negative": (lambda: GdSpec(lr=-1.0), "lr -1.0"),
    "gd-sample-0": (lambda: GdSpec(sample=0.0), "sample 0.0: must be a fraction in (0, 1]"),
    "gd-lam-negative": (lambda: GdSpec(lam=-1), "lam -1"),
    "gd-tol-inf": (lambda: GdSpec(tol=float("inf")), "tol inf"),
    "gd-optimizer": (lambda: GdSpec(optimizer="adam"), "not an optax GradientTransformation"),
    "lw-text": (lambda: LayerWeights.parse("best"), "layer_weights 'best': is not a rule"),
    "lw-pair": (lambda: LayerWeights.parse("11:x"), "LAYER:WEIGHT"),
    "lw-twice": (lambda: LayerWeights.parse("0:1,0:2"), "gives layer 0 twice"),
    "lw-zero": (lambda: LayerWeights.parse("0,0"), "not all 0"),
    "lw-inf": (lambda: LayerWeights.parse({3: float("inf")}), "finite"),
    "lw-untapped": (lambda: LayerWeights.parse("9:1").resolve([0, 1]), "names layer 9"),
    "lw-count": (lambda: LayerWeights.parse("1,2,3").resolve([0, 1]), "need one per tapped layer"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_each_bad_option_is_one_input_error_line(case):
    fn, needle = BAD_SPECS[case]
    with pytest.raises(InputError) as e:
        fn()
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_specs_are_frozen_and_flat_keywords_become_them_once():
    g, s = specs("vv", "gd", tau=0.05, graph_dtype="bfloat16", steps=7, preset="paper")
    assert g == GraphSpec("vv", tau=0.05, dtype="bfloat16") and s == GdSpec(preset="paper", steps=7)
    with pytest.raises(Exception):
        g.tau = 1.0                                         # frozen: checked once, never changed after
    with pytest.raises(TypeError, match="bogus"):
        specs("qk", "exact", bogus=1)
    with pytest.raises(InputError, match="steps: apply to the other method"):
        sj.solve(TAPS, "qk", 3, steps=5)                    # exact would ignore it
    with pytest.raises(InputError, match="beside graph=GraphSpec"):
        sj.solve(TAPS, GraphSpec("vv"), 3, tau=0.2)          # which tau would win?
    with pytest.raises(InputError, match="beside solver="):
        sj.solve(TAPS, "qk", 3, solver=GdSpec(), steps=5)


def test_spec_objects_and_flat_keywords_give_the_same_solve():
    flat = sj.solve(TAPS, "vv", 3, tau=0.05, tol=1e-5)
    objs = sj.solve(TAPS, GraphSpec("vv", tau=0.05), 3, solver=ExactSpec(tol=1e-5))
    np.testing.assert_array_equal(flat.eigvals, objs.eigvals)
    gd_flat = sj.solve(TAPS, "qk", 3, "gd", steps=5, seed=1)
    gd_objs = sj.solve(TAPS, "qk", 3, solver=GdSpec(steps=5), seed=1)
    np.testing.assert_array_equal(gd_flat.eigvecs, gd_objs.eigvecs)
    sw = sj.sweep(TAPS, [(0, 1)], GraphSpec("vv", tau=0.05), 3)
    assert sw[0].provenance.layers == (0, 1)


# ------------------------------------------------------------------------------------------------ one K rule


def _two_layer_backbone():
    from spectral_jax.models import Backbone

    def fn(params, images, layers):
        n = (images.shape[1] // 14) * (images.shape[2] // 14)
        return {l: tuple(params[l][:, :, :n] for _ in range(3)) for l in layers}

    rng = np.random.default_rng(1)
    params = {l: rng.normal(size=(1, 2, 6, 8)).astype(np.float32) for l in (0, 1)}
    return Backbone.from_function("two", fn, params, patch_size=14, num_layers=2, size=28)


def test_num_eigs_1_is_refused_at_every_api_entry_point():
    """`sj.solve(taps, num_eigs=1)` ran while `analyze(num_eigs=1)` was refused (four lower bounds): one rule now,
    K an integer ≥ 2 (`options.check_num_eigs`), the same line everywhere."""
    g = sj.graphs.from_taps(TAPS, "qk", image=0)
    entries = {
        "solve": lambda: sj.solve(TAPS, "qk", 1),
        "solve-gd": lambda: sj.solve(TAPS, "qk", 1, "gd", steps=3),
        "sweep": lambda: sj.sweep(TAPS, None, "qk", 1),
        "attribution": lambda: sj.attribution(TAPS, "qk", 1),
        "analyze": lambda: sj.analyze(sj.io.SAMPLE, backbone=_two_layer_backbone(), num_eigs=1),
        "exact": lambda: solvers.exact.exact(g, 1),
        "gd": lambda: solvers.gd.gd(g, 1, steps=3),
        "dataset": lambda: dataset.Settings(num_eigs=1),
    }
    for name, fn in entries.items():
        with pytest.raises(InputError, match="must be an integer ≥ 2 \\(the first eigenvector is trivial\\)"):
            fn()
    with pytest.raises(InputError, match="must be smaller than the 16 graph nodes"):
        sj.solve(TAPS, "qk", 16)                              # above: K < the graph's nodes, where it is known


def test_cli_num_eigs_1_is_one_line_for_every_command(place, tmp_path):
    cases = {
        "solve": ["solve", "acts.npz", "--graph", "qk", "--num-eigs", "1", "--out", tmp_path / "s.npz"],
        "analyze": ["analyze", "img.png", *TINY, "--num-eigs", "1", "--out", tmp_path / "a"],
        "dataset": ["dataset", "imgs", *TINY, "--num-eigs", "1", "--out", tmp_path / "d"],
    }
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(cases, pool.map(lambda a: _cli(a, place), cases.values())))
    for name, r in runs.items():
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, (name, r.stderr[-2000:])
        assert "--num-eigs 1: must be an integer ≥ 2" in lines[0], (name, lines[0])
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ one layer-weights syntax

# the same three texts for both commands with the layers given as 1,0: numbers pair with that order, a pair names
# its layer, a layer left out weighs 0 — per-layer weights in ascending layer order (0, 1)
SYNTAX = {"numbers": ("1,0.5", [1 / 3, 2 / 3]), "pairs": ("1:1,0:0.5", [1 / 3, 2 / 3]), "missing": ("1:1", [0.0, 1.0])}


def test_layer_weights_mean_the_same_to_analyze_and_dataset_api(tmp_path):
    bb = _two_layer_backbone()
    folder = make_folder(str(tmp_path / "imgs"), 3)
    small = dict(size=32, batch_size=4, num_eigs=3, k_intra=5, k_inter=5, figure_images=0, layers="1,0")
    for name, (text, want) in SYNTAX.items():
        for spec in (text, {1: 1.0, 0: 0.5} if name == "pairs" else [1, 0.5] if name == "numbers" else {1: 1}):
            res = sj.analyze(sj.io.SAMPLE, backbone=bb, layers=[1, 0], layer_weights=spec, num_eigs=3)
            np.testing.assert_allclose(res.info["layer_weights"], want, atol=1e-6, err_msg=f"analyze {spec!r}")
            np.testing.assert_allclose(res.provenance.layer_weights[0], want, atol=1e-12)
        out = dataset.run(folder, str(tmp_path / name), backbone=EXT, layer_weights=text, **small)
        got = out.summary["layer_weights"]["weights"]
        np.testing.assert_allclose([got["0"], got["1"]], want, atol=1e-6, err_msg=f"dataset {text!r}")


def test_layer_weights_mean_the_same_to_analyze_and_dataset_cli(place, tmp_path):
    """analyze took `1,0.5` paired with --layers, dataset `11:1,10:0.5` with a missing layer weighing 1: now both
    take all three forms, with the same meaning (a missing layer weighs 0)."""
    cases = {}
    for name, (text, _) in SYNTAX.items():
        cases[f"analyze-{name}"] = ["analyze", "img.png", *TINY, "--layers", "1,0", "--num-eigs", "3",
                                    f"--layer-weights={text}", "--out", tmp_path / f"analyze-{name}"]
        cases[f"dataset-{name}"] = ["dataset", "imgs", *TINY, "--layers", "1,0", "--num-eigs", "3", "--batch-size",
                                    "3", f"--layer-weights={text}", "--out", tmp_path / f"dataset-{name}"]
    with ThreadPoolExecutor(2) as pool:
        runs = dict(zip(cases, pool.map(lambda a: _cli(a, place), cases.values())))
    for name, (_, want) in SYNTAX.items():
        a, d = runs[f"analyze-{name}"], runs[f"dataset-{name}"]
        assert a.returncode == 0 and d.returncode == 0, (name, a.stderr[-2000:], d.stderr[-2000:])
        got_a = json.loads((tmp_path / f"analyze-{name}" / "img" / "summary.json").read_text())["layer_weights"]
        got_d = json.loads((tmp_path / f"dataset-{name}" / "summary.json").read_text())["layer_weights"]["weights"]
        np.testing.assert_allclose(got_a, want, atol=1e-6, err_msg=name)
        np.testing.assert_allclose([got_d["0"], got_d["1"]], want, atol=1e-6, err_msg=name)


def test_dataset_settings_take_the_same_spec_objects():
    """`dataset.run`/`Settings` kept their flat keywords and take the objects `solve` takes: graph=GraphSpec,
    solver=ExactSpec/GdSpec, read into the same fields; a spec beside its own fields, or with an option the
    dataset does not read, is one line."""
    flat = dataset.Settings(graph="knn-vv", k_intra=5, min_cos=0.2, method="gd", preset="eigen", lr=0.1)
    objs = dataset.Settings(graph=GraphSpec("knn-vv", k_intra=5, min_cos=0.2), solver=GdSpec(preset="eigen", lr=0.1))
    assert objs == flat and objs.result_fields() == flat.result_fields()
    assert dataset.Settings(solver=ExactSpec(tol=1e-5, maxiter=9)) == dataset.Settings(tol=1e-5, maxiter=9)
    for bad, needle in ((dict(graph=GraphSpec("knn-vv"), k_intra=3), "k_intra: are given beside graph="),
                        (dict(solver=GdSpec(steps=4)), "steps: are given beside solver=, or are not read"),
                        (dict(solver=ExactSpec(), tol=1e-3), "tol: are given beside solver="),
                        (dict(graph=GraphSpec("qk")), "graph 'qk': not a dataset graph")):
        with pytest.raises(InputError, match=needle):
            dataset.Settings(**bad)
