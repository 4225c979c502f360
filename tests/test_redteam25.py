"""What the session-25 red-team found returned or written silently wrong, now refused or recorded right.

1. `Result.load`: eigvals `[K, B]` (B·K values, another layout) and a history of another image count are refused,
   as is a summary whose "converged" is not a JSON boolean ("false" would read as True);
2. `dataset.load_result`: NaN eigvecs, summary eigvals or images of another run, segments.npz of other images or
   shape, a missing member, a truncated archive — each one `InputError` naming the file, never a raw traceback;
3. the dataset run: a gd `--resume` into an OUT holding a finished exact run is refused (it replaced that run's
   results beside its cache); the layer weights a run records are unrounded, so a resume re-solves with them;
4. the API beyond one solve: a layer of uniform graphs (tokens alike) neither wins the eigengap/select rules on its
   float32 rounding nor passes as a sweep subset or the only weighted layer; the default weights' record says each
   layer's share of the graphs (its heads); attribution refuses a reordered `select`; a GraphSpec field its kind
   does not read is refused; gd with a layer weighing 0 on its own grid, and attribution or the rules with a 1×1
   layer, work;
5. diffusion: a bfloat16 forward sees the float32 noise rounded, not another draw under the same seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import dataset
from spectral_jax.errors import InputError
from spectral_jax.solvers.result import Result
from spectral_jax.taps import LayerTap, Taps
from test_dataset import make_folder, synthetic


def _saved(tmp_path) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 2, 25, 4)).astype(np.float32) for _ in range(3))
    res = sj.solve(Taps({0: LayerTap(q, k, v, (5, 5), 0)}), graph="qk", num_eigs=4)
    path = str(tmp_path / "ok.npz")
    res.save(path)
    with np.load(path) as f:
        return path, {key: f[key] for key in f.files}


# ------------------------------------------------------------------------------------------------ 1. Result.load


@pytest.mark.parametrize("edit, match", [
    (lambda d: {**d, "eigvals": d["eigvals"].T.copy()}, r"eigvals \(4, 2\) are not \[K\] or \[B, K\]"),
    (lambda d: {**d, "eigvals": d["eigvals"].reshape(-1)}, r"eigvals \(8,\) are not \[K\] or \[B, K\]"),
    (lambda d: {**d, "history": np.zeros((3, 4), np.float32)}, r"history \(3, 4\) is not \[S\] or \[B, S\]"),
    (lambda d: {**d, "summary": np.array(json.dumps({**json.loads(str(d["summary"])), "converged": "false"}))},
     r"converged is 'false', not true or false"),
])
def test_result_load_refuses_arrays_of_another_layout(tmp_path, edit, match):
    path, d = _saved(tmp_path)
    assert Result.load(path).eigvals.shape == (2, 4)
    np.savez(str(tmp_path / "edited.npz"), **edit(d))
    with pytest.raises(InputError, match=match):
        Result.load(str(tmp_path / "edited.npz"))


def test_result_load_still_reads_one_solve_written_without_the_image_axis(tmp_path):
    path, d = _saved(tmp_path)
    one = {**d, "eigvals": d["eigvals"][0], "history": d["history"][0]}
    np.savez(str(tmp_path / "old.npz"), **one)
    got = Result.load(str(tmp_path / "old.npz"))
    np.testing.assert_array_equal(got.eigvals, np.stack([d["eigvals"][0]] * 2))


# ------------------------------------------------------------------------------------------ 2. dataset.load_result


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    folder = make_folder(str(root / "imgs"), 4)
    out = str(root / "out")
    dataset.run(folder, out, backbone=synthetic(), method="exact", size=32, batch_size=4, num_eigs=4, k_intra=5,
                k_inter=5, figure_images=0, segments=2)
    return out


def _copy(finished, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(finished, out)
    return out


def _npz(path, **change):
    with np.load(path) as f:
        d = {k: f[k] for k in f.files}
    d.update(change)
    for k in [k for k, v in d.items() if v is None]:
        del d[k]
    np.savez(path, **d)


def _summary(out, **change):
    p = os.path.join(out, "summary.json")
    with open(p) as f:
        s = json.load(f)
    s.update(change)
    with open(p, "w") as f:
        json.dump(s, f)


def test_load_result_reads_a_finished_run_back(finished):
    res = dataset.load_result(finished)
    assert res.num_images == 4 and res.segments.labels.shape[0] == 4 and len(res.names) == 4


@pytest.mark.parametrize("damage, where, match", [
    (lambda o, e: _npz(e, eigvecs=np.full_like(np.load(e)["eigvecs"], np.nan)), "eigvecs.npz",
     "eigvecs hold NaN or Inf"),
    (lambda o, e: _npz(e, names=None), "eigvecs.npz", "lacks names"),
    (lambda o, e: _npz(e, names=np.load(e)["names"][:2]), "eigvecs.npz", r"names <U\d+ \(2,\) are not \[4\]"),
    (lambda o, e: _npz(e, table=np.load(e)["table"][:, :2]), "eigvecs.npz", r"table \(4, 2, 4, 4\) is not"),
    (lambda o, e: _summary(o, eigvals=[1.0, 0.5]), "summary.json", "holds 2 eigvals for 4 eigenvectors"),
    (lambda o, e: _summary(o, images=3), "summary.json", "says 3 images where eigvecs.npz holds 4"),
    (lambda o, e: _npz(os.path.join(o, "segments.npz"), segments=np.load(os.path.join(o, "segments.npz"))
                       ["segments"][:1]), "segments.npz", r"segments int32 \(1, 4, 4\) are not \[4, 4, 4\]"),
    (lambda o, e: _npz(os.path.join(o, "segments.npz"), names=np.array(["a", "b", "c", "d"])), "segments.npz",
     "names other images than eigvecs.npz"),
    (lambda o, e: _npz(os.path.join(o, "segments.npz"), rule=None), "segments.npz",
     "does not hold a run's segments"),
    (lambda o, e: open(e, "r+b").truncate(100), "eigvecs.npz", "not a readable .npz archive"),
    (lambda o, e: _summary(o, convergence={"converged": "yes", "iterations": 1, "tol": 1e-4}), "summary.json",
     "does not describe this run's arrays"),
])
def test_load_result_refuses_a_damaged_or_mixed_export_in_one_line(finished, tmp_path, damage, where, match):
    out = _copy(finished, tmp_path)
    damage(out, os.path.join(out, "eigvecs.npz"))
    with pytest.raises(InputError) as e:
        dataset.load_result(out)
    assert e.value.what == os.path.join(out, where) and "\n" not in str(e.value)
    assert re.search(match, e.value.problem), e.value.problem
    assert "--resume" in e.value.fix


# ------------------------------------------------------------------------------------------------ 3. dataset run


def test_a_gd_resume_never_replaces_a_finished_exact_run(finished, tmp_path):
    out = _copy(finished, tmp_path)
    before = {f: open(os.path.join(out, f), "rb").read() for f in ("summary.json", "eigvecs.npz", "segments.npz")}
    with pytest.raises(InputError, match=r"holds the cached features and graph of an earlier exact run — delete "):
        dataset.run(os.path.join(os.path.dirname(finished), "imgs"), out, backbone=synthetic(), method="gd",
                    resume=True, size=32, batch_size=2, num_eigs=4, k_intra=5, k_inter=5, epochs=1, figure_images=0)
    assert {f: open(os.path.join(out, f), "rb").read() for f in before} == before
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["features", "graph.npz"]   # no gd step beside


def test_recorded_layer_weights_are_not_rounded_away(tmp_path):
    """A weight of 1e-7 was recorded as round(…, 6) = 0.0, and a --resume re-solved with that 0."""
    folder = make_folder(str(tmp_path / "imgs"), 3)
    res = dataset.run(folder, str(tmp_path / "out"), backbone=synthetic(), method="exact", size=32, batch_size=4,
                      num_eigs=3, k_intra=5, k_inter=5, figure_images=0, layer_weights="1:1,0:1e-7")
    w = res.summary()["layer_weights"]["weights"]
    assert w["0"] == pytest.approx(1e-7 / (1 + 1e-7), rel=1e-6) and w["1"] == pytest.approx(1 / (1 + 1e-7))
    np.testing.assert_allclose(dataset.load_result(str(tmp_path / "out")).provenance.layer_weights[0],
                               [w["0"], w["1"]], rtol=0)


# ----------------------------------------------------------------------------------------- 4. API beyond a solve


def _tap(rng, n=36, heads=2, grid=(6, 6), alike=False):
    x = (lambda: np.zeros((1, heads, n, 8), np.float32)) if alike else \
        (lambda: rng.standard_normal((1, heads, n, 8)).astype(np.float32))
    return LayerTap(x(), x(), rng.standard_normal((1, heads, n, 8)).astype(np.float32), grid)


def test_a_layer_of_uniform_graphs_neither_wins_a_rule_nor_passes_alone():
    rng = np.random.default_rng(0)
    taps = Taps({0: _tap(rng, heads=1, alike=True), 1: _tap(rng, heads=1)})     # one head: agreement 1
    att = sj.attribution(taps, "qk", 4)
    assert att.eigengap[0, 0] == 0 and att.eigengap[1, 0] > 0.1    # its 2e-7 "λ_2" read as a gap of 0.45 before
    for rule in ("eigengap", "select"):
        res = sj.solve(taps, "qk", 4, layer_weights=rule)
        np.testing.assert_array_equal(res.provenance.layer_weights[0], [0.0, 1.0])   # select gave layer 0 all of it
    for call in (lambda: sj.sweep(taps, [0], "qk", 4), lambda: sj.solve(taps, "qk", 4, layer_weights={0: 1}),
                 lambda: sj.solve(taps, "qk", 4, layer_weights=[1, 0])):
        with pytest.raises(InputError, match=r"^qk graphs: every qk graph of layer\(s\) 0 is uniform"):
            call()
    assert [r.info["layers"] for r in sj.sweep(taps, [1, (0, 1)], "qk", 4)] == [[1], [0, 1]]
    assert sj.solve(taps, "qk", 4, layer_weights={0: 1, 1: 0.5}).convergence.converged


def test_default_weights_are_recorded_as_each_layers_share_of_the_graphs():
    """No layer weights: every graph (head) equal, so a 6-head layer weighs 6× a 1-head one; the record said 1/L,
    the same as "uniform", which solves another problem."""
    rng = np.random.default_rng(0)
    taps = Taps({0: _tap(rng, heads=1), 1: _tap(rng, heads=6)})
    plain, six = sj.solve(taps, "qk", 4), sj.solve(taps, "qk", 4, layer_weights={0: 1, 1: 6})
    np.testing.assert_allclose(plain.provenance.layer_weights[0], [1 / 7, 6 / 7])
    np.testing.assert_allclose(plain.eigvals, six.eigvals, rtol=1e-5)
    np.testing.assert_allclose(sj.sweep(taps, [(0, 1)], "qk", 4)[0].provenance.layer_weights[0], [1 / 7, 6 / 7])
    np.testing.assert_array_equal(sj.solve(taps, "qk", 4, layer_weights="uniform").provenance.layer_weights[0],
                                  [0.5, 0.5])


def test_attribution_refuses_a_reordered_selection_and_reads_a_selected_image():
    rng = np.random.default_rng(0)
    f = lambda: rng.standard_normal((2, 2, 25, 8)).astype(np.float32)
    taps = Taps({0: LayerTap(f(), f(), f(), (5, 5)), 1: LayerTap(f(), f(), f(), (5, 5))})
    res = sj.solve(taps, "vv", 4)
    with pytest.raises(InputError, match=r"^result: holds images \[1, 0\] of its solve \(Result.select\)"):
        sj.attribution(taps, "vv", 4, result=res.select([1, 0]), image=0)
    one = res.select([1])
    assert one.info["image_index"] == 1 and res.select([1, 0]).image(0).info["image_index"] == 1
    np.testing.assert_array_equal(sj.attribution(taps, "vv", 4, result=one, image=1).rq,
                                  sj.attribution(taps, "vv", 4, result=res, image=1).rq)
    with pytest.raises(InputError, match="image 1 of its solve, beside taps of 2 images read at image 0"):
        sj.attribution(taps, "vv", 4, result=one, image=0)


@pytest.mark.parametrize("spec, name", [(dict(kind="qk", tau=0.01), "tau"), (dict(kind="vv", k_intra=3), "k_intra"),
                                        (dict(kind="vv", min_cos=0.9), "min_cos"),
                                        (dict(kind="knn-vv", tau=1e-6), "tau")])
def test_a_graphspec_field_its_kind_does_not_read_is_refused(spec, name):
    with pytest.raises(InputError, match=rf"^{name}: is not read by the {spec['kind']} graph \(it would be ignored\)"):
        sj.GraphSpec(**spec)
    assert sj.GraphSpec(spec["kind"]).kind == spec["kind"]      # the defaults of unread fields pass


def test_gd_with_a_grid_group_weighing_zero_and_a_1x1_layer():
    rng = np.random.default_rng(0)
    taps = Taps({0: _tap(rng), 1: _tap(rng, n=9, grid=(3, 3))})
    exact = sj.solve(taps, "vv", 4, layer_weights={0: 1})
    gd = sj.solve(taps, "vv", 4, "gd", layer_weights={0: 1})          # was: "the problem's matrix holds NaN"
    np.testing.assert_allclose(gd.eigvals, exact.eigvals, rtol=1e-4)
    tiny = Taps({0: _tap(rng), 6: _tap(rng, n=1, grid=(1, 1))})
    att = sj.attribution(tiny, "vv", 3)                                 # was: "num_eigs 0: must be an integer ≥ 2"
    np.testing.assert_allclose(att.eigvals[1, 0, :1], [1.0], rtol=1e-6)
    assert np.isnan(att.eigvals[1, 0, 1:]).all() and att.eigengap[1, 0] == 0
    assert sj.solve(tiny, "vv", 3, layer_weights="eigengap").provenance.layer_weights[0][1] == 0


def test_a_resume_names_recorded_layer_weights_as_recorded_not_typed(tmp_path):
    """--resume re-solves with the weights the run recorded; where --layers now leaves one of them out, the error
    read as if the user had typed `--layer-weights 10:…,11:…`."""
    from test_dataset_badinput import TINY, _cli, _one_line_exit_2

    exact = TINY[:TINY.index("--method")] + TINY[TINY.index("--batch-size"):]
    folder = make_folder(str(tmp_path / "imgs"), 3)
    out = str(tmp_path / "out")
    r = _cli(folder, *exact, "--layers", "10,11", "--layer-weights", "11:1,10:1e-7", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    _one_line_exit_2(_cli(folder, *exact, "--layers", "11", "--resume", "--out", out), "names layer 10",
                     f"(not typed: the layer weights the run in {out} recorded in its summary.json",
                     "resume with the run's own --layers")


# ------------------------------------------------------------------------------------------------ 5. diffusion


def test_bfloat16_diffusion_sees_the_float32_noise_rounded():
    """ε was drawn in the latents' dtype: jax.random.normal in bfloat16 is another sample, so a --dtype bfloat16 run
    of sd_tiny under the same seed saw other noise (q 128 % off float32's; a ViT's 1 %). Drawn in float32, then
    cast: the difference is bfloat16 rounding."""
    import jax.numpy as jnp

    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    qs = []
    for dtype in (jnp.float32, jnp.bfloat16):
        bb = sj.load_backbone("sd_tiny", "random", dtype=dtype, timesteps=[100], latent="sample")
        qs.append(np.asarray(bb.taps(bb.preprocess_image(img, 64)[None], "-1").layers[bb.num_layers - 1].q,
                             np.float32))
    assert np.linalg.norm(qs[1] - qs[0]) / np.linalg.norm(qs[0]) < 0.1
