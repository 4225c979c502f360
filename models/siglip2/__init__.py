"""The SigLIP 2 vision towers: FixRes (`transformers` `SiglipVisionModel`, as the fixed-resolution SigLIP 2
checkpoints are published) and NaFlex (`Siglip2VisionModel`), one Flax NNX `SiglipVision`, and its
`load_backbone(spec, weights)`.

    config.py    SiglipConfig, the named PRESETS and the registry entries (MODELS) — no JAX
    modeling.py  the SiglipVision module (q/k/v taps of any layers; NaFlex patches, mask, per-image resize)
    params.py    key table, config.json → SiglipConfig, load_weights
    backbone.py  load_backbone(spec, weights) -> Backbone

Names are imported on first use (PEP 562), so `spectral_jax.models.siglip2.config` does not import JAX.
"""

from spectral_jax import lazy as _lazy

_EXPORTS = {
    "SiglipVision": ".modeling", "patchify": ".modeling", "naflex_position_weights": ".modeling",
    "SiglipConfig": ".config", "PRESETS": ".config", "MODELS": ".config", "FAMILY": ".config",
    "load_weights": ".params", "config_from_hf": ".params",
    "load_backbone": ".backbone",
    "config": None, "modeling": None, "params": None, "backbone": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
