"""Our Flax `UNet2DConditionModel` vs diffusers (PyTorch), through our own weight converter.

References: random-init diffusers UNets whose every parameter is perturbed (so biases and norms are not at their
0/1 init and a swapped or missing tensor shows), saved with `save_pretrained` and loaded with `load_unet`.
Two layouts: SD 1.x-style (1×1-conv proj_in/out, one head count) and SD 2.x-style (`use_linear_projection`,
per-level head counts). Compared: every self-attention layer's q/k/v (torch forward hooks on `attn1.to_q/to_k/
to_v`, in execution order) and the noise prediction, at t = 0 and t = 999 (the time embedding's sin/cos of large
arguments), on a square latent and on one whose width is not a multiple of the up-path factor (diffusers then
upsamples to the skip connection's size).
Plus one full-size SD 1.x level (CrossAttnDownBlock2D, 320 channels, 8 heads of 40, text 768) through the
same key table.

Tolerance: max |ours − ref| ≤ 2e-5 · max |ref| per stage. Both sides compute in float32 (matmul precision pinned
to float32). Measured: ≤ 3e-6 for q/k/v and output (summation order differs between XLA and torch kernels; the
error grows slowly with depth). A mapping mistake (a transposed kernel, q/k swapped, a missing bias or norm
parameter, wrong head split, cos/sin order of the time embedding) moves these stages by 1e-3 to 1 relative.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sjtest import close_to_ref, perturb  # noqa: E402
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models.convert import apply_table, flatten  # noqa: E402
from spectral_jax.models.sd.unet import DownBlock2D, UNetConfig, jit_forward  # noqa: E402
from spectral_jax.models.sd.params import ( load_unet, unet_config_from_diffusers,  # noqa: E402
                                            unet_table)

TOL = 2e-5
SMALL = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 48, 64),
             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
             cross_attention_dim=24, norm_num_groups=8)
LAYOUTS = {"sd1": dict(SMALL, attention_head_dim=2),
           "sd2": dict(SMALL, attention_head_dim=(2, 4, 4), use_linear_projection=True, cross_attention_dim=40)}


def close(ours, ref, what):
    close_to_ref(ours, ref, TOL, what)


def hook_attn1(model):
    """Forward hooks capturing attn1 to_q/to_k/to_v outputs `[B, N, H·D]`, in execution order."""
    caps, order = {}, []

    def make(layer, proj):
        def hook(mod, args, out):
            caps[(layer, proj)] = out.detach().numpy()
            if layer not in order:
                order.append(layer)
        return hook

    for name, mod in model.named_modules():
        if m := re.fullmatch(r"(.*\.attn1)\.(to_[qkv])", name):
            mod.register_forward_hook(make(m[1], m[2]))
    return caps, order


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def pair(request, tmp_path_factory):
    ref = perturb(diffusers.UNet2DConditionModel(**LAYOUTS[request.param]), 0)
    path = tmp_path_factory.mktemp(f"unet-{request.param}")
    ref.save_pretrained(path)
    return request.param, ref, load_unet(str(path))


def test_config_read_from_checkpoint(pair):
    name, ref, ours = pair
    cfg = ours.cfg
    assert cfg.use_linear_projection == (name == "sd2")
    assert cfg.num_attention_heads == ((2, 4, 4) if name == "sd2" else (2, 2, 2))
    assert cfg.num_layers == 2 * 2 + 1 + 3 * 2  # down 2 levels × 2, mid 1, up 2 levels × 3
    heads = (2, 4, 4) if name == "sd2" else (2, 2, 2)
    want = [("down_blocks.0", heads[0])] * 2 + [("down_blocks.1", heads[1])] * 2 + [("mid_block", heads[2])] + \
        [("up_blocks.1", heads[1])] * 3 + [("up_blocks.2", heads[0])] * 3
    assert [(w, h) for w, h, _ in cfg.attn_layers()] == want


def test_attn1_qkv_and_output_match_diffusers(pair):
    name, ref, ours = pair
    hw = (12, 10) if name == "sd1" else (16, 16)  # 10 is not a multiple of the up-path factor 4: sized upsampling
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, ref.config.cross_attention_dim)).astype(np.float32)
    fwd = jit_forward(ours)
    caps, order = hook_attn1(ref)
    for t in (0, 999):
        caps.clear(), order.clear()
        with torch.no_grad():
            out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), t, torch.from_numpy(ctx)).sample
        eps, taps = fwd(jnp.asarray(x), t, jnp.asarray(ctx))
        close(eps, out.permute(0, 2, 3, 1).numpy(), f"{name} {hw} t={t} noise prediction")
        assert len(order) == len(taps.layers) == ours.cfg.num_layers
        for i, layer in enumerate(order):
            tap = taps.layers[i]
            b, h, n, d = tap.q.shape
            assert tap.grid[0] * tap.grid[1] == n
            for proj, arr in (("to_q", tap.q), ("to_k", tap.k), ("to_v", tap.v)):
                mine = np.asarray(arr).transpose(0, 2, 1, 3).reshape(b, n, h * d)
                close(mine, caps[(layer, proj)], f"{name} {hw} t={t} layer {i} ({layer}) {proj}")


def test_full_size_sd1_down_block(tmp_path):
    """One SD 1.x level at full width: CrossAttnDownBlock2D(320 → 320, 8 heads × 40, text 768, temb 1280)."""
    torch.manual_seed(0)
    ref = perturb(diffusers.models.unets.unet_2d_blocks.CrossAttnDownBlock2D(
        in_channels=320, out_channels=320, temb_channels=1280, num_layers=2, resnet_eps=1e-5, resnet_act_fn="silu",
        resnet_groups=32, num_attention_heads=8, cross_attention_dim=768, downsample_padding=1,
        add_downsample=True), 3)
    cfg = UNetConfig()  # SD 1.x
    tensors = {f"down_blocks.0.{k}": v.detach().numpy() for k, v in ref.state_dict().items()}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DownBlock2D(320, 320, 8, True, True, cfg,
                                                                   dtype=jnp.float32, rngs=nnx.Rngs(0))))
    pure = nnx.to_pure_dict(state)
    flat = flatten(pure)
    targets = {f"down_blocks.0.{p}": leaf for p, (_, leaf) in flat.items()}
    params = apply_table(unet_table(cfg), targets, tensors, "CrossAttnDownBlock2D", "fix")
    for p, (keys, _) in flat.items():
        node = pure
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = jnp.asarray(params[f"down_blocks.0.{p}"])
    nnx.replace_by_pure_dict(state, pure)
    block = nnx.merge(graphdef, state)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 32, 320)).astype(np.float32)
    temb = rng.standard_normal((1, 1280)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 768)).astype(np.float32)
    caps, order = hook_attn1(ref)
    with torch.no_grad():
        out, skips = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(temb),
                         encoder_hidden_states=torch.from_numpy(ctx))
    sink = []
    ours, our_skips = block(jnp.asarray(x), jnp.asarray(temb), jnp.asarray(ctx), sink)  # eager
    close(ours, out.permute(0, 2, 3, 1).numpy(), "block output (downsampled)")
    for i, (a, r) in enumerate(zip(our_skips, skips, strict=True)):
        close(a, r.permute(0, 2, 3, 1).numpy(), f"skip state {i}")
    assert len(sink) == len(order) == 2
    for i, layer in enumerate(order):
        for j, proj in enumerate(("to_q", "to_k", "to_v")):
            a = np.asarray(sink[i][j])
            assert a.shape == (1, 8, 1024, 40)
            close(a.transpose(0, 2, 1, 3).reshape(1, 1024, 320), caps[(layer, proj)], f"layer {i} {proj}")


def test_chunked_attention_is_the_same_attention():
    """`attn_chunk` (query blocks, for 64² latents) changes memory, not results."""
    from spectral_jax.models.sd.layers import attend

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 4, 8)), jnp.float32) for _ in range(3))
    full = np.asarray(attend(q, k, v))
    s = np.einsum("bnhd,bmhd->bhnm", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhnm,bmhd->bnhd", p / p.sum(-1, keepdims=True), np.asarray(v, np.float64))
    np.testing.assert_allclose(full, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(attend(q, k, v, chunk=16)), full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(attend(q, k[:, :10], v[:, :10], chunk=16)),
                               np.asarray(attend(q, k[:, :10], v[:, :10])), rtol=0, atol=1e-6)  # cross-attention


# ---------------------------------------------------------------------------------------------------------------
# Converter refusals and config checks
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sd1(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet-small")
    ref = perturb(diffusers.UNet2DConditionModel(**LAYOUTS["sd1"]), 0)
    ref.save_pretrained(path)
    from safetensors.numpy import load_file

    return path, load_file(str(path / "diffusion_pytorch_model.safetensors"))


def _write(tmp_path, src, tensors):
    import shutil

    from safetensors.numpy import save_file

    shutil.copy(src / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return str(tmp_path)


def test_converter_refuses_an_extra_tensor(small_sd1, tmp_path):
    src, tensors = small_sd1
    bad = dict(tensors, **{"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias": np.zeros(32, np.float32)})
    with pytest.raises(InputError, match=r"1 tensor\(s\) not in the key table: down_blocks\.0\.attentions\.0\."
                                         r"transformer_blocks\.0\.attn1\.to_q\.bias"):
        load_unet(_write(tmp_path, src, bad))  # SD attention projections have no bias
    bad = dict(tensors, **{"down_blocks.0.resnets.2.norm1.weight": np.ones(32, np.float32)})
    with pytest.raises(InputError, match=r"down_blocks\.0\.resnets\.2\.norm1\.weight maps to "
                                         r"down_blocks\.0\.resnets\.2\.norm1\.scale, which this model does not have"):
        load_unet(_write(tmp_path, src, bad))
    bad = dict(tensors, **{"add_embedding.linear_1.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(InputError, match=r"1 tensor\(s\) not in the key table: add_embedding\.linear_1\.weight"):
        load_unet(_write(tmp_path, src, bad))


def test_converter_refuses_a_missing_tensor(small_sd1, tmp_path):
    src, tensors = small_sd1
    bad = {k: v for k, v in tensors.items() if k != "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_k.weight"}
    with pytest.raises(InputError, match=r"no tensor for 1 parameter\(s\): up_blocks\.1\.attentions\.2\."
                                         r"transformer_blocks\.0\.attn1\.to_k\.kernel"):
        load_unet(_write(tmp_path, src, bad))


def test_converter_refuses_a_wrong_shape(small_sd1, tmp_path):
    src, tensors = small_sd1
    bad = dict(tensors)
    bad["mid_block.resnets.0.conv1.weight"] = bad["mid_block.resnets.0.conv1.weight"][:, :, :1, :1]
    with pytest.raises(InputError, match=r"mid_block\.resnets\.0\.conv1\.weight has shape \(64, 64, 1, 1\)"):
        load_unet(_write(tmp_path, src, bad))


def test_config_mismatch_and_unsupported_options(small_sd1, tmp_path):
    src, _ = small_sd1
    with pytest.raises(InputError, match=r"describes a different model: .*block_out_channels=\(32, 48, 64\) "
                                         r"\(expected \(320, 640, 1280, 1280\)\)"):
        load_unet(str(src), UNetConfig())
    with pytest.raises(InputError, match=r"options this port does not implement: addition_embed_type='text_time'"):
        unet_config_from_diffusers({"addition_embed_type": "text_time"})
    with pytest.raises(InputError, match="per-block transformer_layers_per_block"):
        unet_config_from_diffusers({"transformer_layers_per_block": [1, 2, 10]})


def test_sd_presets_match_diffusers_configs():
    """Our SD 1.x / 2.x presets are what the published unet/config.json files describe (values as published)."""
    from spectral_jax.models.sd import SD_MODELS

    sd1 = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
               center_input_sample=False, cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
               mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    sd21 = dict(sd1, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
                num_class_embeds=None, only_cross_attention=False, resnet_time_scale_shift="default",
                upcast_attention=False, use_linear_projection=True)
    assert unet_config_from_diffusers(sd1) == SD_MODELS["sd15"].config.unet == SD_MODELS["sd14"].config.unet
    assert unet_config_from_diffusers(sd21) == SD_MODELS["sd21_base"].config.unet
    layers = SD_MODELS["sd15"].config.unet.attn_layers()
    assert len(layers) == 16
    assert [w for w, _, _ in layers] == (["down_blocks.0"] * 2 + ["down_blocks.1"] * 2 + ["down_blocks.2"] * 2 +
                                         ["mid_block"] + ["up_blocks.1"] * 3 + ["up_blocks.2"] * 3 +
                                         ["up_blocks.3"] * 3)
    assert [d for _, _, d in layers] == [40, 40, 80, 80, 160, 160, 160, 160, 160, 160, 80, 80, 80, 40, 40, 40]
    assert {h for _, h, _ in layers} == {8}
    assert [d for _, _, d in SD_MODELS["sd21_base"].config.unet.attn_layers()] == [64] * 16


# ---------------------------------------------------------------------------------------------------------------
# Full size (slow): the key table covers every tensor of a real-size SD UNet, and the forward matches
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21_base"])
def test_full_size_unet_matches_diffusers(name):
    """SD 1.x / 2.x-base UNet at full size (≈860M parameters, random init), latent 32² (a 256² image)."""
    from spectral_jax.models.sd import SD_MODELS
    from spectral_jax.models.sd.unet import UNet2DConditionModel
    from spectral_jax.models.sd.params import abstract_model, assemble

    cfg = SD_MODELS[name].config.unet
    kw = dict(attention_head_dim=list(cfg.num_attention_heads), cross_attention_dim=cfg.cross_attention_dim,
              use_linear_projection=cfg.use_linear_projection)
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**kw).eval()
    tensors = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = apply_table(unet_table(cfg), abstract_model(UNet2DConditionModel, cfg)[2], tensors, name, "fix")
    ours = assemble(UNet2DConditionModel, cfg, params)
    del tensors, params
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
    caps, order = hook_attn1(ref)
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), 321, torch.from_numpy(ctx)).sample
    eps, taps = jit_forward(ours)(jnp.asarray(x), 321, jnp.asarray(ctx))
    close(eps, out.permute(0, 2, 3, 1).numpy(), f"{name} noise prediction")
    assert [t.grid for t in taps.layers.values()] == [(32, 32)] * 2 + [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] + \
        [(8, 8)] * 3 + [(16, 16)] * 3 + [(32, 32)] * 3
    for i, layer in enumerate(order):
        tap = taps.layers[i]
        b, h, n, d = tap.q.shape
        for proj, arr in (("to_q", tap.q), ("to_k", tap.k), ("to_v", tap.v)):
            close(np.asarray(arr).transpose(0, 2, 1, 3).reshape(b, n, h * d), caps[(layer, proj)],
                  f"{name} layer {i} {proj}")
