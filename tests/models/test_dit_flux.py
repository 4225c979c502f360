"""Our Flax FLUX.1 transformer vs diffusers' `FluxTransformer2DModel` (PyTorch), through our own converter; the
dynamically shifted flow schedule vs `FlowMatchEulerDiscreteScheduler`; flux_tiny on the command line.

References: random-init diffusers transformers (guidance embedding on and off) with every parameter perturbed,
saved with `save_pretrained` and loaded with `load_transformer`; the reference is fed the pipeline's own packing
(`FluxPipeline._pack_latents`, `_prepare_latent_image_ids`) and its output unpacked with `_unpack_latents`. Latent
grids: square and non-square. Compared: every block's image-token q and k after the RMS norms and the rotary
embedding (hooks on norm_q/norm_k, rotated with diffusers' `apply_rotary_emb` and `FluxPosEmbed`), v, every block's
image-stream output, and the final output, at σ = 0.003 and 1.

Tolerance: max |ours − ref| ≤ 2e-5 · max |ref| per stage (float32 both sides, matmul precision pinned to float32;
summation order only). A mistake in the packing order, the rotary pairing (interleaved vs halves), the text/image
order of the joint sequence or the single block's [attention; MLP] concatenation moves a stage by 1e-2 to 1.
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
from spectral_jax.models.dit.flow import FlowSchedule  # noqa: E402
from spectral_jax.models.dit.params import load_transformer  # noqa: E402

TOL = 2e-5
CONFIGS = {
    "dev": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                axes_dims_rope=(2, 2, 4)),
    "schnell": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=12,
                    num_attention_heads=3, joint_attention_dim=8, pooled_projection_dim=6, guidance_embeds=False,
                    axes_dims_rope=(4, 4, 4)),
}
SIZES = {"dev": [(8, 8), (6, 10)], "schnell": [(4, 12)]}


def close(ours, ref, what):
    close_to_ref(ours, ref, TOL, what)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(diffusers.FluxTransformer2DModel(**CONFIGS[request.param]), 0)
    path = tmp_path_factory.mktemp(f"flux-{request.param}")
    ref.save_pretrained(path)
    return request.param, ref, load_transformer(str(path))


def test_stages_match_diffusers(pair):
    from diffusers import FluxPipeline
    from diffusers.models.embeddings import apply_rotary_emb

    name, ref, ours = pair
    caps = {}
    for mod_name, mod in ref.named_modules():
        if re.fullmatch(r"(single_)?transformer_blocks\.\d+(\.attn\.(norm_q|norm_k|to_v))?", mod_name):
            mod.register_forward_hook(lambda m, a, out, key=mod_name: caps.__setitem__(key, out))
    cfg = ours.cfg
    heads, dim, m = cfg.num_attention_heads, cfg.attention_head_dim, 5
    run = jax.jit(lambda x, t, c, p: ours(x, t, (c, p), hidden=True))
    rng = np.random.default_rng(1)
    for hw in SIZES[name]:
        x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
        context = rng.standard_normal((2, m, cfg.joint_attention_dim)).astype(np.float32)
        pooled = rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32)
        gh, gw, n = hw[0] // 2, hw[1] // 2, (hw[0] // 2) * (hw[1] // 2)
        nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
        packed = FluxPipeline._pack_latents(nchw, 2, 4, *hw)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, gh, gw, "cpu", torch.float32)
        txt_ids = torch.zeros(m, 3)
        cos, sin = ref.pos_embed(torch.cat([txt_ids, img_ids]))
        for sigma in (0.003, 1.0):
            caps.clear()
            with torch.no_grad():
                out = ref(packed, torch.from_numpy(context), torch.from_numpy(pooled), torch.tensor([sigma] * 2),
                          img_ids, txt_ids, torch.tensor([3.5] * 2) if cfg.guidance_embeds else None).sample
                want = FluxPipeline._unpack_latents(out, hw[0] * 8, hw[1] * 8, 8).permute(0, 2, 3, 1).numpy()
            what = f"{name} {hw} σ={sigma}"
            eps, taps = run(jnp.asarray(x), sigma * 1000, jnp.asarray(context), jnp.asarray(pooled))
            close(eps, want, f"{what} output")
            assert sorted(taps.layers) == list(range(cfg.num_layers))
            for i, tap in taps.layers.items():
                single = i >= cfg.num_double_layers
                pre = f"single_transformer_blocks.{i - cfg.num_double_layers}" if single else f"transformer_blocks.{i}"
                assert tap.grid == (gh, gw) and tap.q.shape == (2, heads, n, dim)
                for proj, arr in (("q", tap.q), ("k", tap.k)):
                    normed = caps[f"{pre}.attn.norm_{proj}"]                           # [B, T, H, D]
                    table = (cos, sin) if single else (cos[m:], sin[m:])
                    rotated = apply_rotary_emb(normed, table, sequence_dim=1)
                    rotated = rotated[:, m:] if single else rotated
                    close(arr, rotated.permute(0, 2, 1, 3).numpy(), f"{what} {pre} image {proj} after RoPE")
                v = caps[f"{pre}.attn.to_v"].numpy()
                v = (v[:, m:] if single else v).reshape(2, n, heads, dim).transpose(0, 2, 1, 3)
                close(tap.v, v, f"{what} {pre} image v")
                close(taps.hidden[i], caps[pre][1].numpy(), f"{what} {pre} output")


def test_dynamic_flow_schedule_matches_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ours = FlowSchedule(dynamic=True)
    for tokens in (16, 1024, 4096):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        ref.set_timesteps(1000, mu=calculate_shift(tokens))
        np.testing.assert_allclose(ours.sigmas_for(tokens)[::-1], ref.sigmas.numpy()[:-1], rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="needs the image-token count"):
        ours.sigmas_for(None)


def test_cli_extract_solve(tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)).save(image)
    acts = tmp_path / "acts.npz"
    assert main(["extract", str(image), "--model", "flux_tiny", "--weights", "random", "--size", "64",
                 "--timesteps", "100", "--layers", "1,2", "--out", str(acts)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [1, 2] and summary["grids"] == [[4, 5]] and summary["graphs_per_layer"] == 2
    assert main(["solve", str(acts), "--graph", "qk", "--num-eigs", "3", "--out", str(tmp_path / "r.npz")]) == 0
    assert np.load(tmp_path / "r.npz")["eigvecs"].shape == (1, 3, 4, 5)
    assert main(["extract", str(image), "--model", "flux1_dev", "--out", str(tmp_path / "b.npz")]) == 2
    assert "hf download black-forest-labs/FLUX.1-dev" in capsys.readouterr().err


@pytest.mark.slow
def test_full_width_flux_blocks(tmp_path):
    """FLUX.1 [dev] at full width (its published config fields: 24 heads × 128, RoPE axes (16, 56, 56), T5 4096,
    CLIP 768, guidance embedding) with one double- and one single-stream block instead of 19 + 38: our preset's
    fields are what diffusers builds from them, and the output matches."""
    import dataclasses

    from flax import nnx
    from diffusers import FluxPipeline

    from spectral_jax.models.dit import DIT_MODELS

    cfg = dataclasses.replace(DIT_MODELS["flux1_dev"].config.transformer, num_double_layers=1, num_single_layers=1)
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).eval()
    ref.save_pretrained(tmp_path)
    ours = load_transformer(str(tmp_path), cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 12, 16)).astype(np.float32)
    context = rng.standard_normal((1, 7, 4096)).astype(np.float32)
    pooled = rng.standard_normal((1, 768)).astype(np.float32)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 6, "cpu", torch.float32)
    with torch.no_grad():
        out = ref(FluxPipeline._pack_latents(torch.from_numpy(x).permute(0, 3, 1, 2), 1, 16, 16, 12),
                  torch.from_numpy(context), torch.from_numpy(pooled), torch.tensor([0.5]), img_ids,
                  torch.zeros(7, 3), torch.tensor([3.5])).sample
    want = FluxPipeline._unpack_latents(out, 128, 96, 8).permute(0, 2, 3, 1).numpy()
    graphdef, state = nnx.split(ours)    # the weights as an argument, not as constants of the compiled program
    run = jax.jit(lambda st, a, c, p: nnx.merge(graphdef, st)(a, 500.0, (c, p))[0])
    close(run(state, jnp.asarray(x), jnp.asarray(context), jnp.asarray(pooled)), want, "full-width FLUX output")
