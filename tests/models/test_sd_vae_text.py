"""The VAE encoder, the CLIP text encoder and the DDPM noise schedule vs their diffusers / transformers references.

VAE and text encoder: random-init references with every parameter perturbed, saved with `save_pretrained`, loaded
through our converter. Tolerances (max |ours − ref| ≤ tol · max |ref|, float32 on both sides, matmul precision
pinned to float32): VAE posterior mean/log-variance 2e-5 (measured ≤ 2e-6: two stacks of 3×3 convs and one
attention); text encoder 1e-5 (measured ≤ 4e-7: a 2-layer transformer). Schedule: ᾱ_t to 2e-6 absolute and
add_noise to 2e-6 absolute — diffusers accumulates the product of 1000 factors in float32 (rounding ≤ ~1e-6),
we in float64; a wrong β endpoint or a linear instead of scaled-linear schedule moves ᾱ by > 1e-3.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sjtest import close_to_ref, perturb  # noqa: E402
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models.sd.clip_text import empty_prompt_ids  # noqa: E402
from spectral_jax.models.sd.scheduler import DDPMSchedule  # noqa: E402
from spectral_jax.models.sd.params import load_text_encoder, load_vae, text_config_from_hf  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# VAE encoder
# ---------------------------------------------------------------------------------------------------------------

VAE_SMALL = dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=2, norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderKL(**VAE_SMALL), 0)
    path = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(path)
    return ref, path


def _encode_ref(ref, x):
    with torch.no_grad():
        d = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    return nhwc(d.mean), nhwc(d.logvar), nhwc(d.std)


def test_vae_encoder_matches_diffusers(vae_pair):
    ref, path = vae_pair
    ours = load_vae(str(path))
    assert ours.cfg.downscale == 4 and ours.cfg.scaling_factor == pytest.approx(0.18215)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
    mean, logvar, std = _encode_ref(ref, x)
    m, lv = jax.jit(ours.__call__)(jnp.asarray(x))
    close_to_ref(m, mean, 2e-5, "posterior mean")
    close_to_ref(lv, logvar, 2e-5, "posterior log-variance")
    close_to_ref(ours.encode(jnp.asarray(x)), 0.18215 * mean, 2e-5, "scaled latent (mean)")
    key = jax.random.key(3)
    eps = np.asarray(jax.random.normal(key, (1, *mean.shape[1:])))   # one image's draw, the same for the batch
    close_to_ref(ours.encode(jnp.asarray(x), key), 0.18215 * (mean + std * eps), 2e-5, "scaled latent (sample)")


def test_vae_old_attention_names_and_conv_layout(vae_pair, tmp_path):
    """Old diffusers checkpoints name the mid-block attention query/key/value/proj_attn (some store them as 1×1
    convs); both load to the same model. The decoder is ignored, an unknown tensor is refused."""
    from safetensors.numpy import load_file, save_file

    ref, path = vae_pair
    tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    old = {}
    for k, v in tensors.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        old[k] = v
    assert any(".query.weight" in k for k in old) and any(k.startswith("decoder.") for k in old)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    a, b = load_vae(str(path)), load_vae(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(a.encode(x)), np.asarray(b.encode(x)))
    save_file({**old, "encoder.extra.weight": np.zeros(3, np.float32)},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(InputError, match=r"1 tensor\(s\) not in the key table: encoder\.extra\.weight"):
        load_vae(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# CLIP text encoder
# ---------------------------------------------------------------------------------------------------------------

def _text_ref(act, tmp_path_factory, prefix):
    cfg = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, hidden_act=act, bos_token_id=998, eos_token_id=999,
                                      pad_token_id=1)
    torch.manual_seed(1)
    ref = perturb(transformers.CLIPTextModel(cfg), 1)
    path = tmp_path_factory.mktemp(f"text-{act}")
    ref.save_pretrained(path)
    if prefix:  # Hub checkpoints (transformers 4.x) store `text_model.*` keys and the position_ids buffer
        from safetensors.numpy import load_file, save_file

        file = str(path / "model.safetensors")
        tensors = {f"text_model.{k}": v for k, v in load_file(file).items()}
        tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        save_file(tensors, file)
    return ref, path


@pytest.mark.parametrize("act, prefix", [("quick_gelu", True), ("gelu", False)])
def test_text_encoder_matches_transformers(act, prefix, tmp_path_factory):
    ref, path = _text_ref(act, tmp_path_factory, prefix)
    ours = load_text_encoder(str(path))
    assert ours.cfg.hidden_act == act and ours.cfg.vocab_size == 1000
    run = jax.jit(ours.__call__)
    outs = {}
    for pad in ("eos", "zero"):
        ids = empty_prompt_ids(ours.cfg, pad)
        assert ids.shape == (1, 77) and list(ids[0, :3]) == [998, 999, 999 if pad == "eos" else 0]
        with torch.no_grad():
            want = ref(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
        outs[pad] = np.asarray(run(ids))
        close_to_ref(outs[pad], want, 1e-5, f"{act} empty prompt, pad={pad}")
    # causal attention: BOS/EOS positions do not see the padding; every later position does
    np.testing.assert_allclose(outs["eos"][:, :2], outs["zero"][:, :2], atol=1e-6)
    assert (np.abs(outs["eos"][0, 2:] - outs["zero"][0, 2:]).max(axis=-1) > 1e-3).all()
    ids = np.random.default_rng(0).integers(0, 1000, (2, 9))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    close_to_ref(run(ids), want, 1e-5, f"{act} random ids")


def test_empty_prompt_ids_follow_the_sd_tokenizers():
    """SD 1.x: BOS 49406, EOS 49407, padded with EOS; SD 2.x: padded with "!" = 0 (the published tokenizers)."""
    from spectral_jax.models.sd import SD_MODELS

    sd1 = empty_prompt_ids(SD_MODELS["sd15"].config.text, SD_MODELS["sd15"].config.pad)
    sd2 = empty_prompt_ids(SD_MODELS["sd21_base"].config.text, SD_MODELS["sd21_base"].config.pad)
    assert sd1.tolist() == [[49406, 49407] + [49407] * 75]
    assert sd2.tolist() == [[49406, 49407] + [0] * 75]
    assert SD_MODELS["sd14"].config.pad == "eos"


def test_text_config_reads_sd_text_encoders():
    sd1 = {"model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "hidden_act": "quick_gelu", "bos_token_id": 0, "eos_token_id": 2}
    sd2 = {"model_type": "clip_text_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
           "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
    from spectral_jax.models.sd import SD_MODELS

    assert text_config_from_hf(sd1) == SD_MODELS["sd15"].config.text
    assert text_config_from_hf(sd2) == SD_MODELS["sd21_base"].config.text
    with pytest.raises(InputError, match="is not a CLIP text model"):
        text_config_from_hf({"model_type": "t5"})


# ---------------------------------------------------------------------------------------------------------------
# DDPM schedule
# ---------------------------------------------------------------------------------------------------------------

def test_add_noise_matches_diffusers_ddpm():
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000)
    ours = DDPMSchedule()
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-5, atol=0)
    assert ours.alphas_cumprod[0] == pytest.approx(1 - 0.00085) and ours.betas[-1] == pytest.approx(0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 4, 6, 6, generator=g)
    t = torch.tensor([0, 1, 250, 500, 999])
    want = ref.add_noise(x0, noise, t).numpy()
    got = ours.add_noise(jnp.asarray(x0.numpy()), jnp.asarray(noise.numpy()), jnp.asarray(t.numpy()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6)
    got = jax.jit(lambda t: ours.add_noise(jnp.asarray(x0[2:3].numpy()), jnp.asarray(noise[2:3].numpy()), t))(250)
    np.testing.assert_allclose(np.asarray(got), want[2:3], rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        ours.check([0, 1000])
