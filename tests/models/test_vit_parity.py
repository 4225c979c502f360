"""Our Flax ViT vs the `transformers` PyTorch references, stage by stage, through our own weight converter.

Each reference is a random-init model whose every parameter is perturbed (so biases, norms and layer scales are
not at their 0/1 init and a swapped or missing tensor shows), saved with `save_pretrained` (old key names) and
loaded with `load_weights`. Compared: embeddings, q/k/v of every layer (torch forward hooks on the reference's
q_proj/k_proj/v_proj Linear modules), the residual stream after every block, and `last_hidden_state`, at the
checkpoint's own grid and at a non-square grid of another size (position embeddings resampled).

Tolerance: |ours − ref| ≤ 1e-5 · max(1, max|ref|) at every stage. Both sides compute in float32 (matmul precision
pinned to float32); float32 rounding measured here is ≤ 1e-6 relative, and torch's own bicubic resize in float32
differs from the exact (float64) result by up to ~4e-6 relative. A mapping mistake (wrong transpose, swapped q/k,
a missing bias, plain instead of antialiased bicubic) moves these stages by 1e-3 to 1 relative.
"""

import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from spectral_jax.models.vit import PRESETS, config_from_hf, jit_forward, load_weights  # noqa: E402
from spectral_jax.models.vit.params import convert  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)

# name → (reference class, config class, config kwargs, [(H, W), ...]); first size = the checkpoint's own grid.
CASES = {
    "dino_v1": ("ViTModel", "ViTConfig", dict(SMALL, intermediate_size=96, patch_size=8, image_size=32),
                [(32, 32), (24, 48)]),
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(SMALL, patch_size=14, image_size=56), [(56, 56), (42, 70)]),
    "dinov2_swiglu": ("Dinov2Model", "Dinov2Config", dict(SMALL, patch_size=14, image_size=56, use_swiglu_ffn=True),
                      [(56, 56), (70, 42)]),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                   dict(SMALL, patch_size=14, image_size=56, num_register_tokens=2), [(56, 56), (42, 84)]),
    "mae": ("ViTMAEModel", "ViTMAEConfig", dict(SMALL, intermediate_size=96, patch_size=8, image_size=32,
                                                mask_ratio=0.0), [(32, 32), (40, 24)]),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", dict(SMALL, intermediate_size=96, patch_size=8, image_size=32),
             [(32, 32), (24, 40)]),
}


def make_reference(cls_name, cfg_name, kwargs, seed=0):
    torch.manual_seed(seed)
    ref = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kwargs)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def run_reference(ref, x_nhwc: np.ndarray):
    """Reference forward with hooks: {"emb": ..., ("q"|"k"|"v", i): [B, T, C], ("h", i): [B, T, C], "out": ...}."""
    caps, hooks = {}, []

    def keep(key):
        return lambda mod, args, out: caps.__setitem__(key, (out[0] if isinstance(out, tuple) else out).detach())

    for name, mod in ref.named_modules():
        if m := re.search(r"\.(\d+)\.(?:attention|self_attn)\.([qkv])_proj$", name):
            hooks.append(mod.register_forward_hook(keep((m[2], int(m[1])))))
        elif m := re.fullmatch(r"(?:encoder\.)?layers?\.(\d+)", name):
            hooks.append(mod.register_forward_hook(keep(("h", int(m[1])))))
        elif name == "embeddings":
            hooks.append(mod.register_forward_hook(keep("emb")))
    b, h, w, _ = x_nhwc.shape
    kwargs = {}
    if not isinstance(ref, (transformers.Dinov2Model, transformers.Dinov2WithRegistersModel)):
        kwargs["interpolate_pos_encoding"] = True
    if isinstance(ref, transformers.ViTMAEModel):  # mask_ratio 0 still shuffles by argsort(noise): keep the order
        p = ref.config.patch_size
        kwargs["noise"] = torch.arange((h // p) * (w // p), dtype=torch.float32).expand(b, -1)
    with torch.no_grad():
        caps["out"] = ref(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2), **kwargs).last_hidden_state
    for hk in hooks:
        hk.remove()
    return {k: v.numpy() for k, v in caps.items()}


def assert_close(ours, ref, stage):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{stage}: shape {ours.shape} vs reference {ref.shape}"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())), err_msg=stage)


def compare(model, ref, sizes, seed=0):
    cfg = model.cfg
    forward = jit_forward(model, hidden=True)
    for hw in sizes:
        x = np.random.default_rng(seed).standard_normal((2, *hw, 3)).astype(np.float32)
        want = run_reference(ref, x)
        assert sum(isinstance(k, tuple) and k[0] in "qkv" for k in want) == 3 * cfg.num_layers, "hooks missed"
        out, taps = forward(jnp.asarray(x))
        emb, grid = model.embeddings(jnp.asarray(x))
        assert grid == (hw[0] // cfg.patch_size, hw[1] // cfg.patch_size)
        assert_close(emb, want["emb"], f"embeddings at {hw}")
        b, t, c = want["emb"].shape
        for i in range(cfg.num_layers):
            tap = taps.layers[i]
            assert (tap.grid, tap.num_prefix) == (grid, cfg.num_prefix)
            for n in "qkv":
                ref_heads = want[(n, i)].reshape(b, t, cfg.num_heads, -1).transpose(0, 2, 1, 3)
                assert_close(getattr(tap, n), ref_heads, f"layer {i} {n} at {hw}")
            assert_close(taps.hidden[i], want[("h", i)], f"layer {i} output at {hw}")
        assert_close(out, want["out"], f"last_hidden_state at {hw}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, tmp_path):
    cls_name, cfg_name, kwargs, sizes = CASES[case]
    ref = make_reference(cls_name, cfg_name, kwargs)
    ref.save_pretrained(tmp_path)
    cfg = config_from_hf(ref.config.to_dict())
    model = load_weights(cfg, str(tmp_path))
    compare(model, ref, sizes)


@pytest.mark.parametrize("case", list(CASES))
def test_new_and_old_key_names_load_the_same(case, tmp_path):
    """`save_pretrained` writes the old names (encoder.layer.i.attention.attention.query, weights_in, ...); the live
    module tree of transformers 5 uses the new ones (layers.i.attention.q_proj, gate_proj, ...). CLIP's names did
    not change, so there the variant is the `vision_model.` prefix of full CLIPModel checkpoints."""
    from safetensors.numpy import load_file

    cls_name, cfg_name, kwargs, _ = CASES[case]
    ref = make_reference(cls_name, cfg_name, kwargs)
    ref.save_pretrained(tmp_path)
    old = load_file(str(tmp_path / "model.safetensors"))
    new = {k: v.numpy() for k, v in ref.state_dict().items() if k != "embeddings.position_ids"}
    if case == "clip":
        new = {"vision_model." + k: v for k, v in new.items()}
        new["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 64), np.float32)
        new["logit_scale"] = np.zeros((), np.float32)
    assert set(old) != set(new)
    cfg = config_from_hf(ref.config.to_dict())
    a, b = convert(cfg, old, "old"), convert(cfg, new, "new")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# Full-size architectures: the presets themselves against a reference built from the same hyper-parameters.
FULL = {
    "dinov2_vits14": ("Dinov2Model", "Dinov2Config", dict(hidden_size=384, num_hidden_layers=12,
                                                          num_attention_heads=6, image_size=518, patch_size=14)),
    "dino_vitb16": ("ViTModel", "ViTConfig", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                  intermediate_size=3072, image_size=224, patch_size=16,
                                                  layer_norm_eps=1e-12)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
def test_full_size_preset_matches_reference(name, tmp_path):
    cls_name, cfg_name, kwargs = FULL[name]
    ref = make_reference(cls_name, cfg_name, kwargs)
    ref.save_pretrained(tmp_path)
    model = load_weights(PRESETS[name], str(tmp_path))
    p = PRESETS[name].patch_size
    compare(model, ref, [(16 * p, 16 * p), (14 * p, 20 * p)])
