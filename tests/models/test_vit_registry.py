"""Registry: names, errors, and every preset's parameter shapes against the `transformers` reference built with the
published checkpoints' hyper-parameters (one block deep, to stay fast)."""

import dataclasses

import numpy as np
import pytest

from spectral_jax.errors import InputError
from spectral_jax.models import get_spec, load_backbone
from spectral_jax.models.vit import MODELS, PRESETS, config_from_hf
from spectral_jax.models.vit.params import convert

# The hub checkpoints' config.json values that fix the architecture.
_S, _B = dict(hidden_size=384, num_attention_heads=6), dict(hidden_size=768, num_attention_heads=12)
_L, _G = dict(hidden_size=1024, num_attention_heads=16), dict(hidden_size=1536, num_attention_heads=24)
_VIT = lambda w, p: ("ViTModel", "ViTConfig", dict(w, intermediate_size=4 * w["hidden_size"], patch_size=p,
                                                  image_size=224, layer_norm_eps=1e-12))
_DV2 = lambda w, **k: ("Dinov2Model", "Dinov2Config", dict(w, patch_size=14, image_size=518, **k))
_REG = lambda w, **k: ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                       dict(w, patch_size=14, image_size=518, num_register_tokens=4, **k))
_MAE = lambda w: ("ViTMAEModel", "ViTMAEConfig", dict(w, intermediate_size=4 * w["hidden_size"], patch_size=16,
                                                      image_size=224, layer_norm_eps=1e-12))
_CLIP = lambda w, p: ("CLIPVisionModel", "CLIPVisionConfig", dict(w, intermediate_size=4 * w["hidden_size"],
                                                                  patch_size=p, image_size=224))
HUB = {
    "dino_vits16": _VIT(_S, 16), "dino_vits8": _VIT(_S, 8), "dino_vitb16": _VIT(_B, 16), "dino_vitb8": _VIT(_B, 8),
    "dinov2_vits14": _DV2(_S), "dinov2_vitb14": _DV2(_B), "dinov2_vitl14": _DV2(_L),
    "dinov2_vitg14": _DV2(_G, use_swiglu_ffn=True),
    "dinov2_vits14_reg": _REG(_S), "dinov2_vitb14_reg": _REG(_B), "dinov2_vitl14_reg": _REG(_L),
    "dinov2_vitg14_reg": _REG(_G, use_swiglu_ffn=True),
    "mae_vitb16": _MAE(_B), "mae_vitl16": _MAE(_L),
    "clip_vitb16": _CLIP(_B, 16), "clip_vitb32": _CLIP(_B, 32), "clip_vitl14": _CLIP(_L, 14),
}


def test_every_registry_name_has_a_hub_architecture():
    assert set(HUB) == set(MODELS)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown model — choose one of: dino_vits16, .*clip_vitl14"):
        get_spec("dinov9_vits16")
    with pytest.raises(InputError, match="unknown model"):
        load_backbone("vit_huge")


@pytest.mark.parametrize("name", list(HUB))
def test_preset_matches_reference_architecture(name):
    transformers = pytest.importorskip("transformers")
    cls_name, cfg_name, kwargs = HUB[name]
    depth = {384: 12, 768: 12, 1024: 24, 1536: 40}[kwargs["hidden_size"]]
    hf_cfg = getattr(transformers, cfg_name)(num_hidden_layers=depth, **kwargs)
    assert config_from_hf(hf_cfg.to_dict()) == PRESETS[name]
    # every tensor of a one-block reference converts onto the one-block preset, shapes checked both ways
    one = getattr(transformers, cfg_name)(num_hidden_layers=1, **kwargs)
    with _no_init():
        ref = getattr(transformers, cls_name)(one)
    shapes_only = {k: np.zeros(v.shape, np.float32) for k, v in ref.state_dict().items()}
    params = convert(dataclasses.replace(PRESETS[name], num_layers=1), shapes_only, name)
    assert params["embeddings.position_embeddings"].shape[1] == 1 + PRESETS[name].pos_grid ** 2


class _no_init:
    """Build references on torch's meta device: shapes without memory or (slow) initialisation."""

    def __enter__(self):
        import torch

        self._ctx = torch.device("meta")
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_config_from_full_clip_and_sparse_config_json():
    transformers = pytest.importorskip("transformers")
    full = transformers.CLIPConfig(vision_config=dict(patch_size=16)).to_dict()  # CLIPModel: text + vision
    assert config_from_hf(full) == PRESETS["clip_vitb16"]
    # config.json files may omit fields left at their defaults (transformers' ViTConfig defaults = ViT-B/16)
    assert config_from_hf({"model_type": "vit", "layer_norm_eps": 1e-12}) == PRESETS["dino_vitb16"]
    with pytest.raises(InputError, match="not a supported ViT family"):
        config_from_hf({"model_type": "swin"})
