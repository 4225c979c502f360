"""Red-team regressions (second round): the options added since the first round — solve's tol/seed/num_eigs types,
layer weights (numbers, mappings, rules), sweep's subsets, attribution's image/timesteps/result, analyze's early
checks, empty and "." output paths, extract's diffusion options, solve's kNN default, dataset layer weights and
exact-only options, the process exit after a command. Each case is a defect found by the red-team (a traceback, a
silently wrong or ignored input, or a generic message) and now one `InputError` naming the input and the fix.

API cases run on synthetic taps (3 layers, 2 images, 2 heads, a 4×4 grid); CLI cases run the installed console
script and are refused before any model work (a few seconds each, concurrently).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import files
from spectral_jax.options import LayerWeights
from spectral_jax.acts import save_acts
from spectral_jax.errors import InputError
from spectral_jax.taps import LayerTap, Taps

EXE = os.path.join(os.path.dirname(sys.executable), "spectral-jax")


def _taps(layers=(0, 1, 2), images=2, heads=2, grid=(4, 4), dim=8, seed=0):
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    return Taps({l: LayerTap(*(rng.normal(size=(images, heads, n, dim)).astype(np.float32) for _ in range(3)),
                             grid, 0) for l in layers})


TAPS = _taps()


# --------------------------------------------------------------------------------------------------------------
# the API: one InputError naming the input, before any solve


API_CASES = {
    # solve: tol reached exact unchecked (0/-1/nan/inf ran; a string was a ValueError traceback)
    "solve-tol-0": (lambda: sj.solve(TAPS, "qk", 3, tol=0), "tol 0"),
    "solve-tol-negative": (lambda: sj.solve(TAPS, "qk", 3, tol=-1), "tol -1"),
    "solve-tol-nan": (lambda: sj.solve(TAPS, "qk", 3, tol=float("nan")), "tol nan"),
    "solve-tol-inf": (lambda: sj.solve(TAPS, "qk", 3, tol=float("inf")), "tol inf"),
    "solve-tol-string": (lambda: sj.solve(TAPS, "qk", 3, tol="x"), "tol 'x'"),
    # num_eigs 2.5 ran as K = 2; seed 1.5 was a PRNG traceback, seed −1 broke numpy's generators downstream
    "solve-num-eigs-float": (lambda: sj.solve(TAPS, "qk", 2.5), "num_eigs 2.5"),
    "solve-seed-float": (lambda: sj.solve(TAPS, "qk", 3, method="gd", steps=3, seed=1.5), "seed 1.5"),
    "solve-seed-negative": (lambda: sj.solve(TAPS, "qk", 3, seed=-1), "seed -1"),
    # layer weights: a non-integer mapping key was a traceback; bools and nested lists were taken as numbers
    "lw-mapping-key": (lambda: sj.solve(TAPS, "qk", 3, layer_weights={"a": 1}), "not layer indices"),
    "lw-bools": (lambda: sj.solve(TAPS, "qk", 3, layer_weights=[True, False, True]), "not a rule name or a list"),
    "lw-nested": (lambda: sj.solve(TAPS, "qk", 3, layer_weights=[[1, 1, 1]]), "not a rule name or a list"),
    "lw-wrong-length": (lambda: sj.solve(TAPS, "qk", 3, layer_weights=[1, 1]), "need one per tapped layer"),
    # sweep: [] returned an empty list; an int or a float subset was a TypeError traceback
    "sweep-empty": (lambda: sj.sweep(TAPS, [], "qk", 3), "is empty"),
    "sweep-int": (lambda: sj.sweep(TAPS, 0, "qk", 3), "is not a list of layer subsets"),
    "sweep-float-item": (lambda: sj.sweep(TAPS, [1.5], "qk", 3), "subset 1.5"),
    # attribution: image out of range / not an int and timesteps not a list were tracebacks (ValueError from graphs,
    # IndexError, TypeError); a result of other taps was read silently
    "attr-image-out-of-range": (lambda: sj.attribution(TAPS, "qk", 3, image=5), "image 5"),
    "attr-image-negative": (lambda: sj.attribution(TAPS, "qk", 3, image=-1), "image -1"),
    "attr-image-float": (lambda: sj.attribution(TAPS, "qk", 3, image=1.5), "image 1.5"),
    "attr-timesteps-int": (lambda: sj.attribution(TAPS, "qk", 3, timesteps=7), "timesteps 7"),
    "attr-timesteps-strings": (lambda: sj.attribution(TAPS, "qk", 3, timesteps=["a", "b"]), "timesteps"),
    "attr-result-of-other-taps": (lambda: sj.attribution(TAPS, "qk", 3, result=sj.solve(_taps(layers=(0,)), "qk", 3)),
                                  "result: was solved on layers [0], but the taps have [0, 1, 2]"),
    "attr-result-not-a-result": (lambda: sj.attribution(TAPS, "qk", 3, result=5), "is not a Result"),
    # Backbone.from_function: patch_size 0 was a ZeroDivisionError at the first image, a 2-value mean a broadcast
    # ValueError, num_layers 0 a backbone with no layers
    "fn-patch-0": (lambda: _from_function(patch_size=0), "patch_size 0"),
    "fn-size-float": (lambda: _from_function(size=22.5), "size 22.5"),
    "fn-mean-2": (lambda: _from_function(mean=(0.5, 0.5)), "mean (0.5, 0.5)"),
    "fn-std-0": (lambda: _from_function(std=(0.5, 0.0, 0.5)), "each > 0"),
    "fn-std-nan": (lambda: _from_function(std=(0.5, float("nan"), 0.5)), "3 finite numbers"),
    "fn-layers-0": (lambda: _from_function(num_layers=0), "num_layers 0"),
}


def _from_function(**kw):
    opts = dict(patch_size=14, num_layers=2) | kw
    return sj.Backbone.from_function("user", lambda p, x, layers: {}, **opts)


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input_is_one_input_error(case):
    call, needle = API_CASES[case]
    with pytest.raises(InputError) as e:
        call()
    assert needle in str(e.value) and " — " in str(e.value), str(e.value)


def test_huge_equal_layer_weights_are_equal_weights():
    """[1e308] * 3 summed to inf and normalised to 0: refused as 'no weight on any graph'. They are equal weights."""
    for batch in (None, 0):                                    # the batched exact path and the per-image loop
        huge = sj.solve(TAPS, "qk", 3, layer_weights=[1e308] * 3, batch_images=batch)
        ones = sj.solve(TAPS, "qk", 3, layer_weights=[1, 1, 1], batch_images=batch)
        np.testing.assert_allclose(huge.eigvals, ones.eigvals, rtol=1e-6)
        np.testing.assert_allclose(huge.rq, ones.rq, rtol=1e-6)


def test_layer_weight_parse_keeps_numbers_and_rules():
    """Moved from LW.parse (now `options.LayerWeights`): parse keeps what was given, resolve normalises."""
    assert LayerWeights.parse({0: 1, 2: np.float32(0.5)}).resolve([0, 1, 2]).tolist() == [2 / 3, 0.0, 1 / 3]
    assert LayerWeights.parse(np.array([1, 2, 3])).numbers == (1.0, 2.0, 3.0)
    assert LayerWeights.parse(" EigenGap ").resolve([0, 1]) == "eigengap"


def test_layer_weight_numbers_pair_with_layers_in_the_order_given():
    """`--layers 11,3 --layer-weights 1,0.5` gave layer 3 the 1 (numbers were read in ascending layer order).
    Moved from pipeline.parse_layer_weights to `LayerWeights.bound` with `options.layer_order`."""
    from spectral_jax.options import layer_order

    bound = lambda w, layers: LayerWeights.parse(w).bound(layer_order(layers, 12)).resolve(layer_order(layers, 12))
    assert bound("1,0.5", "11,3").tolist() == [1 / 3, 2 / 3]          # layers 3, 11
    assert bound([2, 1], [-1, 0]).tolist() == [1 / 3, 2 / 3]          # layers 0, 11
    assert bound({11: 1}, [11, 3]).tolist() == [0.0, 1.0]
    assert bound("select", "11,3") == "select"
    with pytest.raises(InputError, match="need one per tapped layer"):
        bound("1,2", "3,3")

    from spectral_jax.models import Backbone

    def fn(params, images, layers):
        n = (images.shape[1] // 14) * (images.shape[2] // 14)
        return {l: tuple(params[l][:, :, :n] for _ in range(3)) for l in layers}

    rng = np.random.default_rng(1)
    params = {l: rng.normal(size=(1, 2, 6, 8)).astype(np.float32) for l in (0, 1)}
    bb = Backbone.from_function("two", fn, params, patch_size=14, num_layers=2, size=28)
    run = lambda layers, w: sj.analyze(sj.io.SAMPLE, backbone=bb, layers=layers, layer_weights=w, num_eigs=3).eigvals
    np.testing.assert_allclose(run([1, 0], [1, 0]), run([0, 1], [0, 1]), rtol=1e-6)
    assert not np.allclose(run([1, 0], [1, 0]), run([0, 1], [1, 0]), rtol=1e-3)


def test_attribution_takes_its_own_results():
    """Attribution of solve's Result (all images, or the image alone) equals attribution that solves the image
    itself: the same quotients, own spectra, angles and joint eigenvalues, to float32 rounding."""
    res = sj.solve(TAPS, "qk", 3)
    for image in (0, 1):
        own = sj.attribution(TAPS, "qk", 3, image=image)                       # solves image `image` here
        for result in (res, res.image(image)):
            att = sj.attribution(TAPS, "qk", 3, result=result, image=image)
            assert att.rq.shape == (3, 1, 2, 3) and np.isfinite(att.rq).all()
            np.testing.assert_allclose(att.rq.reshape(-1, 3), res.rq[image], rtol=1e-6)   # this image's rows
            for name in ("rq", "eigvals", "eigengap", "joint_eigvals"):
                np.testing.assert_allclose(getattr(att, name), getattr(own, name), rtol=1e-4, atol=1e-5,
                                           err_msg=name)
            np.testing.assert_allclose(att.angles, own.angles, atol=2e-3)       # arccos near 0 amplifies rounding
            np.testing.assert_allclose(att.agreement, own.agreement, atol=1e-5)
    other = sj.attribution(TAPS, "qk", 3, image=0)                               # and the images differ
    assert not np.allclose(other.rq, sj.attribution(TAPS, "qk", 3, image=1).rq, atol=1e-3)
    per_subset = sj.sweep(TAPS, np.array([0, 2]), "qk", 3)          # a numpy array of layers: each alone
    assert len(per_subset) == 2 and per_subset[1].eigvecs.shape == (2, 3, 4, 4)


def test_analyze_checks_solve_options_before_the_model_loads(monkeypatch):
    from spectral_jax import models

    def no_model(*a, **k):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(models, "load_backbone", no_model)
    with pytest.raises(TypeError, match="bogus"):
        sj.analyze(sj.io.SAMPLE, weights="random", size=28, num_eigs=2, bogus=1)
    for kw, needle in ((dict(tol=-1), "tol -1"), (dict(seed=-1), "seed -1"), (dict(batch_images=-1), "batch_images")):
        with pytest.raises(InputError, match=needle):
            sj.analyze(sj.io.SAMPLE, weights="random", size=28, num_eigs=2, **kw)


def test_nan_taps_are_refused_naming_the_weights():
    """NaN weights (a damaged checkpoint) reached the exact solver: a LAPACK callback's 79-line traceback."""
    import jax.numpy as jnp

    from spectral_jax.models import Backbone

    def fn(params, images, layers):
        n = (images.shape[1] // 14) * (images.shape[2] // 14)
        return {0: tuple(jnp.full((images.shape[0], 1, n, 4), params) for _ in range(3))}

    bb = Backbone.from_function("nan", fn, jnp.float32(jnp.nan), patch_size=14, num_layers=1, size=28)
    with pytest.raises(InputError, match="weights 'user': layer 0 produced NaN or Inf"):
        sj.analyze(sj.io.SAMPLE, backbone=bb, num_eigs=2)


# --------------------------------------------------------------------------------------------------------------
# output paths


def test_empty_output_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for make in (lambda: files.OutputDir(""), lambda: files.OutputFile(files.npz_path("")),
                 lambda: files.OutputFile("  ")):
        with pytest.raises(InputError, match="is empty"):
            make()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", [".", "sub/.."])
def test_output_folder_named_dot_merges_into_it(tmp_path, monkeypatch, name):
    """`--out .` built everything and then failed on rename(2) (EBUSY) with a traceback; it merges like any existing
    folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    with files.OutputDir(name, names=["a", "summary.json"]) as od:
        os.makedirs(os.path.join(od.tmp, "a"))
        files.write_json(os.path.join(od.tmp, "summary.json"), {"ok": 1})
        od.commit()
    assert sorted(os.listdir(tmp_path)) == ["a", "keep.txt", "sub", "summary.json"]


# --------------------------------------------------------------------------------------------------------------
# CLI: one line, exit 2, nothing written, before any model work


def _cli(argv, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", SPECTRAL_JAX_COMPILE_CACHE="0")
    return subprocess.run([EXE, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """acts.npz (synthetic taps, 1 image, a 2×3 grid: 6 tokens), an image, a folder of 3 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("redteam")
    save_acts(str(root / "acts.npz"), _taps(layers=(0, 1), images=1, grid=(2, 3)), "synthetic", (28, 42))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), np.uint8)).save(root / "img.png")
    (root / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(root / "imgs" / f"{i}.png")
    return root


TINY = ["--model", "dinov2_vits14", "--weights", "random", "--size", "28"]
SD = ["extract", "img.png", "--model", "sd_tiny", "--weights", "random", "--size", "64"]
DS = ["dataset", "imgs", *TINY, "--layers", "0,1", "--num-eigs", "3", "--batch-size", "3"]
CLI_CASES = {
    # silently the default 4 timesteps / a numpy traceback from the noise generator
    "extract-num-timesteps-0": ([*SD, "--num-timesteps", "0", "--out", "o.npz"], "--num-timesteps 0"),
    "extract-seed-negative": ([*SD, "--seed", "-1", "--out", "o.npz"], "--seed -1"),
    # found only after the forward (named `seed`, not the flag)
    "analyze-seed-negative": (["analyze", "img.png", *TINY, "--seed", "-1", "--out", "o"], "--seed -1"),
    # FileNotFoundError traceback after the whole run; extract wrote ".npz"
    "analyze-out-empty": (["analyze", "img.png", *TINY, "--num-eigs", "3", "--out", ""], "--out '': is empty"),
    "extract-out-empty": (["extract", "img.png", *TINY, "--out", ""], "--out '': is empty"),
    # "no such file" for a folder
    "solve-acts-folder": (["solve", "imgs", "--graph", "qk", "--out", "o.npz"], "imgs: is a folder, not an ACTS"),
    "solve-out-empty": (["solve", "acts.npz", "--graph", "qk", "--num-eigs", "3", "--out", ""], "--out '': is empty"),
    # an explicit k above the tokens stays refused (the default is capped, see below)
    "solve-k-intra-over-tokens": (["solve", "acts.npz", "--graph", "knn-qk", "--k-intra", "7", "--num-eigs", "3",
                                   "--out", "o.npz"], "--k-intra: 7 exceeds the 6 tokens"),
    # dataset: a weight on an untapped layer was dropped, a repeated layer's last weight won, exact-only options
    # were ignored under gd
    "dataset-lw-untapped": ([*DS, "--layer-weights", "99:1", "--out", "o"], "names layer 99"),
    "dataset-lw-twice": ([*DS, "--layer-weights", "0:1,0:2", "--out", "o"], "gives layer 0 twice"),
    "dataset-bf16-gd": ([*DS, "--method", "gd", "--bf16-features", "--out", "o"], "--bf16-features: apply to --method exact"),
    "dataset-tol-gd": ([*DS, "--method", "gd", "--tol", "1e-3", "--out", "o"], "--tol: apply to --method exact"),
    # given at all, even at its default value, --maxiter means nothing to gd
    "dataset-maxiter-gd": ([*DS, "--method", "gd", "--maxiter", "400", "--out", "o"], "--maxiter: apply to --method"),
    "solve-seed-negative": (["solve", "acts.npz", "--graph", "qk", "--seed", "-1", "--out", "o.npz"], "--seed -1"),
}


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(place):
    names = sorted(CLI_CASES)
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda n: _cli(CLI_CASES[n][0], place), names))
    for name, r in zip(names, runs):
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, (name, r.returncode, r.stderr[-2000:])
        assert CLI_CASES[name][1] in lines[0], (name, lines[0])
    assert sorted(os.listdir(place)) == ["acts.npz", "img.png", "imgs"]


def test_cli_solve_knn_default_k_is_capped_by_the_tokens(place, tmp_path):
    """`solve --graph knn-qk` without --k-intra was refused on a 6-token grid ('50 exceeds the 6 tokens'): the
    default is capped, as the API and the dataset command cap it."""
    out = tmp_path / "r.npz"
    r = _cli(["solve", place / "acts.npz", "--graph", "knn-qk", "--num-eigs", "3", "--out", out], place)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.load(out)["eigvecs"].shape == (1, 3, 2, 3)


def test_finished_command_exit_ignores_ctrl_c(place, tmp_path):
    """A Ctrl-C in the process's exit after a finished run printed JAX's atexit traceback or killed the process by
    SIGINT (rc −2) after the result was written; the console-script path ignores SIGINT once the command is over."""
    code = ("import signal, sys; from spectral_jax.cli import main; sys.argv = ['spectral-jax', 'solve', "
            f"{str(place / 'acts.npz')!r}, '--graph', 'qk', '--num-eigs', '3', '--out', {str(tmp_path / 'r.npz')!r}]; "
            "code = main(); print(code, signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", SPECTRAL_JAX_COMPILE_CACHE="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "0 True", (r.stdout, r.stderr[-2000:])
