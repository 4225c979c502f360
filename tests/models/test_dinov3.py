"""Our Flax DINOv3 ViT vs `transformers` `DINOv3ViTModel`, stage by stage, through our own weight converter; the
key table both ways, config.json, sharded and bf16 checkpoints, the registry presets and the backbone contract.

References are random-init models whose every parameter is perturbed (so biases, norms and layer scales are off
their 0/1 init and a swapped or missing tensor shows), saved with `save_pretrained`, loaded with `load_weights`.
Compared: the embeddings (CLS + registers + patches), the RoPE tables, every layer's q and k *after* RoPE (captured
from the reference's `apply_rotary_pos_emb`) and v, the residual stream after every block, and `last_hidden_state`,
at a square and a non-square size.

Tolerance: |ours − ref| ≤ 1e-5 · max(1, max|ref|) per stage. Both sides compute in float32 (matmul precision
pinned to float32 by tests/conftest.py); float32 rounding over these few layers measures ≤ 1e-6 relative, and the
RoPE angles reach 2π·|coord|·f ≤ 2π, where float32 cos/sin of two libraries differ by a few ulps (≤ 1e-6).
A mapping mistake (a wrong transpose, q/k swapped, RoPE on the prefix tokens or on the wrong half, a missing bias)
moves these stages by 1e-3 to 1 relative.
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
from spectral_jax.models.dinov3 import MODELS, PRESETS, config_from_hf, load_weights  # noqa: E402
from spectral_jax.models.dinov3.modeling import apply_rope, rope_tables  # noqa: E402
from spectral_jax.models.dinov3.params import convert  # noqa: E402


HF = transformers.models.dinov3_vit.modeling_dinov3_vit
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, patch_size=8,
             image_size=32, num_register_tokens=2)
CASES = {"mlp": SMALL, "gated": dict(SMALL, use_gated_mlp=True, hidden_act="silu")}
SIZES = [(32, 32), (24, 40)]


def make_reference(kwargs, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    ref = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**kwargs)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.to(dtype)


def run_reference(ref, x_nhwc, monkeypatch):
    """{"emb", "rope", ("q"|"k"|"v", i): [B, H, T, D], ("h", i): [B, T, C], "out"} from hooks, and q/k after RoPE
    from a wrapper of the reference's `apply_rotary_pos_emb` (called once per layer, in order)."""
    caps, hooks, rotated = {}, [], []
    heads = ref.config.num_attention_heads

    def keep(key, split=False):
        def hook(mod, args, out):
            out = (out[0] if isinstance(out, tuple) and key != "rope" else out)
            if split:
                b, t, c = out.shape
                out = out.reshape(b, t, heads, c // heads).transpose(1, 2)
            caps[key] = out
        return hook

    def wrapped(q, k, cos, sin, **kw):
        q, k = real(q, k, cos, sin, **kw)
        rotated.append((q, k))
        return q, k

    real = HF.apply_rotary_pos_emb
    monkeypatch.setattr(HF, "apply_rotary_pos_emb", wrapped)
    for name, mod in ref.named_modules():
        if m := re.fullmatch(r"model\.layer\.(\d+)\.attention\.v_proj", name):
            hooks.append(mod.register_forward_hook(keep(("v", int(m[1])), split=True)))
        elif m := re.fullmatch(r"model\.layer\.(\d+)", name):
            hooks.append(mod.register_forward_hook(keep(("h", int(m[1])))))
        elif name in ("embeddings", "rope_embeddings"):
            hooks.append(mod.register_forward_hook(keep("emb" if name == "embeddings" else "rope")))
    with torch.no_grad():
        caps["out"] = ref(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).last_hidden_state
    for hk in hooks:
        hk.remove()
    monkeypatch.setattr(HF, "apply_rotary_pos_emb", real)
    for i, (q, k) in enumerate(rotated):
        caps[("q", i)], caps[("k", i)] = q, k
    caps["rope"] = tuple(t.numpy() for t in caps["rope"])
    return {k: v if k == "rope" else v.float().numpy() for k, v in caps.items()}


def assert_close(ours, ref, stage, rel=1e-5):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{stage}: shape {ours.shape} vs reference {ref.shape}"
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * max(1.0, float(np.abs(ref).max())), err_msg=stage)


def compare(model, ref, sizes, monkeypatch, seed=0):
    cfg = model.cfg
    for hw in sizes:
        x = np.random.default_rng(seed).standard_normal((2, *hw, 3)).astype(np.float32)
        want = run_reference(ref, x, monkeypatch)
        out, taps = model(jnp.asarray(x), hidden=True)
        emb, grid = model.embeddings(jnp.asarray(x))
        assert grid == (hw[0] // cfg.patch_size, hw[1] // cfg.patch_size)
        assert_close(emb, want["emb"], f"embeddings at {hw}")
        for ours, theirs, n in zip(rope_tables(grid, cfg.head_dim, cfg.rope_theta), want["rope"], ("cos", "sin")):
            assert_close(ours, theirs, f"RoPE {n} at {hw}")
        for i in range(cfg.num_layers):
            tap = taps.layers[i]
            assert (tap.grid, tap.num_prefix) == (grid, cfg.num_prefix)
            for n in "qkv":
                assert_close(getattr(tap, n), want[(n, i)], f"layer {i} {n} at {hw}")
            assert_close(taps.hidden[i], want[("h", i)], f"layer {i} output at {hw}")
        assert_close(out, want["out"], f"last_hidden_state at {hw}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, tmp_path, monkeypatch):
    ref = make_reference(CASES[case])
    ref.save_pretrained(tmp_path)
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.gated_mlp, cfg.act, cfg.num_prefix, cfg.key_bias) == (case == "gated", ref.config.hidden_act, 3, False)
    compare(load_weights(cfg, str(tmp_path)), ref, SIZES, monkeypatch)


def test_prefix_tokens_are_not_rotated():
    """RoPE rotates the patch tokens only: CLS and register rows come out as they went in."""
    u = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3 + 12, 4, 16)), jnp.float32)  # [B, T, H, D]
    cos, sin = rope_tables((3, 4), 16, 100.0)
    out = np.asarray(apply_rope(u, cos, sin, 3))
    np.testing.assert_array_equal(out[:, :3], np.asarray(u[:, :3]))
    assert np.abs(out[:, 3:] - np.asarray(u[:, 3:])).max() > 0.1
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(np.asarray(u), axis=-1), rtol=1e-5)


def test_old_and_new_key_names_load_the_same(tmp_path):
    """`save_pretrained` and the released checkpoints say `layer.i.*`; transformers 5's module tree `model.layer.i.*`."""
    from safetensors.numpy import load_file

    ref = make_reference(SMALL)
    ref.save_pretrained(tmp_path)
    old = load_file(str(tmp_path / "model.safetensors"))
    new = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert any(k.startswith("layer.") for k in old) and any(k.startswith("model.layer.") for k in new)
    cfg = config_from_hf(ref.config.to_dict())
    a, b = convert(cfg, old, "old"), convert(cfg, new, "new")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_key_table_is_checked_both_ways():
    ref = make_reference(SMALL)
    cfg = config_from_hf(ref.config.to_dict())
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    with pytest.raises(InputError, match=r"no tensor for 1 parameter\(s\): layer\.1\.attention\.q_proj\.bias"):
        convert(cfg, {k: v for k, v in sd.items() if k != "model.layer.1.attention.q_proj.bias"}, "ckpt")
    with pytest.raises(InputError, match=r"k_proj\.bias maps to layer\.0\.attention\.k_proj\.bias, which this model"):
        convert(cfg, {**sd, "model.layer.0.attention.k_proj.bias": np.zeros(64, np.float32)}, "ckpt")
    with pytest.raises(InputError, match=r"1 tensor\(s\) not in the DINOv3 key table: rope_embeddings\.inv_freq"):
        convert(cfg, {**sd, "rope_embeddings.inv_freq": np.zeros(4, np.float32)}, "ckpt")
    with pytest.raises(InputError, match=r"embeddings\.register_tokens has shape \(1, 3, 64\)"):
        convert(cfg, {**sd, "embeddings.register_tokens": np.zeros((1, 3, 64), np.float32)}, "ckpt")


def test_config_json_of_another_architecture_is_refused(tmp_path):
    ref = make_reference(SMALL)
    ref.save_pretrained(tmp_path)
    other = dataclasses.replace(config_from_hf(ref.config.to_dict()), num_registers=4)
    with pytest.raises(InputError, match=r"config.json describes a different model: num_registers=2 \(expected 4\)"):
        load_weights(other, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(InputError, match="model_type 'dinov2' is not a DINOv3 ViT"):
        load_weights(other, str(tmp_path))


def test_sharded_bf16_checkpoint_is_read_without_a_silent_cast(tmp_path):
    """A bf16 checkpoint in shards with its index: every parameter arrives as the stored bf16 value widened exactly
    to float32, or kept bf16 when asked for bfloat16 — nothing rounded on the way."""
    ref = make_reference(SMALL, dtype=torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = config_from_hf(ref.config.to_dict())
    want = convert(cfg, {k: v.float().numpy() for k, v in ref.state_dict().items()}, "ref")
    for dtype in (jnp.float32, jnp.bfloat16):
        model = load_weights(cfg, str(tmp_path), dtype=dtype)
        kernel = model.layer[1].attention.q_proj.kernel[...]
        assert kernel.dtype == dtype
        np.testing.assert_array_equal(np.asarray(kernel, np.float32), want["layer.1.attention.q_proj.kernel"])


def test_missing_weights_offline_say_how_to_get_them():
    with pytest.raises(InputError, match=r"HF_HUB_OFFLINE is set — fetch it once while online: `hf download "
                                         r"facebook/dinov3-vitb16-pretrain-lvd1689m`"):
        load_backbone("dinov3_vitb16")


# The published checkpoints' config.json values that fix the architecture.
HUB = {
    "dinov3_vits16": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=12),
    "dinov3_vits16plus": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_hidden_layers=12,
                              use_gated_mlp=True, hidden_act="silu"),
    "dinov3_vitb16": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=12),
    "dinov3_vitl16": dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=24),
    "dinov3_vith16plus": dict(hidden_size=1280, num_attention_heads=20, intermediate_size=5120, num_hidden_layers=32,
                              use_gated_mlp=True, hidden_act="silu"),
    "dinov3_vit7b16": dict(hidden_size=4096, num_attention_heads=32, intermediate_size=8192, num_hidden_layers=40,
                           use_gated_mlp=True, hidden_act="silu"),
}


@pytest.mark.parametrize("name", list(HUB))
def test_preset_matches_reference_architecture(name):
    kwargs = dict(HUB[name], num_register_tokens=4, patch_size=16)
    assert config_from_hf(transformers.DINOv3ViTConfig(**kwargs).to_dict()) == PRESETS[name]
    with torch.device("meta"):  # one block deep, shapes only: every tensor converts, shapes checked both ways
        ref = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**dict(kwargs, num_hidden_layers=1)))
    shapes_only = {k: np.zeros(v.shape, np.float32) for k, v in ref.state_dict().items()}
    convert(dataclasses.replace(PRESETS[name], num_layers=1), shapes_only, name)
    spec = get_spec(name)
    assert (spec.family, spec.repo_id) == ("dinov3", f"facebook/{name.replace('_', '-')}-pretrain-lvd1689m")
    assert (spec.preprocess.size, spec.preprocess.patch_size) == (512, 16)
    assert set(MODELS) == set(HUB)


def test_random_backbone_is_seeded_and_taps_every_layer():
    bb = load_backbone("dinov3_vits16", "random", seed=3)
    x = np.random.default_rng(0).standard_normal((1, 48, 64, 3)).astype(np.float32)
    taps = bb.taps(x, layers=[0, -1], hidden=True)
    assert sorted(taps.layers) == [0, 11] and sorted(taps.hidden) == [0, 11]
    tap = taps.layers[11]
    assert (tap.grid, tap.num_prefix, tap.q.shape, bb.num_layers) == ((3, 4), 5, (1, 6, 17, 64), 12)
    kernel = lambda b: np.asarray(b.params["layer"][7]["attention"]["k_proj"]["kernel"][...])
    np.testing.assert_array_equal(kernel(load_backbone("dinov3_vits16", "random", seed=3)), kernel(bb))
    assert not np.array_equal(kernel(load_backbone("dinov3_vits16", "random", seed=4)), kernel(bb))


@pytest.mark.slow
def test_full_size_preset_matches_reference(tmp_path, monkeypatch):
    """ViT-B/16 at full size: the preset itself against a reference with the published hyper-parameters."""
    ref = make_reference(dict(HUB["dinov3_vitb16"], num_register_tokens=4, patch_size=16))
    ref.save_pretrained(tmp_path)
    compare(load_weights(PRESETS["dinov3_vitb16"], str(tmp_path)), ref, [(256, 256), (224, 320)], monkeypatch)
