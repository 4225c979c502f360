"""Dataset inputs, red-team round: the backbone's taps checked where they arrive (NaN/Inf for one image → that image
skipped with its reason; a wrong token count → one InputError naming the layer), options only the other method
reads refused (both directions, CLI and API), layer weights at the ends of the float range, the multi-process
options, and stderr agreeing with summary.json about the skipped images.

CLI cases run the installed console script (`test_dataset_badinput`'s tiny random DINOv2-S at 28×28), several at
once; `dataset.run` cases use test_dataset's synthetic backbone (32×32 → a 4×4 grid, 2 layers × 2 heads × dim 8).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import dataset
from spectral_jax.models import Backbone
from spectral_jax.taps import LayerTap, Taps
from test_dataset import SMALL, _env, make_folder, run_two_processes
from test_dataset_badinput import EXT, TINY, _cli, _fail_at, _one_line_exit_2, place  # noqa: F401 (a fixture)

EXACT_TINY = TINY[:TINY.index("--method")] + TINY[TINY.index("--batch-size"):]     # the default method, no gd flags


def _cli_all(cases: dict, timeout=300) -> dict:
    """{name: CompletedProcess} of `_cli(*args)` for each case, three at a time."""
    names = sorted(cases)
    with ThreadPoolExecutor(3) as pool:
        return dict(zip(names, pool.map(lambda n: _cli(*cases[n], timeout=timeout), names)))


def _white(folder: str, readable: bool = True) -> None:
    """folder/white.png: an all-white image (the one the poisoned backbone fails on), or bytes that are no image."""
    from PIL import Image

    path = os.path.join(folder, "white.png")
    if readable:
        Image.fromarray(np.full((40, 48, 3), 255, np.uint8)).save(path)
    else:
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not a png")


def _poisoned() -> Backbone:
    """EXT's taps, except layer 1's q is NaN for an all-white image (normalised pixels 2.0): one image's forward
    fails, the others' are EXT's."""
    def fn(params, x, layers):
        taps = EXT.apply(params, x, layers, False)
        white = (x.mean(axis=(1, 2, 3)) > 1.9)[:, None, None, None]
        return {i: (jnp.where(white, jnp.nan, t.q) if i == 1 else t.q, t.k, t.v) for i, t in taps.layers.items()}

    return Backbone.from_function("poisoned", fn, EXT.params, patch_size=8, num_layers=2, size=32,
                                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


POISONED = _poisoned()
NAN_REASON = "backbone 'poisoned' gave NaN or Inf for it (layer 1)"


def _skip_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "skipping" in ln]


# ------------------------------------------------------------------------------------------ 1. the backbone's output


@pytest.mark.parametrize("method", ["exact", "gd"])
def test_nan_taps_skip_the_image_exactly_as_an_unreadable_one(tmp_path, capsys, method):
    """A backbone returning NaN for one image: that image is skipped with its reason (summary.json and one stderr
    line), the others' eigenvectors are finite, and the result is the one a run whose copy of that image cannot be
    read at all gives (the image takes no part in the solve); nothing non-finite is cached."""
    kw = {**SMALL, "method": method, **({"epochs": 2} if method == "gd" else {})}
    poisoned, unreadable = (make_folder(str(tmp_path / name), 6) for name in ("poisoned", "unreadable"))
    _white(poisoned)
    _white(unreadable, readable=False)
    capsys.readouterr()
    res = dataset.run(poisoned, str(tmp_path / "out"), backbone=POISONED, **kw)
    err = capsys.readouterr().err
    ref = dataset.run(unreadable, str(tmp_path / "ref"), backbone=POISONED, **kw)

    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["skipped"] == [{"file": "white.png", "reason": NAN_REASON}] and s["images"] == 6
    assert _skip_lines(err) == [f"spectral-jax dataset: skipping white.png: {NAN_REASON}"]
    assert "white.png" not in res.names and res.eigvecs.shape == (6, 6, 4, 4) and np.isfinite(res.eigvecs).all()
    assert ref.names == res.names and ref.summary()["skipped"][0]["file"] == "white.png"
    np.testing.assert_allclose(res.eigvecs, ref.eigvecs, atol=1e-6)
    if method == "exact":
        from spectral_jax.dataset import store

        assert all(np.isfinite(store.load_all(str(tmp_path / "out" / "checkpoints"), k)).all() for k in ("a0", "b0"))
        np.testing.assert_allclose(res.summary()["eigvals"], ref.summary()["eigvals"], atol=1e-6)


def test_two_processes_exact_skip_with_every_reason(tmp_path):
    """Two processes, each reading its half of the images: process 1's share holds the NaN image and an unreadable
    one; summary.json (written by process 0) gives both their own reasons, not "could not be read during the run"."""
    folder = make_folder(str(tmp_path / "imgs"), 6)
    _white(folder)
    with open(os.path.join(folder, "zz.png"), "wb") as f:
        f.write(b"not a png")                                       # files sorted: white.png, zz.png last
    out = str(tmp_path / "multi")
    run_two_processes(folder, out, '**{**SMALL, "method": "exact"}',
                      head="from test_dataset_inputs import _poisoned as synthetic\n")
    s = json.loads(open(os.path.join(out, "summary.json")).read())
    assert s["processes"] == 2 and s["images"] == 6
    assert [d["file"] for d in s["skipped"]] == ["white.png", "zz.png"]
    assert s["skipped"][0]["reason"] == NAN_REASON and s["skipped"][1]["reason"].startswith("cannot read the image")


def _bad(case: str):
    """Layer 1's taps of the wrong token count: 12 of the 16 patch tokens, or a CLS token in front that num_prefix
    does not declare (17)."""
    return lambda a: a[:, :, :12] if case == "tokens" else jnp.concatenate([a[:, :, :1], a], axis=2)


def _wrong(case: str, route: str) -> Backbone:
    """EXT with layer 1's taps of the wrong token count (`_bad`), as a user function (`Backbone.from_function`,
    whose own output check names it) or as a backbone's own `apply` (which only the dataset's check sees)."""
    bad = _bad(case)
    if route == "user-function":
        def fn(params, x, layers):
            taps = EXT.apply(params, x, layers, False)
            return {i: tuple(bad(a) if i == 1 else a for a in (t.q, t.k, t.v)) for i, t in taps.layers.items()}

        return Backbone.from_function(f"wrong-{case}", fn, EXT.params, patch_size=8, num_layers=2, size=32,
                                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def apply(params, x, layers, hidden=False):
        taps = EXT.apply(params, x, layers, hidden)
        return Taps({i: LayerTap(*(bad(a) if i == 1 else a for a in (t.q, t.k, t.v)), t.grid, t.num_prefix)
                     for i, t in taps.layers.items()})

    return dataclasses.replace(EXT, name=f"wrong-{case}", apply=apply)


@pytest.mark.parametrize("route", ["user-function", "apply"])
@pytest.mark.parametrize("method", ["exact", "gd"])
@pytest.mark.parametrize("case,tokens", [("tokens", 12), ("prefix", 17)])
def test_wrong_token_count_is_one_input_error_naming_the_layer(tmp_path, monkeypatch, method, case, tokens, route):
    """It was mis-aligned with the grid silently (exact: a quarter of the tokens without edges). Now refused before
    the forward runs or the step compiles, nothing written: the backbone's fault, named with the expected shape —
    by `Backbone.from_function`'s output check for a user function, by the dataset's own check (`layout.tapped`)
    for any other backbone."""
    folder = make_folder(str(tmp_path / "imgs"), 4)
    monkeypatch.setattr("spectral_jax.dataset.whole.stream_features", lambda *a, **k: pytest.fail("the forward ran"))
    monkeypatch.setattr("spectral_jax.dataset.step.compile_step", lambda *a, **k: pytest.fail("the step compiled"))
    with pytest.raises(dataset.InputError) as e:
        dataset.run(folder, str(tmp_path / "out"), backbone=_wrong(case, route), **{**SMALL, "method": method})
    msg = str(e.value)
    want = (f"layer 1 of backbone 'wrong-{case}': q has shape (4, 2, {tokens}, 8), expected [B=4, heads, T=16 "
            "(num_prefix 0 + 4×4 patches), D]" if route == "user-function" else
            f"backbone 'wrong-{case}': layer 1's q has shape (4, 2, {tokens}, 8), expected "
            "(4, heads, 16, dim): batch 4, 0 prefix + 4×4 patch tokens")
    assert msg.startswith(want) and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 2. options of the other method

GD_ONLY = {"epochs": ["--epochs", "3"], "epochs-default": ["--epochs", "10"], "lr": ["--lr", "0.1"],
           "ema": ["--ema", "0.5"], "inner-steps": ["--inner-steps", "2"], "preset": ["--preset", "eigen"],
           "checkpoint-every": ["--checkpoint-every", "5"]}


def test_cli_gd_options_under_exact_are_one_line_each(place, tmp_path):
    """Each gd-only option under the default method ran exact silently; now exit 2, one line naming the option
    (typed at its default value too), nothing written. Two at once: one line naming both."""
    cases = {name: [str(place / "imgs"), *EXACT_TINY, *flag, "--out", str(tmp_path / name)]
             for name, flag in GD_ONLY.items()}
    cases["two"] = [str(place / "imgs"), *EXACT_TINY, "--epochs", "3", "--lr", "0.1", "--out", str(tmp_path / "two")]
    runs = _cli_all(cases)
    for name, flag in GD_ONLY.items():
        _one_line_exit_2(runs[name], f"error: {flag[0]}: apply to --method gd only", f"drop {flag[0]}")
    _one_line_exit_2(runs["two"], "error: --epochs, --lr: apply to --method gd only")
    assert os.listdir(tmp_path) == []


def test_api_options_of_the_other_method_are_refused_both_ways(tmp_path):
    folder = make_folder(str(tmp_path / "imgs"), 2)
    with pytest.raises(dataset.InputError, match=r"^--epochs: apply to --method gd only"):
        dataset.run(folder, str(tmp_path / "out"), backbone=EXT, **{**SMALL, "method": "exact"}, epochs=3)
    assert not (tmp_path / "out").exists()
    for kw, flag in ((dict(preset="eigen"), "--preset"), (dict(inner_steps=2, ema=0.5), "--inner-steps, --ema"),
                     (dict(lam=2.0), "lam")):
        with pytest.raises(dataset.InputError, match=f"^{flag}: apply to --method gd only"):
            dataset.Settings(method="exact", **kw)
    for kw, flag in ((dict(tol=1e-3), "--tol"), (dict(maxiter=10), "--maxiter"),
                     (dict(features_dtype="bfloat16"), "--bf16-features")):
        with pytest.raises(dataset.InputError, match=f"^{flag}: apply to --method exact only"):
            dataset.Settings(method="gd", **kw)
    with pytest.raises(dataset.InputError, match="^--epochs: apply to --method gd only"):
        dataset.Settings(method="gd", epochs=3).replace(method="exact")
    assert dataset.Settings(method="gd", epochs=3, prefetch=4).step_key().method == "gd"    # shared options pass


# ------------------------------------------------------------------------------------------------ 3. layer weights


def test_cli_layer_weights_at_the_ends_of_the_float_range(place, tmp_path):
    """1e-45, 1e39, 1e308 ended in a scipy traceback (float32 subnormal/inf weights) and left checkpoints/: they are
    scaled in float64 first, so only their ratios count. All-zero weights — also those that underflow float64 —
    and infinite ones are refused up front: one line, nothing written."""
    lw = [str(place / "imgs"), *EXACT_TINY, "--layers", "10,11"]
    good = {"tiny": ("11:1e-45,10:0", {"10": 0.0, "11": 1.0}), "big": ("11:1e39", {"10": 0.0, "11": 1.0}),
            "max": ("11:1e308,10:1e308", {"10": 0.5, "11": 0.5})}
    bad = {"zero": "11:0,10:0", "underflow": "11:1e-400,10:0", "overflow": "11:1e309"}
    cases = {name: [*lw, f"--layer-weights={w}", "--out", str(tmp_path / name)] for name, (w, _) in good.items()}
    cases.update({name: [*lw, f"--layer-weights={w}", "--out", str(tmp_path / name)] for name, w in bad.items()})
    cases["gd-big"] = [str(place / "imgs"), *TINY, "--layers", "10,11", "--layer-weights=11:1e39", "--out",
                       str(tmp_path / "gd-big")]
    runs = _cli_all(cases)
    for name in bad:
        _one_line_exit_2(runs[name], "--layer-weights: need finite weights ≥ 0, not all 0")
        assert not (tmp_path / name).exists()
    for name, (_, weights) in good.items():
        r = runs[name]
        assert r.returncode == 0, (name, r.stderr[-3000:])
        s = json.loads((tmp_path / name / "summary.json").read_text())
        assert s["layer_weights"] == {"rule": "given", "weights": weights}, name
        assert s["convergence"]["converged"] and np.isfinite(s["eigvals"]).all(), name
        with np.load(tmp_path / name / "eigvecs.npz") as f:
            assert np.isfinite(f["eigvecs"]).all() and f["eigvecs"].shape == (3, 3, 2, 2), name
    r = runs["gd-big"]
    assert r.returncode == 0, r.stderr[-3000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert np.isfinite(line["objective"]) and np.isfinite(line["loss"])
    with np.load(tmp_path / "gd-big" / "eigvecs.npz") as f:
        assert np.isfinite(f["eigvecs"]).all()


# -------------------------------------------------------------------------------------------- 4. several processes


def test_cli_multi_process_options_are_one_line_each(place, tmp_path):
    """Tracebacks (JAX's cluster auto-detection, its RPC server on a taken port) became one line, exit 2, before
    the model loads, and without waiting for peers."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = [str(place / "imgs"), *TINY]
        cases = {"no-coordinator": ["--num-processes", "2", "--process-id", "0"],
                 "process-id-alone": ["--process-id", "1"],
                 "process-id-over": ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "2"],
                 "port-taken": ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]}
        runs = _cli_all({name: [*base, *flags, "--out", str(tmp_path / name)] for name, flags in cases.items()},
                        timeout=120)
    _one_line_exit_2(runs["no-coordinator"], "--num-processes 2 --process-id 0: needs --coordinator too")
    _one_line_exit_2(runs["process-id-alone"], "--process-id 1: needs --coordinator and --num-processes too")
    _one_line_exit_2(runs["process-id-over"], "--process-id: must be in [0, 2)", "got 2")
    _one_line_exit_2(runs["port-taken"], f"port {port} cannot be bound here")
    assert os.listdir(tmp_path) == []


def test_init_distributed_failure_is_one_input_error():
    """What JAX refuses once started (here: called after JAX has run) is one InputError, not its traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import jax; jax.devices()\nfrom spectral_jax import dataset\ntry:\n"
            f"    dataset.init_distributed('127.0.0.1:{port}', 1, 0)\n"
            "except dataset.InputError as e:\n    print('InputError:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"InputError: --coordinator 127.0.0.1:{port}: could not start or join it"), r.stdout


# ----------------------------------------------------------------------------------- 5. skipped: stderr = summary


def _folder_with_two_unreadable(root: str) -> str:
    folder = make_folder(root, 10)
    for name in ("broken.jpg", "empty.png"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not an image" if name.endswith("jpg") else b"")
    return folder


def _agree(err: str, out) -> None:
    """Every image summary.json lists as skipped is on stderr once, with the same reason, and nothing else is."""
    s = json.loads((out / "summary.json").read_text())
    assert len(s["skipped"]) == 2
    assert sorted(_skip_lines(err)) == sorted(f"spectral-jax dataset: skipping {d['file']}: {d['reason']}"
                                              for d in s["skipped"])


def test_gd_resumed_and_re_exported_runs_report_every_skipped_image_once(tmp_path, monkeypatch, capsys):
    """A gd run resumed after a failure printed only the unreadable images of the steps it ran itself (and a
    re-export none), while summary.json listed all of them: stderr now prints summary.json's list, once each."""
    folder = _folder_with_two_unreadable(str(tmp_path / "imgs"))
    out = tmp_path / "out"
    kw = dict(backbone=EXT, epochs=2, checkpoint_every=1, **SMALL)                  # 12 files → 3 steps an epoch
    _fail_at(monkeypatch, 5)
    with pytest.raises(Exception, match="disk gone at step 5"):
        dataset.run(folder, str(out), **kw)
    monkeypatch.undo()
    capsys.readouterr()
    res = dataset.run(folder, str(out), resume=True, **kw)                          # the last step only
    assert res.summary()["resumed_from"] == 5 and res.summary()["steps_this_run"] == 1
    _agree(capsys.readouterr().err, out)
    dataset.run(folder, str(out), resume=True, **kw)                                 # a re-export: no step
    _agree(capsys.readouterr().err, out)


def test_exact_reports_every_skipped_image_once_and_again_on_re_export(tmp_path, capsys):
    folder = _folder_with_two_unreadable(str(tmp_path / "imgs"))
    out = tmp_path / "out"
    capsys.readouterr()
    dataset.run(folder, str(out), backbone=EXT, **{**SMALL, "method": "exact"})
    _agree(capsys.readouterr().err, out)
    dataset.run(folder, str(out), backbone=EXT, resume=True, **{**SMALL, "method": "exact"})    # cached graph
    _agree(capsys.readouterr().err, out)
