"""PixArt-Σ behind the backbone contract: the DDPM schedule against diffusers' scheduler, the timestep folding, a
diffusers-layout checkpoint directory (transformer/ + vae/ + scheduler/), the caption-embedding option, offline
refusals, and `extract`/`solve`/`analyze` on `pixart_tiny` with random weights.

Schedule tolerance: ᾱ_t and add_noise to 2e-6 absolute — diffusers accumulates the product of 1000 factors in
float32, we in float64; the SD schedule (scaled-linear 0.00085 → 0.012) instead of PixArt's linear 0.0001 → 0.02
moves ᾱ by > 1e-2.
"""

import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from spectral_jax.cli import main  # noqa: E402
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models import load_backbone  # noqa: E402
from spectral_jax.models import testing  # noqa: E402
from spectral_jax.models.dit import collect_taps, load_dit  # noqa: E402

TINY = testing.MODELS["pixart_tiny"].config


def test_pixart_schedule_matches_diffusers():
    ref = diffusers.DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    ours = TINY.schedule
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for t in (0, 37, 500, 999):
        want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.tensor([t, t])).numpy()
        np.testing.assert_allclose(np.asarray(ours.add_noise(x0, eps, t)), want, rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def tiny():
    return load_dit("pixart_tiny", "random")


def test_taps_fold_timesteps_into_heads(tiny):
    """Per layer `[B, T·H, N, D]`, timestep-major: block i·H..(i+1)·H is the transformer on x_{t_i}."""
    from spectral_jax.models.sd.diffusion import encode_images, noisy_latents

    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 48, 80, 3)), jnp.float32)
    taps = collect_taps(images, tiny, [10, 600], seed=3, layers=[1, 3])
    h = TINY.transformer.num_attention_heads
    assert sorted(taps.layers) == [1, 3] and taps.layers[3].q.shape == (2, 2 * h, 3 * 5, 16)
    xt = noisy_latents(tiny, encode_images(tiny, images, seed=3), [10, 600], seed=3)     # [T, B, h, w, 4]
    run = jax.jit(lambda x, t: tiny.transformer(x, t, tiny.context, layers=[3])[1].layers[3].k)
    for i, t in enumerate((10, 600)):
        np.testing.assert_allclose(np.asarray(taps.layers[3].k[:, i * h:(i + 1) * h]), np.asarray(run(xt[i], t)),
                                   rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A diffusers-layout pixart_tiny: random transformer/ and vae/, the PixArt scheduler config."""
    root = tmp_path_factory.mktemp("pixart-tiny")
    t, v = TINY.transformer, TINY.vae
    torch.manual_seed(0)
    diffusers.PixArtTransformer2DModel(
        num_attention_heads=t.num_attention_heads, attention_head_dim=t.attention_head_dim, num_layers=t.num_layers,
        cross_attention_dim=t.cross_attention_dim, caption_channels=t.caption_channels, sample_size=t.sample_size,
        use_additional_conditions=False, norm_num_groups=1).save_pretrained(root / "transformer")
    diffusers.AutoencoderKL(block_out_channels=v.block_out_channels, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=v.layers_per_block,
                            norm_num_groups=v.norm_num_groups, scaling_factor=v.scaling_factor
                            ).save_pretrained(root / "vae")
    diffusers.DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
                                          ).save_pretrained(root / "scheduler")
    return root


def test_checkpoint_directory_and_caption_embedding(checkpoint, tmp_path):
    bb = load_backbone("pixart_tiny", str(checkpoint), timesteps=[100])
    x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
    zero = bb.taps(x, [0]).layers[0]
    assert zero.grid == (2, 3) and bb.timesteps == (100,) and bb.heads(0) == 2
    emb = tmp_path / "caption.npy"
    np.save(emb, np.random.default_rng(2).standard_normal((7, 24)).astype(np.float32))
    texted = load_backbone("pixart_tiny", str(checkpoint), timesteps=[100], text_embedding=str(emb)).taps(x, [0, 1])
    np.testing.assert_allclose(np.asarray(texted.layers[0].q), np.asarray(zero.q), atol=1e-6)   # before attn2
    assert not np.allclose(np.asarray(texted.layers[1].q), np.asarray(bb.taps(x, [1]).layers[1].q), atol=1e-4)
    np.save(emb, np.zeros((7, 4096), np.float32))
    with pytest.raises(InputError, match=r"has shape \(1, 7, 4096\), the transformer needs \[1, M, 24\]"):
        load_dit("pixart_tiny", str(checkpoint), text_embedding=str(emb))


def test_checkpoint_refusals(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "sd-scheduler"
    shutil.copytree(checkpoint, bad)
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
                            ).save_pretrained(bad / "scheduler")
    with pytest.raises(InputError, match="describes the noise schedule"):
        load_dit("pixart_tiny", str(bad))
    only = tmp_path / "transformer-only"
    shutil.copytree(checkpoint / "transformer", only / "transformer")
    with pytest.raises(InputError, match=r"hf download PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"):
        load_dit("pixart_sigma_512", str(only))     # the VAE's repository, offline, not in the (empty) cache


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_cli_extract_solve_analyze(image_file, tmp_path, capsys):
    acts = tmp_path / "acts.npz"
    assert main(["extract", image_file, "--model", "pixart_tiny", "--weights", "random", "--size", "64",
                 "--timesteps", "10,200", "--out", str(acts)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["image_size"] == [64, 80] and summary["timesteps"] == [10, 200] and summary["heads"] == 2
    assert summary["grids"] == [[4, 5]] and summary["graphs_per_layer"] == 4 and summary["layers"] == [0, 1, 2, 3]
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out", str(tmp_path / "r.npz")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_eigs"] == 3 and np.load(tmp_path / "r.npz")["eigvecs"].shape == (1, 3, 4, 5)
    out = tmp_path / "report"
    assert main(["analyze", image_file, "--model", "pixart_tiny", "--weights", "random", "--size", "64",
                 "--num-eigs", "3", "--out", str(out)]) == 0
    assert json.loads((out / "photo" / "summary.json").read_text())["model"] == "pixart_tiny"
    assert np.load(out / "photo" / "result.npz")["eigvecs"].shape == (1, 3, 4, 5)


@pytest.mark.parametrize("argv, message", [
    (["--model", "pixart_sigma"], "hf download PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
    (["--model", "pixart_tiny", "--weights", "random", "--size", "56x80"], "multiple of the patch size 16"),
    (["--model", "pixart_tiny", "--weights", "random", "--hidden"], "not available for diffusion transformer"),
])
def test_cli_errors(image_file, tmp_path, capsys, argv, message):
    out = tmp_path / "a.npz"
    assert main(["extract", image_file, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
