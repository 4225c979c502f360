"""The diffusion-transformer family behind the backbone contract: `load_backbone(spec, weights) -> Backbone` with
`params` a pytree of arrays — the VAE encoder and transformer states, the caption conditioning, the noise key
(uint32 key data) and the timesteps (int32 `[T]`) — and `apply` pure and jittable (`models.sd.diffusion.
diffusion_taps` with `dit_step`, closing over graph definitions, the schedule and the latent mode only);
`models.registry` dispatches here. `collect_taps`: images → VAE latents → noisy latents at T timesteps → every
block's self-attention q/k/v, folded timestep-major into the heads axis (graph index t·H + head), as for Stable
Diffusion (`models.sd.diffusion`, which also states the noise rule: one ε_i per timestep for the whole batch).

For timestep t_i: x_t = add_noise(z, ε_i, t_i) — PixArt: √ᾱ_t · z + √(1 − ᾱ_t) · ε (DDPM, linear β); SD3:
(1 − σ_t) · z + σ_t · ε (rectified flow, `flow.py`) — with z the VAE latent, ε_i ~ N(0, I) from (seed, i); the
transformer runs on (x_t, its timestep input (t_i, or σ_t·1000 for flow), text conditioning).

Shape legend
    B  images   (H, W) pixels (multiples of 16)   (h, w) = (H, W)/8 latents   T  timesteps   H  heads
    N = (h/p)·(w/p) tokens   D  head dim
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.models.backbone import Backbone
from spectral_jax.models.dit.flow import FlowSchedule
from spectral_jax.models.dit.modeling import DiffusionTransformer, load_dit
from spectral_jax.models.sd import diffusion
from spectral_jax.models.spec import ModelSpec
from spectral_jax.taps import Taps


def dit_step(model, latents, noise, t, context, schedule, layers) -> Taps:
    """The transformer's taps of `layers` on x_t = add_noise(latents, noise, t) (noise `[1, ...]`, broadcast over
    the batch); a flow schedule also maps t to σ_t·N (dynamic shift from the image-token count)."""
    if isinstance(schedule, FlowSchedule):
        p = model.cfg.patch_size
        tokens = (latents.shape[1] // p) * (latents.shape[2] // p)
        return model(schedule.add_noise(latents, noise, t, tokens), schedule.model_timestep(t, tokens), context,
                     layers=layers)[1]
    return model(schedule.add_noise(latents, noise, t), t, context, layers=layers)[1]


def dit_static(model: DiffusionTransformer, latent: str) -> dict:
    """The static keyword arguments of `diffusion.diffusion_taps` for `model` (graph definitions, the schedule, the
    layer count, the latent mode, the VAE shift)."""
    return dict(vae_def=nnx.split(model.vae)[0], denoiser_def=nnx.split(model.transformer)[0], step=dit_step,
                schedule=model.schedule, num_layers=model.cfg.num_layers, sample=latent == "sample",
                shift=float(model.cfg.vae.scaling_factor * model.cfg.vae_shift), title="diffusion-transformer")


def collect_taps(images, model: DiffusionTransformer, timesteps, seed: int = 0, *,
                 layers: Sequence[int] | None = None, latent: str = "mean") -> Taps:
    """Self-attention taps of `model` on `images` `[B, H, W, 3]` (in [−1, 1], sides multiples of 16) at each of
    `timesteps` (ints in [0, 999]): per layer q/k/v `[B, T·H, N, D]`, timestep-major (SD3: the image tokens).

    `diffusion.diffusion_taps` with `dit_step`: the timesteps under one `lax.scan` (the transformer compiled once per
    architecture, layer selection and input shape; only the chosen taps leave it, so XLA drops the blocks after the
    last one needed); latent: the VAE posterior "mean" or a "sample" from `seed`.
    """
    images, ts, chosen = diffusion.check_request(images, model.schedule, timesteps, layers, model.cfg.num_layers)
    if latent not in diffusion.LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(diffusion.LATENTS)}")
    params = diffusion.diffusion_params(model.vae, model.transformer, model.context, seed, ts)
    return diffusion._jit_taps(params, images, chosen, False, **dit_static(model, latent))


def load_backbone(spec: ModelSpec, weights: str | None = None, *, dtype=None, seed: int = 0, timesteps=None,
                  latent: str = "mean", text_embedding: str | None = None) -> Backbone:
    """Diffusion transformer `spec` with its weights, as a `Backbone` whose taps are q/k/v `[B, T·H, N, D]` per
    block.

    weights: as in `load_dit` (None: `spec.repo_id`; "random"; a diffusers-layout directory or repo id).
    timesteps: ints in [0, 999] (None: `DEFAULT_NUM_TIMESTEPS` drawn at random from `seed` over [0, 250], as for
    Stable Diffusion); seed: the noise key (params["noise_key"]), the random schedule and a latent sample; latent:
    "mean" or "sample"; text_embedding: a saved text embedding (`modeling.load_text_embedding`; default: zeros —
    see `config.py`). Timesteps and latent are checked before any weight is read. params["timesteps"] may be
    replaced by other timesteps (data); `Backbone.timesteps` records the ones loaded.
    """
    ts = (diffusion.timestep_schedule("random", diffusion.DEFAULT_NUM_TIMESTEPS, seed) if timesteps is None
          else diffusion.check_timesteps(timesteps, spec.config.schedule.num_train_timesteps))
    if latent not in diffusion.LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(diffusion.LATENTS)}")
    model = load_dit(spec.name, weights, text_embedding=text_embedding,
                     dtype=jnp.float32 if dtype is None else dtype, seed=seed)
    params = diffusion.diffusion_params(model.vae, model.transformer, model.context, seed, ts)
    apply = diffusion.backbone_apply(**dit_static(model, latent))
    heads = {i: int(a[1]) for i, a in enumerate(spec.config.transformer.attn_layers())}
    return Backbone(spec.name, spec.preprocess, spec.config.num_layers, params, apply,
                    str(weights if weights is not None else spec.repo_id), tuple(int(t) for t in ts), heads, model)
