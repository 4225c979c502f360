"""Our Flax SD3 / SD3.5 MM-DiT vs diffusers' `SD3Transformer2DModel` (PyTorch), through our own converter; the
rectified-flow schedule vs `FlowMatchEulerDiscreteScheduler`; the 16-channel VAE with its latent shift; sd3_tiny
behind the backbone contract and on the command line.

References: random-init diffusers transformers with every parameter perturbed, saved with `save_pretrained` (the
SD3.5-style one — RMS q/k norms — sharded with an index) and loaded with `load_transformer`. Latent grids: the
trained one and a non-square one (the position table cropped off-centre-sized). Compared stage by stage: patch +
position embedding, the time/pooled-text embedding, the context embedder, every block's image-token q/k (after the
q/k norms, hooks on norm_q/norm_k when present, else on to_q/to_k) and v, every block's image-stream output, and
the final output, at flow timesteps 3 and 1000.

Tolerance: max |ours − ref| ≤ 2e-5 · max |ref| per stage (float32 on both sides, matmul precision pinned to float32;
measured ≤ 3e-6: summation order). A mapping mistake (context and image projections swapped, the last block's
AdaLayerNormContinuous read as (shift, scale) instead of (scale, shift), a missing q/k norm, a mis-centred crop)
moves these stages by 1e-3 to 1 relative. Schedule: σ and scale_noise agree exactly (same float32 formula).
"""

import json
import re

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sjtest import close_to_ref, perturb  # noqa: E402
from spectral_jax.cli import main  # noqa: E402
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models import testing  # noqa: E402
from spectral_jax.models.dit import DIT_MODELS, load_dit  # noqa: E402
from spectral_jax.models.dit.flow import FlowSchedule  # noqa: E402
from spectral_jax.models.dit.params import load_transformer  # noqa: E402

TOL = 2e-5
CONFIGS = {
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
                pos_embed_max_size=12),
    "sd35": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4,
                 num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=12, pooled_projection_dim=6,
                 pos_embed_max_size=7, qk_norm="rms_norm"),
}
SIZES = {"sd3": [(8, 8), (6, 12)], "sd35": [(14, 14), (10, 4)]}


def close(ours, ref, what):
    close_to_ref(ours, ref, TOL, what)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(diffusers.SD3Transformer2DModel(**CONFIGS[request.param]), 0)
    path = tmp_path_factory.mktemp(f"sd3-{request.param}")
    ref.save_pretrained(path, **({"max_shard_size": "20KB"} if request.param == "sd35" else {}))
    return request.param, ref, path, load_transformer(str(path))


def hooks(ref, normed):
    caps = {}

    def keep(name):
        def hook(mod, args, out):
            caps[name] = out
        return hook

    proj = r"norm_q|norm_k|to_v" if normed else r"to_q|to_k|to_v"
    for name, mod in ref.named_modules():
        if re.fullmatch(rf"transformer_blocks\.\d+(\.attn\.({proj}))?|pos_embed|time_text_embed|context_embedder",
                        name):
            mod.register_forward_hook(keep(name))
    return caps


def test_config_read_from_checkpoint(pair):
    name, ref, path, ours = pair
    cfg, want = ours.cfg, CONFIGS[name]
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.qk_norm) == (want["num_layers"], want["num_attention_heads"],
                                                                     want.get("qk_norm"))
    assert ours.transformer_blocks[-1].ff_context is None and ours.transformer_blocks[0].ff_context is not None
    if name == "sd35":
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()


def test_stages_match_diffusers(pair):
    name, ref, path, ours = pair
    normed = ours.cfg.qk_norm is not None
    caps = hooks(ref, normed)

    @jax.jit
    def fwd(x, t, context, pooled):
        tt = jnp.full((x.shape[0],), t, jnp.float32)
        return (ours(x, t, (context, pooled), hidden=True), ours.pos_embed(x), ours.time_text_embed(tt, pooled),
                ours.context_embedder(context))

    rng = np.random.default_rng(1)
    heads, dim = ours.cfg.num_attention_heads, ours.cfg.attention_head_dim
    for hw in SIZES[name]:
        x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
        context = rng.standard_normal((2, 5, ours.cfg.joint_attention_dim)).astype(np.float32)
        pooled = rng.standard_normal((2, ours.cfg.pooled_projection_dim)).astype(np.float32)
        for t in (3.0, 1000.0):
            caps.clear()
            with torch.no_grad():
                out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(context),
                          torch.from_numpy(pooled), torch.tensor([t, t])).sample
            what = f"{name} {hw} t={t}"
            (eps, taps), stem, temb, ctx = fwd(jnp.asarray(x), t, jnp.asarray(context), jnp.asarray(pooled))
            close(stem, caps["pos_embed"].numpy(), f"{what} patch+position embedding")
            close(temb, caps["time_text_embed"].numpy(), f"{what} time+pooled-text embedding")
            close(ctx, caps["context_embedder"].numpy(), f"{what} context embedder")
            close(eps, out.permute(0, 2, 3, 1).numpy(), f"{what} output")
            n = (hw[0] // 2) * (hw[1] // 2)
            for i, tap in taps.layers.items():
                assert tap.grid == (hw[0] // 2, hw[1] // 2) and tap.q.shape == (2, heads, n, dim)
                pre = f"transformer_blocks.{i}.attn."
                for proj, arr in (("q", tap.q), ("k", tap.k), ("v", tap.v)):
                    ref_arr = caps[pre + (f"norm_{proj}" if normed and proj != "v" else f"to_{proj}")].numpy()
                    if ref_arr.ndim == 3:   # to_* outputs [B, N, H·D]
                        ref_arr = ref_arr.reshape(2, n, heads, dim).transpose(0, 2, 1, 3)
                    close(arr, ref_arr, f"{what} block {i} image {proj}")
                close(taps.hidden[i], caps[f"transformer_blocks.{i}"][1].numpy(), f"{what} block {i} output")


def test_flow_schedule_matches_diffusers():
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = FlowSchedule(shift=3.0)
    np.testing.assert_array_equal(ours.sigmas[::-1], ref.sigmas.numpy())
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 16, 4, 4)).astype(np.float32), rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
    for t in (0, 1, 250, 999):
        j = 999 - t
        ts = ref.timesteps[j:j + 1].repeat(2)
        want = ref.scale_noise(torch.from_numpy(x0), ts, torch.from_numpy(eps)).numpy()
        np.testing.assert_allclose(np.asarray(ours.add_noise(x0, eps, t)), want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours.model_timestep([t, t])), ts.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"in \[0, 999\]"):
        ours.check([1000])


# ---------------------------------------------------------------------------------------------------------------
# sd3_tiny: a diffusers-layout directory, the VAE's shift, the backbone and the command line
# ---------------------------------------------------------------------------------------------------------------

TINY = testing.MODELS["sd3_tiny"].config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-tiny")
    t, v = TINY.transformer, TINY.vae
    torch.manual_seed(0)
    perturb(diffusers.SD3Transformer2DModel(
        sample_size=t.sample_size, patch_size=t.patch_size, in_channels=t.in_channels, out_channels=t.out_channels,
        num_layers=t.num_layers, attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
        joint_attention_dim=t.joint_attention_dim, caption_projection_dim=t.caption_projection_dim,
        pooled_projection_dim=t.pooled_projection_dim, pos_embed_max_size=t.pos_embed_max_size,
        qk_norm=t.qk_norm), 1).save_pretrained(root / "transformer")
    vae = perturb(diffusers.AutoencoderKL(
        block_out_channels=v.block_out_channels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=v.layers_per_block, norm_num_groups=v.norm_num_groups,
        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=v.scaling_factor,
        shift_factor=TINY.vae_shift), 2)
    vae.save_pretrained(root / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    return root, vae


def test_vae_latents_are_shifted_and_scaled(checkpoint):
    root, vae = checkpoint
    model = load_dit("sd3_tiny", str(root))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean.permute(0, 2, 3, 1).numpy()
    want = (mean - TINY.vae_shift) * TINY.vae.scaling_factor
    close(model.latents(jnp.asarray(x)), want, "scaled, shifted latent (mean)")


def test_backbone_text_embedding_and_refusals(checkpoint, tmp_path):
    from spectral_jax.models import load_backbone

    root, _ = checkpoint
    x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 48, 3)).astype(np.float32)
    zero = load_backbone("sd3_tiny", str(root), timesteps=[100]).taps(x, [1]).layers[1]
    assert zero.q.shape == (1, 2, 6, 16) and zero.grid == (2, 3)
    emb = tmp_path / "text.npz"
    rng = np.random.default_rng(2)
    np.savez(emb, context=rng.standard_normal((7, 24)).astype(np.float32), pooled=rng.standard_normal(20))
    texted = load_backbone("sd3_tiny", str(root), timesteps=[100], text_embedding=str(emb)).taps(x, [1]).layers[1]
    assert not np.allclose(np.asarray(texted.q), np.asarray(zero.q), atol=1e-4)   # text joins the attention
    np.savez(emb, context=np.zeros((7, 24), np.float32))
    with pytest.raises(InputError, match="not exactly context and pooled"):
        load_dit("sd3_tiny", str(root), text_embedding=str(emb))
    cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(root, bad)
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "shift": 1.0}))
    with pytest.raises(InputError, match="describes the flow schedule"):
        load_dit("sd3_tiny", str(bad))


def test_cli_extract_solve(tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)).save(image)
    acts = tmp_path / "acts.npz"
    assert main(["extract", str(image), "--model", "sd3_tiny", "--weights", "random", "--size", "64",
                 "--num-timesteps", "2", "--schedule", "increasing", "--t-max", "500", "--out", str(acts)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["timesteps"] == [0, 500] and summary["grids"] == [[4, 5]] and summary["graphs_per_layer"] == 4
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out", str(tmp_path / "r.npz")]) == 0
    assert np.load(tmp_path / "r.npz")["eigvecs"].shape == (1, 3, 4, 5)
    assert main(["extract", str(image), "--model", "sd3_medium", "--out", str(tmp_path / "b.npz")]) == 2
    assert "hf download stabilityai/stable-diffusion-3-medium-diffusers" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3_medium", "sd35_large"])
def test_full_width_sd3_blocks(name, tmp_path):
    """SD3 Medium / SD3.5 Large at full width (their published config fields: heads, head dim, text widths, position
    table 192²), with two blocks instead of 24/38 (one joint block, one context_pre_only block) to keep it to
    minutes: our preset's fields are what diffusers builds from them, and the output and the taps match."""
    import dataclasses

    preset = DIT_MODELS[name].config.transformer
    cfg = dataclasses.replace(preset, num_layers=2)
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=preset.num_attention_heads, joint_attention_dim=4096,
        caption_projection_dim=preset.caption_projection_dim, pooled_projection_dim=2048, pos_embed_max_size=192,
        qk_norm=preset.qk_norm).eval()
    ref.save_pretrained(tmp_path)
    ours = load_transformer(str(tmp_path), cfg)
    caps = hooks(ref, preset.qk_norm is not None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 24, 16)).astype(np.float32)
    context = rng.standard_normal((1, 9, 4096)).astype(np.float32)
    pooled = rng.standard_normal((1, 2048)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(context), torch.from_numpy(pooled),
                  torch.tensor([500.0])).sample
    from flax import nnx

    graphdef, state = nnx.split(ours)    # the weights as an argument, not as constants of the compiled program
    run = jax.jit(lambda st, a, c, p: nnx.merge(graphdef, st)(a, 500.0, (c, p), hidden=True))
    eps, taps = run(state, jnp.asarray(x), jnp.asarray(context), jnp.asarray(pooled))
    close(eps, out.permute(0, 2, 3, 1).numpy(), f"{name} full-width output")
    for i in (0, 1):
        close(taps.hidden[i], caps[f"transformer_blocks.{i}"][1].numpy(), f"{name} block {i} output")
        k = caps[f"transformer_blocks.{i}.attn." + ("norm_k" if preset.qk_norm else "to_k")].numpy()
        k = k if k.ndim == 4 else k.reshape(1, 192, preset.num_attention_heads, 64).transpose(0, 2, 1, 3)
        close(taps.layers[i].k, k, f"{name} block {i} image k")
