"""What a `Result` was solved on (`Result.provenance`: graph kind, layers, per-layer weights, timesteps), kept through
`image`/`stack`/`sweep`, written to RESULT.npz as extra members (old files read as unknown), and checked by
`attribution`: a result of another graph kind, other layers or other timesteps is one `InputError` naming `result`
(a vv result passed to a qk attribution was read as the qk one's quotients).

Synthetic taps as in test_redteam_inputs (2 images, 2 heads, a 4×4 grid); one case runs the `spectral-jax solve`
console script on an ACTS file with timesteps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import warnings

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax.acts import load_acts, save_acts
from spectral_jax.errors import InputError
from spectral_jax.options import ExactSpec
from spectral_jax.solvers.result import Provenance, Result
from spectral_jax.taps import Taps
from test_redteam_inputs import EXE, _taps

TAPS = _taps()                                   # layers 0, 1, 2; 2 images
UNIFORM = np.full((2, 3), 1 / 3)


@pytest.mark.parametrize("graph, kw, weights", [
    ("qk", {}, UNIFORM),                                                      # the batched exact path
    ("vv", dict(batch_images=0), UNIFORM),                                    # the per-image loop
    ("knn-vv", dict(k_intra=4, k_inter=4), UNIFORM),                          # one joint solve
    ("qk", dict(method="gd", steps=3), UNIFORM),
    ("qk", dict(layer_weights=[1, 0, 3]), np.tile([0.25, 0.0, 0.75], (2, 1))),
    ("vv", dict(layer_weights="eigengap"), None),                             # per image, read from its spectra
    ("qk", dict(weights=[np.ones((3, 2))]), "none"),                          # per-graph weights: none per layer
])
def test_solve_records_what_it_was_solved_on(graph, kw, weights):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                      # gd: 3 steps do not converge
        res = sj.solve(TAPS, graph, 3, **kw)
    p = res.provenance
    assert (p.graph, p.layers, p.timesteps) == (graph, (0, 1, 2), ())
    if isinstance(weights, str):
        assert p.layer_weights is None
    elif weights is None:                          # a rule: each image's own weights, those in its info
        per = [i["layer_weights"] for i in res.info["per_image"]]
        np.testing.assert_allclose(p.layer_weights, per, atol=1e-6)
        assert p.layer_weights.shape == (2, 3) and not np.allclose(p.layer_weights[0], p.layer_weights[1])
    else:
        np.testing.assert_allclose(p.layer_weights, weights, rtol=1e-12)
    one = res.image(1)
    assert (one.provenance.graph, one.provenance.layers) == (graph, (0, 1, 2))
    if p.layer_weights is not None:
        np.testing.assert_array_equal(one.provenance.layer_weights, p.layer_weights[1:2])


def test_graphs_have_unknown_provenance_and_sweep_says_its_layers():
    from spectral_jax import graphs as G

    unknown = sj.solve(G.from_taps(_taps(layers=(0,)), "qk", image=0), "qk", 3)
    assert unknown.provenance is None
    with pytest.raises(InputError, match=r"^result: has 1 image\(s\) × 2 graphs, but the taps give 2 image\(s\) × 6"):
        sj.attribution(TAPS, "qk", 3, result=unknown)                      # unknown: the counts are still checked
    for s, res in zip([(0,), (1, 2)], sj.sweep(TAPS, [0, [1, 2]], "qk", 3)):
        assert res.provenance.layers == s and res.provenance.graph == "qk" and res.num_images == 2
        np.testing.assert_allclose(res.provenance.layer_weights, np.full((2, len(s)), 1 / len(s)))


def test_taps_timesteps_reach_the_result():
    steps = Taps(_taps(heads=4).layers, timesteps=(10, 20))
    assert steps.timesteps == (10, 20) and steps.patches().timesteps == (10, 20)
    assert sj.solve(steps, "vv", 3).provenance.timesteps == (10, 20)


def test_result_file_keeps_the_contract_and_reads_old_files(tmp_path):
    res = sj.solve(TAPS, "vv", 3, layer_weights=[2, 1, 1])
    path = res.save(str(tmp_path / "r.npz"))
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(data["eigvecs"], res.eigvecs)                        # docs/design.md's arrays, as before
    assert data["eigvals"].shape == (2, 3) and data["rq"].shape == (2, 6, 3)
    assert str(data["provenance/graph"]) == "vv" and data["provenance/layers"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(data["provenance/layer_weights"], np.tile([0.5, 0.25, 0.25], (2, 1)))
    back = Result.load(path)
    for name in ("eigvecs", "eigvals", "rq", "objective"):
        np.testing.assert_allclose(getattr(back, name), getattr(res, name), rtol=1e-6, err_msg=name)
    assert (back.method, back.steps, back.joint) == (res.method, res.steps, res.joint)
    assert (back.provenance.graph, back.provenance.layers, back.provenance.timesteps) == ("vv", (0, 1, 2), ())
    np.testing.assert_allclose(back.provenance.layer_weights, res.provenance.layer_weights)
    # a file written before provenance was recorded: the same arrays without the provenance/* members
    old = str(tmp_path / "old.npz")
    np.savez(old, **{k: v for k, v in data.items() if not k.startswith("provenance/")})
    unknown = Result.load(old)
    assert unknown.provenance is None
    np.testing.assert_array_equal(unknown.eigvecs, res.eigvecs)
    # unknown provenance: attribution can only check the counts, and reads it as the in-memory result
    a = sj.attribution(TAPS, "vv", 3, result=unknown, image=1)
    b = sj.attribution(TAPS, "vv", 3, result=res, image=1)
    np.testing.assert_allclose(a.rq, b.rq, rtol=1e-6)
    # one image: DESIGN.md's eigvals [K] on disk (the weights [L]); in memory the image axis
    one = res.image(0).save(str(tmp_path / "one.npz"))
    with np.load(one) as f:
        assert f["eigvals"].shape == (3,) and f["provenance/layer_weights"].shape == (3,)
        assert json.loads(str(f["provenance/graph_options"])) == {"tau": 0.1, "graph_dtype": "float32"}
    back = Result.load(one)
    assert back.provenance.layer_weights.shape == (1, 3) and back.eigvals.shape == (1, 3)
    assert back.provenance.graph_options == {"tau": 0.1, "graph_dtype": "float32"}


@pytest.mark.parametrize("make", ["missing", "folder", "not-npz", "no-rq"])
def test_result_load_refuses_what_is_not_a_result(tmp_path, make):
    path = str(tmp_path / "x.npz")
    if make == "folder":
        os.mkdir(path)
    elif make == "not-npz":
        open(path, "w").write("text")
    elif make == "no-rq":
        np.savez(path, eigvecs=np.zeros((1, 2, 2, 2), np.float32), eigvals=np.zeros(2), summary=np.array("{}"))
    with pytest.raises(InputError) as e:
        Result.load(path)
    assert str(e.value).startswith(path) and " — " in str(e.value)


def _other_layers():
    """Taps of the same shapes as TAPS but layers 1, 2, 3: a result on them has TAPS' image and graph counts."""
    return Taps({l + 1: t for l, t in _taps(seed=5).layers.items()})


ATTR_CASES = {
    # the defect: a vv result has the qk one's shape and was read as its quotients
    "vv-result-qk-attribution": (lambda: sj.solve(TAPS, "vv", 3), TAPS, "qk",
                                 "result: was solved on the 'vv' graph, not 'qk' — pass graph='vv'", True),
    "knn-result-qk-attribution": (lambda: sj.solve(TAPS, "knn-qk", 3, k_intra=4, k_inter=4).image(0),
                                  Taps({l: t for l, t in TAPS.layers.items()}), "qk",
                                  "result: was solved on the 'knn-qk' graph, not 'qk'", False),
    "other-layers": (lambda: sj.solve(_other_layers(), "qk", 3), TAPS, "qk",
                     "result: was solved on layers [1, 2, 3], but the taps have [0, 1, 2]", True),
    "other-timesteps": (lambda: sj.solve(Taps(_taps(heads=4).layers, timesteps=(10, 20)), "qk", 3),
                        Taps(_taps(heads=4).layers, timesteps=(30, 40)), "qk",
                        "result: was solved on timesteps [10, 20], but the taps carry [30, 40]", True),
    "timesteps-vs-none": (lambda: sj.solve(Taps(_taps(heads=4).layers, timesteps=(10, 20)), "qk", 3),
                          _taps(heads=4), "qk", "result: was solved on timesteps [10, 20], but the taps carry []",
                          True),
}


@pytest.mark.parametrize("case", sorted(ATTR_CASES))
def test_attribution_refuses_a_result_of_something_else(case):
    make, taps, graph, needle, same_counts = ATTR_CASES[case]
    result = make()
    with pytest.raises(InputError) as e:
        sj.attribution(taps, graph, 3, result=result)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)
    # the same result with its provenance unknown (an old file): only the image and graph counts can be checked —
    # where they match, nothing else could tell; this is what the provenance is for
    unknown = dataclasses.replace(result, provenance=None)
    if same_counts:
        assert sj.attribution(taps, graph, 3, result=unknown).rq.shape[0] == 3
    else:
        with pytest.raises(InputError, match="^result: has 1 image"):
            sj.attribution(taps, graph, 3, result=unknown)


def test_attribution_refuses_a_result_of_other_graph_options_or_of_one_of_several_images():
    """A vv result at another tau measures other graphs; a one-image result beside the taps of 2 images cannot
    say which image it is (both were read silently: agreement 0.40–0.57 for 0.33–0.86, 0.28–0.30 for
    0.78–0.94)."""
    res = sj.solve(TAPS, "vv", 3, tau=0.05)
    assert res.provenance.graph_options == {"tau": 0.05, "graph_dtype": "float32"}
    with pytest.raises(InputError, match=r"^result: was solved on other graphs: tau 0.05 there, 0.1 here — pass "
                                         r"tau=0.05"):
        sj.attribution(TAPS, "vv", 3, result=res)
    ok = sj.attribution(TAPS, "vv", 3, result=res, tau=0.05)
    np.testing.assert_allclose(ok.rq, sj.attribution(TAPS, "vv", 3, tau=0.05).rq, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r"^result: has 1 image, image 1 of its solve, beside taps of 2 images read "
                                         r"at image 0 — pass .*result.image\(0\)"):
        sj.attribution(TAPS, "vv", 3, result=res.image(1), image=0, tau=0.05)
    alone = dataclasses.replace(res.image(1), info={})                 # one image that does not say which
    with pytest.raises(InputError, match="^result: has 1 image, not said which of its solve"):
        sj.attribution(TAPS, "vv", 3, result=alone, image=1, tau=0.05)
    np.testing.assert_allclose(sj.attribution(TAPS, "vv", 3, result=res.image(1), image=1, tau=0.05).rq,
                               sj.attribution(TAPS, "vv", 3, result=res, image=1, tau=0.05).rq)
    # what made it is in its summary: the seed, the solver's options, the provenance with the graph's options
    s = res.summary()
    assert s["seed"] == 0 and s["solver_options"] == ExactSpec().record()
    assert s["provenance"] == {"graph": "vv", "layers": [0, 1, 2], "timesteps": [],
                               "graph_options": {"tau": 0.05, "graph_dtype": "float32"}}


def test_attribution_refuses_layer_weights_beside_a_result():
    res = sj.solve(TAPS, "qk", 3, layer_weights=[1, 0, 1])
    with pytest.raises(InputError, match="^layer_weights: are not used with result"):
        sj.attribution(TAPS, "qk", 3, result=res, layer_weights=[1, 0, 1])
    mine = sj.attribution(TAPS, "qk", 3, layer_weights=[1, 0, 1])             # solved here with them: the same
    np.testing.assert_allclose(mine.rq, sj.attribution(TAPS, "qk", 3, result=res).rq, rtol=1e-5, atol=1e-6)


def test_solve_cli_writes_provenance_that_attribution_checks(tmp_path):
    """`spectral-jax solve` on an ACTS with timesteps: RESULT.npz says vv, its layers, weights and timesteps."""
    acts = str(tmp_path / "acts.npz")
    save_acts(acts, _taps(layers=(0, 2), images=1, heads=4), "synthetic", (16, 16), timesteps=(10, 20), num_heads=2)
    out = str(tmp_path / "r.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu", SPECTRAL_JAX_COMPILE_CACHE="0")
    r = subprocess.run([EXE, "solve", acts, "--graph", "vv", "--num-eigs", "3", "--out", out], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = Result.load(out)
    p = res.provenance
    assert (p.graph, p.layers, p.timesteps) == ("vv", (0, 2), (10, 20))
    np.testing.assert_allclose(p.layer_weights, [[0.5, 0.5]])
    taps = load_acts(acts).taps
    assert taps.timesteps == (10, 20)
    att = sj.attribution(taps, "vv", 3, result=res)
    assert list(att.timesteps) == [10, 20] and att.rq.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(att.rq.reshape(-1, 3), res.rq[0], rtol=1e-6)
    with pytest.raises(InputError, match="^result: was solved on the 'vv' graph, not 'qk'"):
        sj.attribution(taps, "qk", 3, result=res)


def test_provenance_is_typed():
    p = Provenance("qk", [3, 1], np.ones((1, 2)) / 2, [np.int64(5)])
    assert p.layers == (3, 1) and p.timesteps == (5,) and p.layer_weights.dtype == np.float64
    with pytest.raises(ValueError):
        Provenance("qk", (0, 1), np.ones((1, 3)))
