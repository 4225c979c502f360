"""`load_sd`: a diffusers-layout pipeline directory (unet/, vae/, text_encoder/) → UNet + VAE encoder + empty-prompt
embedding, end to end against the references; weight sources (directory, HF cache, saved embedding) and the
errors a user can cause (missing weights offline, wrong architecture, missing parts, bad embedding file).

The directory is written by random-init diffusers/transformers models with the `sd_tiny` architecture (every
parameter perturbed). Tolerances as in test_sd_unet.py / test_sd_vae_text.py (2e-5 relative to max |ref|,
float32 both sides; measured ≤ 3e-6).
"""

import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sjtest import close_to_ref, perturb  # noqa: E402
from spectral_jax.models.sd.diffusion import collect_taps, encode_images, noisy_latents  # noqa: E402
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models.sd.clip_text import empty_prompt_ids  # noqa: E402
from spectral_jax.models import testing  # noqa: E402
from spectral_jax.models.sd import load_sd, save_empty_prompt_embedding  # noqa: E402

TOL = 2e-5


def close(ours, ref, what):
    close_to_ref(ours, ref, TOL, what)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A diffusers-layout directory with the sd_tiny architecture, and the torch references."""
    cfg = testing.MODELS["sd_tiny"].config
    root = tmp_path_factory.mktemp("sd-tiny")
    torch.manual_seed(0)
    unet = perturb(diffusers.UNet2DConditionModel(
        block_out_channels=cfg.unet.block_out_channels, attention_head_dim=cfg.unet.num_attention_heads[0],
        cross_attention_dim=cfg.unet.cross_attention_dim, norm_num_groups=cfg.unet.norm_num_groups), 0)
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=cfg.vae.block_out_channels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=cfg.vae.layers_per_block,
        norm_num_groups=cfg.vae.norm_num_groups), 1)
    text = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        bos_token_id=998, eos_token_id=999)), 2)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        root / "scheduler")
    return root, unet, vae, text


def test_load_sd_end_to_end_matches_references(tiny_dir):
    """Empty-prompt embedding, VAE latent, and collect_taps (noisy latents at two timesteps → UNet q/k/v,
    timestep-major) against the torch modules."""
    root, unet, vae, text = tiny_dir
    sd = load_sd("sd_tiny", str(root))
    assert sd.unet.cfg == testing.MODELS["sd_tiny"].config.unet and sd.vae.cfg == testing.MODELS["sd_tiny"].config.vae
    with torch.no_grad():
        ids = torch.from_numpy(empty_prompt_ids(sd.cfg.text, "eos").astype(np.int64))
        context = text(ids).last_hidden_state
    close(sd.context, context.numpy(), "empty-prompt embedding")

    x = np.random.default_rng(0).uniform(-1, 1, (1, 64, 48, 3)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean
    latents = encode_images(sd, x)
    close(latents, 0.18215 * mean.permute(0, 2, 3, 1).numpy(), "scaled latent")

    ts = [20, 700]
    taps = collect_taps(x, sd, ts, seed=5)
    xt = np.asarray(noisy_latents(sd, latents, ts, seed=5))                          # [T, 1, 8, 6, 4]
    caps, order = {}, []
    for name, mod in unet.named_modules():
        if m := re.fullmatch(r"(.*\.attn1)\.(to_[qkv])", name):
            def hook(mod, args, out, key=(m[1], m[2])):
                caps[key] = out.detach().numpy()
                if key[0] not in order:
                    order.append(key[0])
            mod.register_forward_hook(hook)
    heads = 2
    for i, t in enumerate(ts):
        caps.clear(), order.clear()
        with torch.no_grad():
            unet(torch.from_numpy(xt[i].copy()).permute(0, 3, 1, 2), t, context)
        assert len(order) == len(taps.layers) == 16
        for j, layer in enumerate(order):
            tap = taps.layers[j]
            b, th, n, d = tap.q.shape
            assert th == len(ts) * heads
            for proj, arr in (("to_q", tap.q), ("to_k", tap.k), ("to_v", tap.v)):
                mine = np.asarray(arr)[:, i * heads:(i + 1) * heads]                 # timestep-major
                close(mine.transpose(0, 2, 1, 3).reshape(b, n, heads * d), caps[(layer, proj)],
                      f"t={t} layer {j} {proj}")


def test_saved_embedding_replaces_the_text_encoder(tiny_dir, tmp_path):
    root, *_ = tiny_dir
    npy = str(tmp_path / "empty.npy")
    arr = save_empty_prompt_embedding("sd_tiny", str(root), npy)
    assert arr.shape == (1, 77, 32) and os.listdir(tmp_path) == ["empty.npy"]
    partial = tmp_path / "no-text"
    shutil.copytree(root / "unet", partial / "unet")
    shutil.copytree(root / "vae", partial / "vae")
    with pytest.raises(InputError, match="has no text_encoder/ folder — add it .*or pass a saved empty-prompt"):
        load_sd("sd_tiny", str(partial))
    sd = load_sd("sd_tiny", str(partial), text_embedding=npy)
    np.testing.assert_array_equal(np.asarray(sd.context), arr)
    np.save(tmp_path / "bad.npy", np.zeros((77, 31), np.float32))
    with pytest.raises(InputError, match=r"bad\.npy: has shape \(1, 77, 31\), the UNet needs \(1, 77, 32\)"):
        load_sd("sd_tiny", str(partial), text_embedding=str(tmp_path / "bad.npy"))


def test_found_in_the_hub_cache(tiny_dir, tmp_path, monkeypatch):
    root, *_ = tiny_dir
    cache = tmp_path / "hub"
    snap = cache / "models--someone--sd-tiny" / "snapshots" / "0123abc"
    shutil.copytree(root, snap)
    (cache / "models--someone--sd-tiny" / "refs").mkdir()
    (cache / "models--someone--sd-tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    sd = load_sd("sd_tiny", "someone/sd-tiny", attn_chunk=64)
    assert sd.context.shape == (1, 77, 32)
    assert sd.unet.cfg.attn_chunk == 64 == sd.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn1.chunk


@pytest.mark.parametrize("name, repo", [("sd15", "runwayml/stable-diffusion-v1-5"),
                                        ("sd21_base", "stabilityai/stable-diffusion-2-1-base"),
                                        ("sd14", "CompVis/stable-diffusion-v1-4")])
def test_missing_weights_offline_name_the_download(name, repo):
    with pytest.raises(InputError) as e:
        load_sd(name)
    msg = str(e.value)
    assert f"weights {repo!r}: not in the HF cache and HF_HUB_OFFLINE is set" in msg
    assert f"hf download {repo} model_index.json unet/config.json unet/diffusion_pytorch_model.safetensors" in msg
    assert "--weights DIR" in msg


def test_wrong_architecture_and_bad_sources(tiny_dir, tmp_path):
    root, *_ = tiny_dir
    with pytest.raises(InputError, match=r"unet/config\.json: describes a different model: block_out_channels="
                                         r"\(32, 64, 64, 64\) \(expected \(320, 640, 1280, 1280\)\)"):
        load_sd("sd15", str(root))
    with pytest.raises(InputError, match="has no unet/ and vae/ subfolders"):
        load_sd("sd_tiny", str(tmp_path))
    with pytest.raises(InputError, match="no such directory, and not a Hugging Face repo id"):
        load_sd("sd_tiny", "/no/such/dir")
    with pytest.raises(InputError, match="has no published weights — pass --weights random"):
        load_sd("sd_tiny")
    sched = tmp_path / "linear"
    shutil.copytree(root, sched)
    cfg = json.loads((sched / "scheduler" / "scheduler_config.json").read_text())
    (sched / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "beta_schedule": "linear"}))
    with pytest.raises(InputError, match="describes the noise schedule"):
        load_sd("sd_tiny", str(sched))
