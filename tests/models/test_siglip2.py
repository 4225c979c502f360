"""Our Flax SigLIP 2 vision tower vs `transformers` — FixRes against `SiglipVisionModel` (as the fixed-resolution
SigLIP 2 checkpoints are published), NaFlex against `Siglip2VisionModel` — stage by stage, through our own weight
converter; full-model checkpoints, variant mix-ups, config.json, the registry presets and the backbone contract.

References are random-init models whose every parameter is perturbed (so biases and norms are off their 0/1 init
and a swapped or missing tensor shows), saved with `save_pretrained`, loaded with `load_weights`. Compared: the
embeddings (patches + resampled position table), every layer's q/k/v (hooks on q_proj/k_proj/v_proj), the residual
stream after every block and `last_hidden_state`, at the table's own grid and at a non-square grid (FixRes:
`interpolate_pos_encoding=True`, torch's bicubic; NaFlex: its antialiased bilinear resize). NaFlex is also run as
the reference runs it: a padded batch of two different grids with its attention mask.

Tolerance: |ours − ref| ≤ 1e-5 · max(1, max|ref|) per stage. Both sides compute in float32 (matmul precision
pinned to float32 by tests/conftest.py); rounding over these few layers measures ≤ 1e-6 relative, torch's float32
bicubic differs from the exact resize by up to ~4e-6 relative. A mapping mistake (the conv kernel flattened in
(channel, row, column) order, a transposed Linear, plain instead of antialiased bilinear, a mask on queries instead
of keys) moves these stages by 1e-3 to 1 relative.
"""

import dataclasses
import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.models import get_spec, load_backbone  # noqa: E402
from spectral_jax.models.siglip2 import MODELS, PRESETS, config_from_hf, load_weights, patchify  # noqa: E402
from spectral_jax.models.siglip2.params import convert  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, patch_size=8)
# variant → (reference class, config class, config kwargs, [(H, W), ...]); first size = the table's own grid.
CASES = {
    "fixed": ("SiglipVisionModel", "SiglipVisionConfig", dict(SMALL, image_size=32), [(32, 32), (24, 40)]),
    "naflex": ("Siglip2VisionModel", "Siglip2VisionConfig", dict(SMALL, num_patches=16), [(32, 32), (40, 24)]),
}


def make_reference(cls_name, cfg_name, kwargs, seed=0):
    torch.manual_seed(seed)
    ref = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kwargs)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def run_reference(ref, **inputs):
    """Reference forward with hooks: {"emb", ("q"|"k"|"v", i): [B, H, T, D], ("h", i): [B, T, C], "out"}."""
    caps, hooks = {}, []
    heads = ref.config.num_attention_heads

    def keep(key):
        def hook(mod, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if key[0] in "qkv":
                b, t, c = out.shape
                out = out.reshape(b, t, heads, c // heads).transpose(1, 2)
            caps[key] = out.detach().numpy()
        return hook

    for name, mod in ref.named_modules():
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj", name):
            hooks.append(mod.register_forward_hook(keep((m[2], int(m[1])))))
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)", name):
            hooks.append(mod.register_forward_hook(keep(("h", int(m[1])))))
        elif name == "embeddings":
            hooks.append(mod.register_forward_hook(keep(("emb",))))
    with torch.no_grad():
        caps["out"] = ref(**inputs).last_hidden_state.numpy()
    for hk in hooks:
        hk.remove()
    caps["emb"] = caps.pop(("emb",))
    return caps


def reference_inputs(ref, x_nhwc):
    """The reference's inputs for a batch of one shape: FixRes pixels (interpolating its table), NaFlex patches."""
    if isinstance(ref, transformers.SiglipVisionModel):
        return dict(pixel_values=torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), interpolate_pos_encoding=True)
    patches, (h, w) = patchify(x_nhwc, ref.config.patch_size)
    b = x_nhwc.shape[0]
    return dict(pixel_values=torch.from_numpy(np.asarray(patches)),
                pixel_attention_mask=torch.ones(b, h * w, dtype=torch.int32),
                spatial_shapes=torch.tensor([[h, w]] * b))


def assert_close(ours, ref, stage):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{stage}: shape {ours.shape} vs reference {ref.shape}"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())), err_msg=stage)


def compare_stages(want, emb, qkvs, hidden, out, num_layers, where):
    assert_close(emb, want["emb"], f"embeddings {where}")
    for i in range(num_layers):
        for n, ours in zip("qkv", qkvs[i]):
            assert_close(ours, want[(n, i)], f"layer {i} {n} {where}")
        assert_close(hidden[i], want[("h", i)], f"layer {i} output {where}")
    assert_close(out, want["out"], f"last_hidden_state {where}")


@pytest.mark.parametrize("variant", list(CASES))
def test_matches_reference(variant, tmp_path):
    cls_name, cfg_name, kwargs, sizes = CASES[variant]
    ref = make_reference(cls_name, cfg_name, kwargs)
    ref.save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.variant, cfg.pos_grid) == (variant, 4)
    model = load_weights(cfg, str(tmp_path))
    for hw in sizes:
        x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
        want = run_reference(ref, **reference_inputs(ref, x))
        out, taps = model(jnp.asarray(x), hidden=True)
        grid = (hw[0] // 8, hw[1] // 8)
        assert all((t.grid, t.num_prefix) == (grid, 0) for t in taps.layers.values())
        qkvs = {i: (t.q, t.k, t.v) for i, t in taps.layers.items()}
        compare_stages(want, model.embeddings(jnp.asarray(x))[0], qkvs, taps.hidden, out, cfg.num_layers, f"at {hw}")


def test_naflex_padded_batch_matches_reference(tmp_path):
    """Two images of different grids (3×5 and 4×2 patches) padded to 16 slots, with the attention mask: every
    slot's output, real or padded, as the reference computes it."""
    cls_name, cfg_name, kwargs, _ = CASES["naflex"]
    ref = make_reference(cls_name, cfg_name, kwargs, seed=1)
    ref.save_pretrained(tmp_path)
    model = load_weights(config_from_hf(ref.config.to_dict()), str(tmp_path))
    rng = np.random.default_rng(2)
    shapes, slots = np.array([[3, 5], [4, 2]]), 16
    pixels = np.zeros((2, slots, 8 * 8 * 3), np.float32)
    mask = np.zeros((2, slots), np.int32)
    for b, (h, w) in enumerate(shapes):
        pixels[b, :h * w] = rng.standard_normal((h * w, 8 * 8 * 3))
        mask[b, :h * w] = 1
    want = run_reference(ref, pixel_values=torch.from_numpy(pixels), pixel_attention_mask=torch.from_numpy(mask),
                         spatial_shapes=torch.from_numpy(shapes))
    out, qkvs, hidden = model.naflex(jnp.asarray(pixels), jnp.asarray(mask), jnp.asarray(shapes), hidden=True)
    emb = model.embeddings
    emb_out = emb.patch_embedding(jnp.asarray(pixels)) + emb.naflex_position(jnp.asarray(shapes), slots)
    compare_stages(want, emb_out, qkvs, hidden, out, 2, "padded NaFlex batch")


def test_full_model_checkpoint_loads_the_vision_tower(tmp_path):
    """A full `SiglipModel` checkpoint (as google/siglip2-*-patch16-{224..512} are published): the vision tower
    under `vision_model.`, the text tower, the pooling head and logit scale/bias listed as unused."""
    cfg = transformers.SiglipConfig(
        vision_config=dict(SMALL, image_size=32),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                         vocab_size=50, max_position_embeddings=8))
    torch.manual_seed(0)
    full = transformers.SiglipModel(cfg).eval()
    full.save_pretrained(tmp_path)
    ours = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert ours == config_from_hf(full.config.vision_config.to_dict())
    model = load_weights(ours, str(tmp_path))
    want = full.vision_model.embeddings.patch_embedding.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.embeddings.patch_embedding.kernel[...]),
                                  want.transpose(2, 3, 1, 0).reshape(-1, 64))


def test_variants_are_not_mixed_up(tmp_path):
    """FixRes B/16's conv and NaFlex B/16's Linear can have equal sizes (3·16·16 = 768): refused by kind."""
    for variant, other in (("fixed", "naflex"), ("naflex", "fixed")):
        cls_name, cfg_name, kwargs, _ = CASES[other]
        ref = make_reference(cls_name, cfg_name, kwargs)
        sd = {k: v.numpy() for k, v in ref.state_dict().items()}
        cfg = dataclasses.replace(config_from_hf(ref.config.to_dict()), variant=variant)
        with pytest.raises(InputError, match=f"tensor embeddings.patch_embedding.weight is .*but the model is {variant}"):
            convert(cfg, sd, "ckpt")
        ref.save_pretrained(tmp_path / other)
        with pytest.raises(InputError, match=f"config.json describes a different model: variant={other}"):
            load_weights(cfg, str(tmp_path / other))


def test_key_table_is_checked_both_ways():
    cls_name, cfg_name, kwargs, _ = CASES["fixed"]
    ref = make_reference(cls_name, cfg_name, kwargs)
    cfg = config_from_hf(ref.config.to_dict())
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    with pytest.raises(InputError, match=r"no tensor for 1 parameter\(s\): encoder\.layers\.1\.mlp\.fc2\.bias"):
        convert(cfg, {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}, "ckpt")
    with pytest.raises(InputError, match=r"1 tensor\(s\) not in the SigLIP key table: encoder\.layers\.0\.ls\.w"):
        convert(cfg, {**sd, "encoder.layers.0.ls.w": np.zeros(64, np.float32)}, "ckpt")
    with pytest.raises(InputError, match=r"position_embedding\.weight has shape \(25, 64\)"):
        convert(cfg, {**sd, "embeddings.position_embedding.weight": np.zeros((25, 64), np.float32)}, "ckpt")
    with pytest.raises(InputError, match="num_patches 15 is not a square"):
        config_from_hf({"model_type": "siglip2_vision_model", "num_patches": 15})


# The published checkpoints' vision_config values that fix the architecture.
_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
_SO = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
_G = dict(hidden_size=1536, intermediate_size=6144, num_hidden_layers=40, num_attention_heads=16)
_FIX = lambda w, p, size: ("siglip", dict(w, patch_size=p, image_size=size))
HUB = {
    "siglip2_b16": _FIX(_B, 16, 512), "siglip2_b16_384": _FIX(_B, 16, 384), "siglip2_b16_256": _FIX(_B, 16, 256),
    "siglip2_b16_224": _FIX(_B, 16, 224), "siglip2_b32": _FIX(_B, 32, 256),
    "siglip2_l16": _FIX(_L, 16, 512), "siglip2_l16_384": _FIX(_L, 16, 384), "siglip2_l16_256": _FIX(_L, 16, 256),
    "siglip2_so400m14": _FIX(_SO, 14, 384), "siglip2_so400m14_224": _FIX(_SO, 14, 224),
    "siglip2_so400m16": _FIX(_SO, 16, 512), "siglip2_so400m16_384": _FIX(_SO, 16, 384),
    "siglip2_so400m16_256": _FIX(_SO, 16, 256),
    "siglip2_g16": _FIX(_G, 16, 384), "siglip2_g16_256": _FIX(_G, 16, 256),
    "siglip2_b16_naflex": ("siglip2", dict(_B, patch_size=16, num_patches=256)),
    "siglip2_so400m16_naflex": ("siglip2", dict(_SO, patch_size=16, num_patches=256)),
}


@pytest.mark.parametrize("name", list(HUB))
def test_preset_matches_reference_architecture(name):
    model_type, vision = HUB[name]
    full = {"model_type": model_type, "vision_config": vision}
    assert config_from_hf(full) == PRESETS[name]
    cls_name, cfg_name = ("SiglipVisionModel", "SiglipVisionConfig") if model_type == "siglip" else (
        "Siglip2VisionModel", "Siglip2VisionConfig")
    with torch.device("meta"):  # one block deep, shapes only: every tensor converts, shapes checked both ways
        ref = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**dict(vision, num_hidden_layers=1)))
    shapes_only = {k: np.zeros(v.shape, np.float32) for k, v in ref.state_dict().items()}
    convert(dataclasses.replace(PRESETS[name], num_layers=1), shapes_only, name)
    spec = get_spec(name)
    assert spec.family == "siglip2" and spec.repo_id.startswith("google/siglip2-")
    assert spec.preprocess.mean == spec.preprocess.std == (0.5, 0.5, 0.5)
    assert set(MODELS) == set(HUB)


def test_random_naflex_backbone_is_seeded_and_has_no_prefix():
    bb = load_backbone("siglip2_b16_naflex", "random", seed=3)
    x = np.random.default_rng(0).standard_normal((1, 48, 80, 3)).astype(np.float32)
    taps = bb.taps(x, layers=[-1], hidden=True)
    tap = taps.layers[11]
    assert (tap.grid, tap.num_prefix, tap.q.shape, sorted(taps.hidden)) == ((3, 5), 0, (1, 12, 15, 64), [11])
    kernel = lambda b: np.asarray(b.params["encoder"]["layers"][5]["self_attn"]["k_proj"]["kernel"][...])
    np.testing.assert_array_equal(kernel(load_backbone("siglip2_b16_naflex", "random", seed=3)), kernel(bb))
    assert not np.array_equal(kernel(load_backbone("siglip2_b16_naflex", "random", seed=4)), kernel(bb))


def test_missing_weights_offline_say_how_to_get_them():
    with pytest.raises(InputError, match=r"HF_HUB_OFFLINE is set — fetch it once while online: `hf download "
                                         r"google/siglip2-base-patch16-512`"):
        load_backbone("siglip2_b16")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CASES))
def test_full_size_preset_matches_reference(variant, tmp_path):
    """B/16 at full size (FixRes 256 and NaFlex): the presets against references with the published widths."""
    name = {"fixed": "siglip2_b16_256", "naflex": "siglip2_b16_naflex"}[variant]
    cls_name, cfg_name, _, _ = CASES[variant]
    ref = make_reference(cls_name, cfg_name, HUB[name][1])
    ref.save_pretrained(tmp_path)
    model = load_weights(PRESETS[name], str(tmp_path))
    for hw in [(256, 256), (192, 320)]:
        x = np.random.default_rng(0).standard_normal((1, *hw, 3)).astype(np.float32)
        want = run_reference(ref, **reference_inputs(ref, x))
        out, taps = model(jnp.asarray(x), hidden=True)
        qkvs = {i: (t.q, t.k, t.v) for i, t in taps.layers.items()}
        compare_stages(want, model.embeddings(jnp.asarray(x))[0], qkvs, taps.hidden, out, 12, f"at {hw}")
