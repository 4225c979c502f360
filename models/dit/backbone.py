"""The diffusion-transformer family behind the backbone contract: `load_backbone(spec, weights) -> Backbone`, with
the VAE, the caption conditioning and the timestep schedule bound at load time (`models.registry` dispatches here),
and `collect_taps`: images → VAE latents → noisy latents at T timesteps → every block's self-attention q/k/v,
folded timestep-major into the heads axis (graph index t·H + head), as for Stable Diffusion (`models.sd.diffusion`).

For timestep t_i: x_t = add_noise(z, ε_i, t_i) — PixArt: √ᾱ_t · z + √(1 − ᾱ_t) · ε (DDPM, linear β); SD3:
(1 − σ_t) · z + σ_t · ε (rectified flow, `flow.py`) — with z the VAE latent, ε_i ~ N(0, I) from (seed, i); the
transformer runs on (x_t, its timestep input (t_i, or σ_t·1000 for flow), text conditioning).

Shape legend
    B  images   (H, W) pixels (multiples of 16)   (h, w) = (H, W)/8 latents   T  timesteps   H  heads
    N = (h/p)·(w/p) tokens   D  head dim
"""

from __future__ import annotations

from typing import Sequence

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.models.backbone import Backbone
from spectral_jax.models.dit.flow import FlowSchedule
from spectral_jax.models.dit.modeling import DiffusionTransformer, load_dit
from spectral_jax.models.sd import diffusion
from spectral_jax.models.spec import ModelSpec
from spectral_jax.taps import Taps


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _step_taps(graphdef, state, latents, t, i, key, context, schedule):
    """Taps of every block on x_t = add_noise(latents, ε_i, t), ε_i ~ N(0, I) from fold_in(key, i); one
    compilation serves every layer selection, and XLA drops the work after the last block's attention."""
    model = nnx.merge(graphdef, state)
    noise = jax.random.normal(jax.random.fold_in(key, i), latents.shape, latents.dtype)
    if isinstance(schedule, FlowSchedule):
        p = model.cfg.patch_size
        tokens = (latents.shape[1] // p) * (latents.shape[2] // p)
        return model(schedule.add_noise(latents, noise, t, tokens), schedule.model_timestep(t, tokens), context)[1]
    return model(schedule.add_noise(latents, noise, t), t, context)[1]


def collect_taps(images, model: DiffusionTransformer, timesteps, seed: int = 0, *,
                 layers: Sequence[int] | None = None, latent: str = "mean") -> Taps:
    """Self-attention taps of `model` on `images` `[B, H, W, 3]` (in [−1, 1], sides multiples of 16) at each of
    `timesteps` (ints in [0, 999]): per layer q/k/v `[B, T·H, N, D]`, timestep-major (SD3: the image tokens).

    One transformer pass per timestep (compiled once per architecture and input shape; only the taps leave it, so
    XLA drops the blocks after the last one needed); latent: the VAE posterior "mean" or a "sample" from `seed`.
    """
    images, ts, chosen = diffusion.check_request(images, model.schedule, timesteps, layers, model.cfg.num_layers)
    latents = model.latents(images, latent=latent, seed=seed)
    graphdef, state = nnx.split(model.transformer)
    return diffusion.over_timesteps(lambda t, i, key: _step_taps(graphdef, state, latents, t, i, key, model.context,
                                                                 model.schedule), ts, chosen, seed)


def load_backbone(spec: ModelSpec, weights: str | None = None, *, dtype=None, seed: int = 0, timesteps=None,
                  latent: str = "mean", text_embedding: str | None = None) -> Backbone:
    """Diffusion transformer `spec` with its weights, as a `Backbone` whose taps are q/k/v `[B, T·H, N, D]` per
    block.

    weights: as in `load_dit` (None: `spec.repo_id`; "random"; a diffusers-layout directory or repo id).
    timesteps: ints in [0, 999] (None: `DEFAULT_NUM_TIMESTEPS` drawn at random from `seed` over [0, 250], as for
    Stable Diffusion); seed: the noise, the random schedule and a latent sample; latent: "mean" or "sample";
    text_embedding: a saved text embedding (`modeling.load_text_embedding`; default: zeros — see `config.py`).
    Timesteps and latent are checked before any weight is read.
    """
    ts = (diffusion.timestep_schedule("random", diffusion.DEFAULT_NUM_TIMESTEPS, seed) if timesteps is None
          else diffusion.check_timesteps(timesteps, spec.config.schedule.num_train_timesteps))
    if latent not in diffusion.LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(diffusion.LATENTS)}")
    model = load_dit(spec.name, weights, text_embedding=text_embedding,
                     dtype=jnp.float32 if dtype is None else dtype, seed=seed)

    def apply(params, images, layers, hidden=False):
        if hidden:
            raise InputError("--hidden", "is not available for diffusion-transformer models", "drop --hidden")
        return collect_taps(images, model, ts, seed, layers=layers, latent=latent)

    heads = {i: int(a[1]) for i, a in enumerate(spec.config.transformer.attn_layers())}
    return Backbone(spec.name, spec.preprocess, spec.config.num_layers, None, apply,
                    str(weights if weights is not None else spec.repo_id), tuple(int(t) for t in ts), heads, model,
                    jittable=False)
