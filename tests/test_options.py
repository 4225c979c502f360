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
    "tau-0": (lambda: GraphSpec("vv", tau=0), "tau 0: must be a finite number ≥ 2.94e-39"),
    "tau-tiny": (lambda: GraphSpec("vv", tau=1e-40), "tau 1e-40: must be a finite number ≥ 2.94e-39 (1/tau"),
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
    "gd-lam-eigen": (lambda: GdSpec(preset="eigen", lam=2.0), "lam 2.0: weighs the paper loss's orthogonality"),
    "gd-lam-flat": (lambda: sj.solve(TAPS, "qk", 3, "gd", lam=0.5), "the eigen preset has none"),
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
    "lw-negative": (lambda: LayerWeights.parse("-1:1,10:1"), "names layer -1: LAYER:W pairs take layer indices ≥ 0"),
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
    with pytest.raises(InputError, match="tau: is not read by the qk graph"):
        sj.solve(TAPS, "qk", 3, tau=0.01)                   # the qk graph has no temperature: it would be ignored
    with pytest.raises(InputError, match="k_intra, min_cos: are not read by the vv graph"):
        specs("vv", "exact", k_intra=5, min_cos=0.2)
    with pytest.raises(InputError, match="use the vv graph"):
        specs("knn-qk", "exact", tau=0.2)
    assert specs("knn-vv", "exact", k_intra=5, min_cos=0.2, graph_dtype="bfloat16")[0] == GraphSpec(
        "knn-vv", k_intra=5, min_cos=0.2, dtype="bfloat16")


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
        got = out.summary()["layer_weights"]["weights"]
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


# ------------------------------------------------------------------------------------------------ the solvers' own


def test_solvers_take_their_spec_or_its_fields_and_nothing_else():
    """`solvers.gd.gd` took 19 parameters and `solvers.exact.exact` 10 beside options=: now (graphs, num_eigs,
    weights, base_grid, options=, seed=, **fields), the fields made into the one spec (`options.solver_spec`), the
    same solve either way; a name that is not a field, or fields beside options=, is one InputError line."""
    import inspect

    from spectral_jax.options import SOLVER_OPTIONS, solver_spec

    for fn in (solvers.gd.gd, solvers.exact.exact):
        params = inspect.signature(fn).parameters
        assert list(params) == ["graphs", "num_eigs", "weights", "base_grid", "options", "seed", "fields"], params
        assert params["fields"].kind is inspect.Parameter.VAR_KEYWORD
    assert SOLVER_OPTIONS["gd"] == tuple(f.name for f in __import__("dataclasses").fields(GdSpec))
    g = sj.graphs.from_taps(TAPS, "qk", image=0)
    flat = solvers.exact.exact(g, 3, dense_max=4, maxiter=300, tol=1e-5)
    objs = solvers.exact.exact(g, 3, options=ExactSpec(dense_max=4, maxiter=300, tol=1e-5))
    assert flat.method == objs.method == "exact-lobpcg"                    # dense_max read from the spec
    np.testing.assert_array_equal(flat.eigvecs, objs.eigvecs)
    kw = dict(preset="paper", steps=4, chunks=2, materialize=False, lam=0.5)
    with pytest.warns(RuntimeWarning):
        a = solvers.gd.gd(g, 3, seed=2, **kw)
    with pytest.warns(RuntimeWarning):
        b = solvers.gd.gd(g, 3, seed=2, options=GdSpec(**kw), progress=False)   # progress may go beside options=
    np.testing.assert_array_equal(a.eigvecs, b.eigvecs)
    assert a.info["materialized"] is False and a.history.shape[-1] == 4
    bad = {
        "gd-unknown": (lambda: solvers.gd.gd(g, 3, maxiter=5), "maxiter: is not an option of the gd solver — "
                       "pass only GdSpec fields: preset, param, steps,"),
        "exact-unknown": (lambda: solvers.exact.exact(g, 3, steps=5, bogus=1), "steps, bogus: are not options of "
                          "the exact solver — pass only ExactSpec fields: tol, maxiter, dense_max, sparse_solver"),
        "gd-beside": (lambda: solvers.gd.gd(g, 3, options=GdSpec(), steps=5), "steps: are given beside "
                      "options=GdSpec(...)"),
        "exact-beside": (lambda: solvers.exact.exact(g, 3, options=ExactSpec(), tol=1e-3), "tol: are given beside"),
        "exact-other-spec": (lambda: solvers.exact.exact(g, 3, options=GdSpec()), "options GdSpec: is not the exact "
                             "solver's ExactSpec"),
        "exact-sparse-solver": (lambda: solvers.exact.exact(g, 3, sparse_solver="eigsh"), "sparse_solver 'eigsh'"),
        "gd-chunks": (lambda: solver_spec("gd", chunks=0), "chunks 0: must be an integer ≥ 1"),
        "gd-materialize": (lambda: GdSpec(materialize="yes"), "materialize 'yes'"),
        "gd-preset-by-position": (lambda: solvers.gd.gd(g, 3, "eigen", steps=2), "weights 'eigen': is text"),
        "exact-preset-by-position": (lambda: solvers.exact.exact(g, 3, "paper"), "weights 'paper': is text"),
    }
    for name, (fn, needle) in bad.items():
        with pytest.raises(InputError) as e:
            fn()
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(InputError, match="chunks: apply to the other method"):
        sj.solve(TAPS, "qk", 3, chunks=4)                  # a gd field through the pipeline: exact would ignore it


# ------------------------------------------------------------------------------------------------ checked once


def _count_checks(monkeypatch):
    """Counters on the one num_eigs check (every spectral_jax module's reference to it) and on LayerWeights.parse:
    (num_eigs calls as (K, nodes, what), parse calls as their first argument)."""
    import spectral_jax.options as O

    checks, parses = [], []
    original_check, original_parse = O.check_num_eigs, LayerWeights.parse.__func__

    def check(num_eigs, nodes=None, what="num_eigs"):
        checks.append((num_eigs, nodes, what))
        return original_check(num_eigs, nodes, what)

    def parse(cls, spec, what="layer_weights"):
        parses.append(spec)
        return original_parse(cls, spec, what)

    for mod in [m for name, m in sys.modules.items() if name.startswith("spectral_jax") and m is not None]:
        if getattr(mod, "check_num_eigs", None) is original_check:
            monkeypatch.setattr(mod, "check_num_eigs", check)
    monkeypatch.setattr(LayerWeights, "parse", classmethod(parse))
    return checks, parses


def _parsed_once(parses, text):
    """The text was parsed once; any later call was handed the LayerWeights that parse made (returned as is)."""
    assert parses[0] == text and all(isinstance(p, LayerWeights) for p in parses[1:]), parses
    assert all(p == parses[1] for p in parses[1:])


def test_num_eigs_and_layer_weights_are_checked_once_from_the_cli_to_the_solver(place, tmp_path, monkeypatch):
    """One `analyze` entered pipeline.py 7 times and parsed the same layer weights 3 times. Followed from
    `spectral-jax analyze` to the solver now: the layer weights are parsed once (`pipeline.prepare`, with the
    flag's name), num_eigs is checked once where it enters (the rule and K < the images' tokens, before the model
    loads, naming the flag) and once more only by the solver against the graph it is handed (exact_batch: one
    compiled call for the image) — not again by `pipeline.analyze`, nor by the batched path before the solver."""
    import spectral_jax.pipeline  # noqa: F401  (loaded, so that its reference is counted too)
    import spectral_jax.solvers.exact  # noqa: F401
    from spectral_jax.cli import main

    checks, parses = _count_checks(monkeypatch)
    monkeypatch.chdir(place)
    out = tmp_path / "a"
    assert main(["analyze", "img.png", *TINY, "--layers", "1,0", "--num-eigs", "3", "--layer-weights", "1,0.5",
                 "--out", str(out)]) == 0
    got = json.loads((out / "img" / "summary.json").read_text())["layer_weights"]
    np.testing.assert_allclose(got, [1 / 3, 2 / 3], atol=1e-6)        # numbers paired with --layers 1,0
    assert checks == [(3, 6, "--num-eigs"), (3, 6, "num_eigs")], checks   # img.png at 28: a 2×3 grid, 6 tokens
    _parsed_once(parses, "1,0.5")


def test_num_eigs_and_layer_weights_are_checked_once_by_analyze(monkeypatch):
    """The same through the API: `analyze` checks each option once (`prepare`), and a `Prepared` is taken as is."""
    bb = _two_layer_backbone()
    checks, parses = _count_checks(monkeypatch)
    res = sj.analyze(sj.io.SAMPLE, backbone=bb, layers=[1, 0], layer_weights="1:1,0:0.5", num_eigs=3)
    np.testing.assert_allclose(res.info["layer_weights"], [1 / 3, 2 / 3], atol=1e-6)
    assert checks == [(3, 6, "num_eigs"), (3, 6, "num_eigs")], checks     # the photo at 28: a 2×3 grid
    _parsed_once(parses, "1:1,0:0.5")
    checks.clear(), parses.clear()
    prepared = sj.pipeline.prepare(sj.io.SAMPLE, backbone=bb, layers=[1, 0], layer_weights="1,0.5", num_eigs=3)
    again = sj.analyze(prepared, backbone=bb)
    np.testing.assert_array_equal(again.eigvecs, res.eigvecs)          # the same weights, given as numbers
    assert [c[2] for c in checks] == ["num_eigs", "num_eigs"] and parses[0] == "1,0.5", (checks, parses)
    for bad, needle in ((dict(num_eigs=4), "num_eigs: are given beside a Prepared"),
                        (dict(layer_weights="eigengap", tau=0.2), "layer_weights, tau: are given beside"),
                        ({}, "backbone: is needed")):
        with pytest.raises(InputError, match=needle):
            sj.analyze(prepared, **({"backbone": bb} if bad else {}), **bad)
