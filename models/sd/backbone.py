"""The Stable Diffusion family behind the backbone contract: `load_backbone(spec, weights) -> Backbone` with
`params` a pytree of arrays — the VAE encoder and UNet states, the empty-prompt text conditioning, the noise key
(uint32 key data) and the timesteps (int32 `[T]`) — and `apply` pure and jittable (`diffusion.diffusion_taps` under
one shared jit, `diffusion.backbone_apply`; closing over graph definitions, the DDPM schedule and the latent mode
only). `models.registry` dispatches here. Its taps fold the timesteps into the heads axis: graph index t·H + head (`diffusion.py`).

Shape legend
    B  images   (H, W) pixels (multiples of 8)   T  timesteps   H  heads   N  tokens of a layer's grid   D  head dim
"""

from __future__ import annotations


import jax.numpy as jnp

from spectral_jax.errors import InputError
from spectral_jax.models.backbone import Backbone
from spectral_jax.models.sd import diffusion
from spectral_jax.models.sd.modeling import load_sd
from spectral_jax.models.spec import ModelSpec


def load_backbone(spec: ModelSpec, weights: str | None = None, *, dtype=None, seed: int = 0, timesteps=None,
                  latent: str = "mean", text_embedding: str | None = None,
                  attn_chunk: int | None = None) -> Backbone:
    """Stable Diffusion `spec` with its weights, as a `Backbone` whose taps are q/k/v `[B, T·H, N, D]` per
    self-attention layer.

    weights: as in `load_sd` (None: `spec.repo_id`; "random"; a diffusers-layout directory or repo id).
    timesteps: ints in [0, 999] (None: `DEFAULT_NUM_TIMESTEPS` drawn at random from `seed` over [0, 250], the
    official code's range); seed: the noise key (params["noise_key"]), the random schedule and a latent sample;
    latent: "mean" or "sample"; text_embedding: a saved empty-prompt embedding .npy (then text_encoder/ is not
    read); attn_chunk: attention in blocks of this many query rows. Timesteps and latent are checked before any
    weight is read. The returned params["timesteps"] may be replaced by other timesteps (data: no recompilation
    for the same T); `Backbone.timesteps` records the ones loaded.
    """
    ts = (diffusion.timestep_schedule("random", diffusion.DEFAULT_NUM_TIMESTEPS, seed) if timesteps is None
          else diffusion.check_timesteps(timesteps, spec.config.schedule.num_train_timesteps))
    if latent not in diffusion.LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(diffusion.LATENTS)}")
    sd = load_sd(spec.name, weights, text_embedding=text_embedding, dtype=jnp.float32 if dtype is None else dtype,
                 seed=seed, attn_chunk=attn_chunk)
    attn = spec.config.unet.attn_layers()
    params = diffusion.diffusion_params(sd.vae, sd.unet, sd.context, seed, ts)
    apply = diffusion.backbone_apply(**diffusion.unet_static(sd, latent))
    return Backbone(spec.name, spec.preprocess, spec.config.num_layers, params, apply,
                    str(weights if weights is not None else spec.repo_id), tuple(int(t) for t in ts),
                    {i: int(a[1]) for i, a in enumerate(attn)}, sd)
