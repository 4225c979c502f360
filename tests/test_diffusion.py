"""spectral_jax.models.sd.diffusion: timestep schedules, taps across timesteps (timestep-major fold, reproducible
noise), the multi-grid solve over SD's attention grids (exact and gd with graph sampling) against a dense
construction, and the extract → solve / analyze command line with Stable Diffusion models.

Model: `sd_tiny` with random weights (SD 1.x's layout: 16 self-attention layers; a 128² image gives latent 16²
and grids 16/8/4/2 — the 64/32/16/8 of a 512² image, scaled down).
"""

import json

import numpy as np
import pytest
from PIL import Image

import jax.numpy as jnp

from spectral_jax import graphs as G
from spectral_jax import solvers
from spectral_jax.acts import load_acts
from spectral_jax.cli import main
from spectral_jax.models.sd.diffusion import (SCHEDULES, collect_taps, encode_images, noisy_latents, parse_timesteps,
                                    timestep_schedule)
from spectral_jax.errors import InputError
from spectral_jax.models.sd import load_sd
from spectral_jax.models.sd.unet import jit_forward

TS = (0, 120, 250)
H = 2  # sd_tiny heads


# ---------------------------------------------------------------------------------------------------------------
# Timestep schedules
# ---------------------------------------------------------------------------------------------------------------

def test_random_schedule_is_uniform_on_0_to_t_max_and_seeded():
    t = timestep_schedule("random", 5000, seed=0)
    assert t.dtype == np.int64 and t.shape == (5000,)
    assert t.min() == 0 and t.max() == 250                  # U{0..250}: both ends reached in 5000 draws
    assert abs(t.mean() - 125) < 4
    np.testing.assert_array_equal(t, timestep_schedule("random", 5000, seed=0))
    assert not np.array_equal(t, timestep_schedule("random", 5000, seed=1))
    t = timestep_schedule("random", 200, seed=3, t_max=40, t_min=30)
    assert t.min() >= 30 and t.max() <= 40


def test_deterministic_schedules():
    np.testing.assert_array_equal(timestep_schedule("constant", 3, t_max=100), [100, 100, 100])
    np.testing.assert_array_equal(timestep_schedule("increasing", 5, t_max=100), [0, 25, 50, 75, 100])
    np.testing.assert_array_equal(timestep_schedule("decreasing", 5, t_max=100, t_min=20), [100, 80, 60, 40, 20])
    c = timestep_schedule("cyclic", 8, t_max=200)           # one cosine period, starting at t_min
    np.testing.assert_array_equal(c, [0, 29, 100, 171, 200, 171, 100, 29])
    c2 = timestep_schedule("cyclic", 8, t_max=200, periods=2)
    np.testing.assert_array_equal(c2, [0, 100, 200, 100, 0, 100, 200, 100])
    assert set(SCHEDULES) == {"random", "constant", "increasing", "decreasing", "cyclic"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="sometimes", steps=3), "unknown timestep schedule — choose one of random, constant"),
    (dict(kind="random", steps=0), "need at least one timestep"),
    (dict(kind="random", steps=3, t_max=1000), "need 0 ≤ t_min ≤ t_max ≤ 999"),
])
def test_schedule_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        timestep_schedule(**kwargs)


def test_parse_timesteps():
    np.testing.assert_array_equal(parse_timesteps("0, 50,100"), [0, 50, 100])
    for bad in ("1000", "a,b", "", "-1"):
        with pytest.raises(InputError):
            parse_timesteps(bad)


# ---------------------------------------------------------------------------------------------------------------
# Taps across timesteps
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd():
    return load_sd("sd_tiny", "random")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def taps(sd, image):
    return collect_taps(image, sd, TS, seed=0)


def test_taps_fold_timesteps_into_heads(sd, image, taps):
    """Per layer q/k/v [B, T·H, N, D]; slice i·H:(i+1)·H is the UNet run on x_{t_i} = add_noise(z, ε_i, t_i)."""
    assert sorted(taps.layers) == list(range(16))
    grids = [t.grid for t in taps.layers.values()]
    assert grids == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] + [(4, 4)] * 3 + [(8, 8)] * 3 + \
        [(16, 16)] * 3
    for t in taps.layers.values():
        assert t.q.shape[:3] == (1, len(TS) * H, t.grid[0] * t.grid[1]) and t.k.shape == t.q.shape
    xt = noisy_latents(sd, encode_images(sd, image), TS, seed=0)                  # [T, 1, 16, 16, 4]
    fwd = jit_forward(sd.unet)
    for i, t in enumerate(TS):
        _, one = fwd(xt[i], t, sd.context)
        for j, tap in taps.layers.items():
            for name in ("q", "k", "v"):
                # two compilations (taps only vs. the whole UNet) fuse differently: float32 rounding only
                mine, ref = np.asarray(getattr(tap, name))[:, i * H:(i + 1) * H], getattr(one.layers[j], name)
                assert np.abs(mine - ref).max() <= 2e-5 * np.abs(ref).max(), f"t={t} layer {j} {name}"
    q = np.asarray(taps.layers[0].q)
    assert np.abs(q[:, :H] - q[:, H:2 * H]).max() > 1e-3                         # timesteps differ


def test_noise_latents_and_layers_follow_the_arguments(sd, image, taps):
    same = collect_taps(image, sd, TS, seed=0)
    np.testing.assert_array_equal(np.asarray(same.layers[5].k), np.asarray(taps.layers[5].k))
    other = collect_taps(image, sd, TS, seed=1)
    assert np.abs(np.asarray(other.layers[5].k) - np.asarray(taps.layers[5].k)).max() > 1e-4
    mean, sample = encode_images(sd, image), encode_images(sd, image, latent="sample", seed=0)
    assert float(jnp.abs(mean - sample).max()) > 1e-4
    xt = np.asarray(noisy_latents(sd, mean, [0, 999], seed=0))
    acp = sd.schedule.alphas_cumprod
    for i, t in enumerate((0, 999)):   # the noise each timestep adds is N(0, I), scaled by √(1 − ᾱ_t)
        eps = (xt[i] - np.sqrt(acp[t]) * np.asarray(mean)) / np.sqrt(1 - acp[t])
        assert abs(eps.std() - 1) < 0.15 and abs(eps.mean()) < 0.15, t
    assert np.abs(xt[0] - np.asarray(mean)).max() < 0.25 < np.abs(xt[1] - np.asarray(mean)).max()
    sub = collect_taps(image, sd, TS[:1], seed=0, layers=[0, 6, 15])
    assert sorted(sub.layers) == [0, 6, 15]
    ref = np.asarray(taps.layers[15].v)[:, :H]
    assert np.abs(np.asarray(sub.layers[15].v) - ref).max() <= 2e-5 * np.abs(ref).max()
    with pytest.raises(InputError, match="self-attention layers 0..15"):
        collect_taps(image, sd, TS, layers=[16])
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        collect_taps(image, sd, [1000])


# ---------------------------------------------------------------------------------------------------------------
# Multi-grid solve over the four grids vs a dense construction
# ---------------------------------------------------------------------------------------------------------------

def _pool(n_in, n_out):
    """Adaptive average pooling as a matrix (torch's bins), written out here independently of the package."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = int(np.floor(i * n_in / n_out)), int(np.ceil((i + 1) * n_in / n_out))
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def _dense_rayleigh(taps, eigvecs):
    """R[g, k] = z_{g,k}ᵀ P_g z_{g,k}, P_g = softmax(q kᵀ/√D) per (layer, timestep, head) in float64, z = pooled
    unit column; graphs ordered as from_taps groups them (by grid, first appearance; layers, then T·H)."""
    x = np.asarray(eigvecs, np.float64)[0]                                       # [K, H0, W0]
    k_eigs, h0, w0 = x.shape
    groups = {}
    for i in sorted(taps.layers):
        groups.setdefault(taps.layers[i].grid, []).append(taps.layers[i])
    rows = []
    for (h, w), ts in groups.items():
        z = np.einsum("hH,kHW,wW->hwk", _pool(h0, h), x, _pool(w0, w)).reshape(h * w, k_eigs)
        z /= np.linalg.norm(z, axis=0, keepdims=True)
        for t in ts:
            q, k = np.asarray(t.q, np.float64)[0], np.asarray(t.k, np.float64)[0]  # [T·H, N, D]
            s = q @ np.swapaxes(k, 1, 2) / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            rows.append(np.einsum("nk,gnm,mk->gk", z, p, z))
    rq = np.concatenate(rows)
    return rq, rq.sum(1).mean()                          # equal weights: Σ_k mean over all graphs


def test_multigrid_solves_match_dense_rayleigh(taps):
    graphs = G.from_taps(taps, "qk")
    assert [g.grid for g in graphs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert [g.batch_shape for g in graphs] == [(5, 6), (5, 6), (5, 6), (1, 6)]   # layers × (T·H)
    exact = solvers.exact.exact(graphs, 6)
    gd = solvers.gd.gd(graphs, 6, sample=0.25, steps=200, seed=0)
    assert gd.info["sample"] == 0.25
    for res in (exact, gd):
        assert res.eigvecs.shape == (1, 6, 16, 16) and res.rq.shape == (1, 16 * len(TS) * H, 6)
        rq, obj = _dense_rayleigh(taps, res.eigvecs)
        np.testing.assert_allclose(res.rq[0], rq, rtol=0, atol=2e-5, err_msg=res.method)
        assert res.objective[0] == pytest.approx(obj, abs=2e-5)
    # stochastic steps (a quarter of each group's (layer, timestep, head) graphs) still approach the exact solve
    assert gd.objective[0] >= 0.98 * exact.objective[0]
    full = solvers.gd.gd(graphs, 6, steps=20, seed=0)                      # same start, every graph every step
    assert not np.allclose(full.history, gd.history[:, :20], rtol=1e-4)    # the sampled objective differs per step


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_extract_solve_with_timesteps(image_file, tmp_path, capsys):
    acts = tmp_path / "acts.npz"
    assert main(["extract", image_file, "--model", "sd_tiny", "--weights", "random", "--size", "64",
                 "--timesteps", "10,200", "--out", str(acts)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["image_size"] == [64, 80] and summary["timesteps"] == [10, 200] and summary["heads"] == 2
    assert summary["grids"] == [[8, 10], [4, 5], [2, 3], [1, 2]] and summary["graphs_per_layer"] == 4
    # grid: the finest (what solve reports), head_dim per layer where they differ — not layer 0's alone
    assert summary["grid"] == [8, 10] and summary["head_dim"]["0"] == 16 and summary["head_dim"]["6"] == 32
    loaded = load_acts(str(acts))
    assert loaded.timesteps == (10, 200) and loaded.model == "sd_tiny" and loaded.image_size == (64, 80)
    assert int(np.load(acts)["num_heads"]) == 2
    assert loaded.taps.layers[0].q.shape == (1, 4, 80, 16) and loaded.taps.layers[6].grid == (1, 2)
    assert loaded.taps.layers[6].q.shape[3] == 32
    assert main(["extract", image_file, "--model", "sd_tiny", "--weights", "random", "--size", "64",
                 "--timesteps", "10", "--layers", "6,15", "--out", str(tmp_path / "two.npz")]) == 0
    two = json.loads(capsys.readouterr().out)           # layer 6 (the 1×1 mid block) used to give grid and head_dim
    assert two["grid"] == [8, 10] and two["grids"] == [[8, 10], [1, 2]] and two["head_dim"] == {"6": 32, "15": 16}

    out = tmp_path / "gd.npz"
    assert main(["solve", str(acts), "--graph", "qk", "--method", "gd", "--sample", "0.5", "--steps", "40",
                 "--num-eigs", "5", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "gd-eigen" and res["sample"] == 0.5 and res["steps"] == 40
    assert np.load(out)["rq"].shape == (16 * 4, 5)

    acts2 = tmp_path / "acts2.npz"
    assert main(["extract", image_file, "--model", "sd_tiny", "--weights", "random", "--size", "64",
                 "--num-timesteps", "3", "--schedule", "increasing", "--t-max", "90", "--layers", "0,6,15",
                 "--out", str(acts2)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["timesteps"] == [0, 45, 90] and summary["layers"] == [0, 6, 15]
    assert main(["solve", str(acts2), "--graph", "vv", "--num-eigs", "4", "--out", str(tmp_path / "x.npz")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "sd15"], "hf download runwayml/stable-diffusion-v1-5"),
    (["--model", "sd_tiny", "--weights", "random", "--timesteps", "0,1000"], "each must be in [0, 999]"),
    (["--model", "sd_tiny", "--weights", "random", "--timesteps", "5", "--schedule", "cyclic"],
     "cannot be combined with --num-timesteps/--schedule/--t-max"),
    (["--model", "sd_tiny", "--weights", "random", "--hidden"], "not available for Stable Diffusion models"),
    (["--model", "sd_tiny", "--weights", "random", "--layers", "16"], "the model has layers 0..15"),
    (["--model", "sd_tiny", "--weights", "random", "--size", "60x80"], "multiple of the patch size 8"),
    (["--model", "dino_vits16", "--weights", "random", "--timesteps", "5"], "--timesteps: does not apply to dino_vits16"),
    (["--model", "sd99"], "unknown model — choose one of: dino_vits16"),
])
def test_extract_errors(image_file, tmp_path, capsys, argv, message):
    out = tmp_path / "a.npz"
    assert main(["extract", image_file, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_analyze_with_a_diffusion_model(image_file, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["analyze", image_file, "--model", "sd_tiny", "--weights", "random", "--size", "64",
                 "--num-eigs", "4", "--out", str(out)]) == 0
    summary = json.loads((out / "photo" / "summary.json").read_text())
    assert summary["model"] == "sd_tiny" and summary["num_eigs"] == 4
    assert (out / "photo" / "result.npz").exists() and (out / "photo" / "segments.png").exists()
    assert np.load(out / "photo" / "result.npz")["eigvecs"].shape == (1, 4, 8, 10)


def test_analyze_takes_the_family_flags(image_file, tmp_path, capsys):
    """analyze reads the family flags as extract does: the timesteps given are the ones solved on (summary.json);
    a family flag given to a ViT is one line, exit 2, nothing written."""
    out = tmp_path / "report"
    assert main(["analyze", image_file, "--model", "sd_tiny", "--weights", "random", "--size", "64",
                 "--num-eigs", "4", "--timesteps", "10,200", "--out", str(out)]) == 0
    assert json.loads((out / "photo" / "summary.json").read_text())["timesteps"] == [10, 200]
    capsys.readouterr()
    bad = tmp_path / "vit"
    assert main(["analyze", image_file, "--model", "dino_vits16", "--weights", "random", "--timesteps", "10",
                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--timesteps" in err[0] and "sd15" in err[0]
    assert not bad.exists()
