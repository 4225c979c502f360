"""Red-team regressions (third round), through the installed console script: `--text-embedding` files that crashed
after their header was checked (an object member, a member with a header and no data, a corrupt deflate stream, an
.npz where a .npy is read), diffusion timesteps (no cap, an OverflowError, `0,,5` read as `[0, 5]`), an image that
is a FIFO or a link to /dev/urandom ("no such file"), ARPACK's iterations reported as `steps`, the maxiter warning
(tests/test_solvers.py) and a damaged compile-cache entry (two lines per entry, every run).

Bad-input cases end in one line on stderr and exit 2 before any weight is read, and leave nothing behind; they run
concurrently, each a few seconds (mostly the JAX import).
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_redteam_inputs import EXE, _taps

from spectral_jax.acts import save_acts
from spectral_jax.cli import compile_cache
from spectral_jax.errors import InputError
from spectral_jax.models import testing
from spectral_jax.models.sd import diffusion

W = testing.MODELS["sd3_tiny"].config.transformer.context_dim       # 24, as flux_tiny and pixart_tiny
P = testing.MODELS["sd3_tiny"].config.transformer.pooled_projection_dim  # 20


def _npy_bytes(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """img.png (64²) and the crafted text embeddings; a FIFO and a link to /dev/urandom named like images."""
    root = tmp_path_factory.mktemp("redteam3")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(root / "img.png")
    pooled = np.zeros(P, np.float32)
    np.savez(root / "object.npz", context=np.array([None] * W, object).reshape(1, W), pooled=pooled)
    with zipfile.ZipFile(root / "header-only.npz", "w") as z:      # a [3, W] float32 header, no data
        z.writestr("context.npy", _npy_bytes(np.zeros((3, W), np.float32))[:128])
        z.writestr("pooled.npy", _npy_bytes(pooled))
    # a deflated member whose stream is damaged past its header: the header reads, the data does not
    np.savez_compressed(root / "deflate.npz", context=np.random.default_rng(1).random((3000, W), np.float32),
                        pooled=pooled)
    data = bytearray((root / "deflate.npz").read_bytes())
    with zipfile.ZipFile(root / "deflate.npz") as z:
        info = z.getinfo("context.npy")
    start = info.header_offset + 30 + len(info.filename) + 100_000
    data[start:start + 400] = bytes(b ^ 0x5A for b in data[start:start + 400])
    (root / "deflate.npz").write_bytes(bytes(data))
    np.savez(root / "good.npz", context=np.ones((3, W), np.float32), pooled=pooled)
    np.save(root / "tokens.npy", np.ones((3, W), np.float32))
    np.save(root / "object.npy", np.array([None] * 2 * W, object).reshape(2, W), allow_pickle=True)
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo.npz")
    os.symlink("/dev/urandom", root / "urandom.png")
    return root


def _cli(argv, cwd, timeout=180, **env):
    """The console script in `cwd`, offline, no compile cache, with extra environment variables; a run that blocks
    (a FIFO read) fails at `timeout` seconds instead of hanging the suite."""
    full = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", SPECTRAL_JAX_COMPILE_CACHE="0", **env)
    return subprocess.run([EXE, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=full, timeout=timeout)


def _extract(model, *flags):
    return ["extract", "img.png", "--model", model, "--weights", "random", "--size", "64", *flags, "--out", "o.npz"]


EMB = {  # (model, file) → what the one line says
    "sd3-object-member": (("sd3_tiny", "object.npz"), "object.npz: array 'context' holds Python objects"),
    "sd3-header-no-data": (("sd3_tiny", "header-only.npz"),
                           "declares shape (3, 24) of float32 (288 bytes) but holds 0"),
    "sd3-corrupt-deflate": (("sd3_tiny", "deflate.npz"),
                            "deflate.npz: not a readable .npz file (corrupt deflate data); expected an .npz with float "
                            "context [M, 24]"),
    "flux-npy-for-npz": (("flux_tiny", "tokens.npy"), "tokens.npy: is a .npy file, not an .npz archive; expected"),
    "sd3-fifo": (("sd3_tiny", "fifo.npz"), "fifo.npz: is not a regular file but a FIFO"),
    "pixart-npz-for-npy": (("pixart_tiny", "good.npz"), "good.npz: is an .npz archive, not a .npy file; expected a "
                                                         "float .npy [M, 24]"),
    "pixart-object-npy": (("pixart_tiny", "object.npy"), "object.npy: not a readable .npy file (ValueError"),
    "sd-npz-for-npy": (("sd_tiny", "good.npz"), "good.npz: is an .npz archive, not a .npy file; expected a float .npy "
                                                 "[77, 32]"),
}
TS = {  # flags → what the one line says (one parser for every family: all of them on SD)
    "num-over-cap": (["--num-timesteps", "100000"], "--num-timesteps 100000: asks for 100000 timesteps, over the cap "
                                                    f"of {diffusion.DEFAULT_MAX_TIMESTEPS}"),
    "list-over-cap": (["--timesteps", ",".join(map(str, range(65)))], "asks for 65 timesteps, over the cap of 64"),
    "overflow": (["--timesteps", "999999999999999999999"], "item '999999999999999999999': each must be in [0, 999]"),
    "empty-item": (["--timesteps", "0,,5"], "--timesteps '0,,5': has an empty item"),
    "repeat": (["--timesteps", "0,5,5"], "--timesteps '0,5,5': repeats 5"),
    "float": (["--timesteps", "1.5"], "item '1.5' is not an integer"),
    "t-max-out-of-range": (["--t-max", "1000"], "--t-max 1000: must be in [0, 999]"),
}
CASES = {f"emb-{k}": (_extract(m, "--text-embedding", f), s) for k, ((m, f), s) in EMB.items()}
CASES |= {f"ts-sd-{k}": (_extract("sd_tiny", *flags), s) for k, (flags, s) in TS.items()}
CASES |= {f"ts-{m}-{k}": (_extract(m, *TS[k][0]), TS[k][1])    # and each diffusion transformer's schedule
          for m, k in (("sd3_tiny", "num-over-cap"), ("flux_tiny", "overflow"), ("pixart_tiny", "empty-item"))}
CASES |= {  # images that are not regular files: said so, and a FIFO never blocks (the runs have a timeout)
    "image-fifo": (["extract", "fifo.png", "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                    "--out", "o.npz"], "fifo.png: is not a regular file but a FIFO (named pipe)"),
    "image-urandom": (["analyze", "urandom.png", "--model", "dinov2_vits14", "--weights", "random", "--size", "28",
                       "--num-eigs", "3", "--out", "o"], "urandom.png: is not a regular file but a character device"),
}


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(place):
    names = sorted(CASES)
    before = sorted(os.listdir(place))
    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(lambda n: _cli(CASES[n][0], place), names))
    for name, r in zip(names, runs):
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1, (name, r.returncode, r.stderr[-2000:])
        assert lines[0].startswith(f"spectral-jax {CASES[name][0][0]}: error: "), (name, lines[0])
        assert CASES[name][1] in lines[0], (name, lines[0])
    assert sorted(os.listdir(place)) == before


def test_timestep_cap_is_the_environment_s_and_documented(place, monkeypatch):
    """SPECTRAL_JAX_MAX_TIMESTEPS moves the cap (as SPECTRAL_JAX_MAX_TOKENS moves the token cap), a bad value is
    refused, and --help and the README state the default."""
    runs = [_cli(_extract("sd_tiny", "--timesteps", "1,2,3"), place, SPECTRAL_JAX_MAX_TIMESTEPS=v)
            for v in ("2", "lots")]
    for r, needle in zip(runs, ("asks for 3 timesteps, over the cap of 2", "SPECTRAL_JAX_MAX_TIMESTEPS='lots': is "
                                                                            "not a positive integer")):
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr[-2000:]
    help_text = " ".join(subprocess.run([EXE, "extract", "--help"], capture_output=True, text=True,
                                        timeout=60).stdout.split())
    cap = diffusion.DEFAULT_MAX_TIMESTEPS
    assert f"at most {cap} (each is one model pass" in help_text and "SPECTRAL_JAX_MAX_TIMESTEPS" in help_text
    readme = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().split())
    assert f"at most {cap} timesteps" in readme and "`SPECTRAL_JAX_MAX_TIMESTEPS`" in readme
    monkeypatch.setenv("SPECTRAL_JAX_MAX_TIMESTEPS", "3")
    assert diffusion.max_timesteps() == 3


@pytest.mark.parametrize("timesteps, needle", [
    (list(range(diffusion.DEFAULT_MAX_TIMESTEPS + 1)), "over the cap of 64"),
    ([1.5], "must be integers in [0, 999]"),
    ([True], "must be integers in [0, 999]"),
    (["5"], "must be integers in [0, 999]"),
    ([10 ** 30], "hold 1000000000000000000000000000000: must be integers in [0, 999]"),
    ([], "need at least one timestep"),
])
@pytest.mark.parametrize("model", ["sd_tiny", "sd3_tiny", "pixart_tiny"])
def test_api_timesteps_are_checked_before_the_weights(model, timesteps, needle):
    """The API takes the same cap and range (the backbones and `collect_taps` share `diffusion.check_timesteps`);
    weights "no-such-dir" shows the check comes first."""
    from spectral_jax.models import load_backbone

    with pytest.raises(InputError, match="timesteps") as e:
        load_backbone(model, "no-such-dir", timesteps=timesteps)
    assert needle in str(e.value), str(e.value)


def test_api_timesteps_keep_integers_and_repeats():
    """numpy integers and repeats (a random schedule draws with replacement) stay valid for the API."""
    ts = diffusion.check_timesteps(np.array([5, 5, 999], np.uint16))
    assert ts.dtype == np.int64 and ts.tolist() == [5, 5, 999]
    assert diffusion.check_timesteps(7).tolist() == [7]
    assert diffusion.parse_timesteps(" 0, 50 ,100").tolist() == [0, 50, 100]


def test_exact_solve_reports_iterations_not_steps(tmp_path):
    """A kNN solve over 9000 nodes (ARPACK): the JSON line said "steps": <ARPACK's operator applications>. steps are
    optimisation steps (docs/design.md's summary keys): 0 here, with the count under "iterations" — in the line and in
    RESULT.npz's summary alike."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 1, 3000, 8)).astype(np.float32)             # 3 images of a 50×60 grid
    from spectral_jax.taps import LayerTap, Taps

    save_acts(str(tmp_path / "a.npz"), Taps({0: LayerTap(q, q + 0.1, q, (50, 60), 0)}), "synthetic", (700, 840))
    r = _cli(["solve", "a.npz", "--graph", "knn-qk", "--num-eigs", "3", "--k-intra", "5", "--k-inter", "5",
              "--out", "r.npz"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout)
    assert line["method"] == "exact-arpack" and line["steps"] == 0 and line["iterations"] > 0, line
    with np.load(tmp_path / "r.npz") as f:
        saved = json.loads(str(f["summary"]))
    assert saved["steps"] == 0 and saved["iterations"] == line["iterations"]


def test_damaged_compile_cache_is_one_warning_line_per_run(tmp_path):
    """Every damaged entry of the compile cache printed JAX's two-line warning, on every run (JAX compiles it again
    but never replaces it). Now: one line naming the folder and the fix, and the same result."""
    cache = tmp_path / "cache"
    save_acts(str(tmp_path / "a.npz"), _taps(layers=(0, 1), images=1, grid=(4, 4)), "synthetic", (56, 56))
    env = {k: v for k, v in os.environ.items() if k not in (
        compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")}
    env.update(JAX_PLATFORMS="cpu", **{compile_cache.ENV: str(cache)})

    def run(out):
        return subprocess.run([EXE, "solve", "a.npz", "--graph", "qk", "--num-eigs", "3", "--out", out],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)

    first = run("r1.npz")
    assert first.returncode == 0 and first.stderr == "", first.stderr[-2000:]
    entries = [p for p in cache.iterdir() if p.is_file() and p.name.endswith("-cache")]
    assert len(entries) >= 2, entries
    for p in entries:
        p.write_bytes(b"damaged")
    for out in ("r2.npz", "r3.npz"):                                   # every run: one line, not two per entry
        again = run(out)
        lines = again.stderr.splitlines()
        assert again.returncode == 0 and len(lines) == 1, again.stderr[-3000:]
        assert lines[0].startswith(f"spectral-jax: warning: compile cache {cache}: an entry could not be read")
        assert "delete the folder" in lines[0] and compile_cache.ENV in lines[0]
        assert json.loads(again.stdout)["eigvals"] == json.loads(first.stdout)["eigvals"]
