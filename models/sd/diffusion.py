"""Diffusion taps as a pure function: images → VAE latents → noisy latents at T timesteps → the denoiser's
(UNet's or transformer's) self-attention taps, folded into one `Taps` (a cache of T samples of q/k/v per layer,
never an N×N attention matrix). Every diffusion family (Stable Diffusion here, the DiTs in `models.dit`) runs
through `diffusion_taps`.

    sd = spectral_jax.models.sd.load_sd("sd15")                       # or load_sd("sd_tiny", "random")
    ts = timestep_schedule("random", 8, seed=0)                       # t ~ U{0..250}, as the official code
    taps = collect_taps(images, sd, ts, seed=0)                       # q/k/v [B, T·H, h*w, D] per layer
    graphs = spectral_jax.graphs.from_taps(taps, "qk")                # one group per grid (64/32/16/8 at 512²)
    res = spectral_jax.solvers.gd.gd(graphs, 20, sample=0.25)         # a fresh (layer, timestep, head) draw per step

The backbone contract (`models.backbone`): `params = diffusion_params(vae, denoiser, context, seed, timesteps)` is a
dict of arrays — "vae" and "denoiser" (the nnx states), "context" (the text conditioning: an array, or SD3/FLUX's
(tokens, pooled)), "noise_key" (uint32 raw key data of `jax.random.key(seed)`, `jax.random.key_data`) and
"timesteps" (int32 `[T]`) — and `diffusion_taps(params, images, layers, hidden, *, static structure)` is pure and
jittable: it closes over graph definitions, the schedule and the latent mode only, and runs the T timesteps under
one `lax.scan` (the denoiser is traced and compiled once, not T times). Changing params["timesteps"] (same T) or the
key reuses the compiled program.

For timestep t_i (i = 0..T−1): x_t = add_noise(z, ε_i, t_i) (DDPM: √ᾱ_t · z + √(1 − ᾱ_t) · ε_i) with z the scaled
VAE latent of the image and ε_i ~ N(0, I) of ONE image's latent shape `[1, h, w, C]`, drawn from
fold_in(noise key, i) and broadcast over the batch: every image of a batch gets the same ε_i, so an image's taps do
not depend on the batch it is in or its slot there (for a batch of one, ε_i is a draw of its own latent's shape). The
VAE's posterior sample (latent="sample") follows the same rule (`vae.encode`). The noise key is split as
(VAE-sample key, noise key) = split(key(seed)) (`seed_keys`). The denoiser runs on (x_t, t_i, the conditioning) and
every chosen self-attention layer's raw q/k/v is kept. The heads axis of each layer then holds T·H graphs,
timestep-major: graph index i·H + head — the ACTS `timesteps`/`num_heads` convention (`spectral_jax.acts`). A solve
that samples a fraction of each group's graphs per step (`gd(..., sample=F)`) therefore sees different timesteps and
heads every step without running the model again — the official code's fresh-t-per-step objective, from a fixed
cache.

Shape legend
    B  images   (H, W)  pixels (multiples of 8)   (h, w) = (H, W)/8 latent grid   T  timesteps   H  heads
    N  tokens of a layer's grid   D  head dim
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.models.backbone import resolve_layers
from spectral_jax.models.timesteps import (DEFAULT_MAX_TIMESTEPS, DEFAULT_NUM_TIMESTEPS, DEFAULT_T_MAX,  # noqa: F401
                                           LATENTS, MAX_TIMESTEPS_ENV, SCHEDULES, check_count, check_timesteps,
                                           max_timesteps, parse_timesteps, timestep_schedule)
from spectral_jax.taps import LayerTap, Taps


def fold_timesteps(per_step: Taps) -> Taps:
    """`Taps` stacked over timesteps (q/k/v `[T, B, H, N, D]`, as `lax.scan` returns them) → q/k/v `[B, T·H, N, D]`,
    timestep-major (graph index i·H + head)."""
    def fold(a):
        t, b, h = a.shape[:3]
        return jnp.swapaxes(a, 0, 1).reshape(b, t * h, *a.shape[3:])

    return Taps({i: LayerTap(fold(t.q), fold(t.k), fold(t.v), t.grid, t.num_prefix)
                 for i, t in per_step.layers.items()})


def seed_keys(seed):
    """(VAE sampling key, noise key) of `seed` (an int, or the raw uint32 key data of `jax.random.key(seed)`): the
    split every diffusion family uses."""
    key = jax.random.key(int(seed)) if np.ndim(seed) == 0 else jax.random.wrap_key_data(seed)
    k_vae, k_noise = jax.random.split(key)
    return k_vae, k_noise


def image_noise(key, i, latents):
    """ε_i ~ N(0, I) of one image's latent shape `[1, h, w, C]` from fold_in(key, i) (i: the timestep's index) — the
    same for every image of a batch (broadcast by `add_noise`). Drawn in float32 and then cast to the latents'
    dtype: a draw in bfloat16 is another sample, not the float32 one rounded, so a bfloat16 run would see other
    noise under the same seed."""
    return jax.random.normal(jax.random.fold_in(key, i), (1, *latents.shape[1:]), jnp.float32).astype(latents.dtype)


def unet_step(unet, latents, noise, t, context, schedule, layers):
    """The UNet's taps of `layers` on x_t = schedule.add_noise(latents, noise, t) (`[B, h, w, 4]`; noise `[1, ...]`
    broadcast over the batch), the text `context` `[1, M, C]` broadcast to the batch."""
    ctx = jnp.broadcast_to(context, (latents.shape[0], *context.shape[1:]))
    return unet(schedule.add_noise(latents, noise, t), t, ctx, layers=layers)[1]


def diffusion_params(vae, denoiser, context, seed: int, timesteps) -> dict:
    """The params pytree of a diffusion backbone (see the module docstring): {"vae", "denoiser": nnx states,
    "context": the conditioning, "noise_key": uint32 key data of `jax.random.key(seed)`, "timesteps": int32 `[T]`}.
    The states share the modules' arrays (nothing is copied). timesteps are taken as given (check them first:
    `check_timesteps`)."""
    return {"vae": nnx.split(vae)[1], "denoiser": nnx.split(denoiser)[1], "context": context,
            "noise_key": jax.random.key_data(jax.random.key(int(seed))),
            "timesteps": jnp.asarray(np.asarray(timesteps, np.int64).reshape(-1), jnp.int32)}


def diffusion_taps(params, images, layers=None, hidden: bool = False, *, vae_def, denoiser_def, step, schedule,
                   num_layers: int, sample: bool, shift: float = 0.0, title: str = "diffusion") -> Taps:
    """Taps of the chosen `layers` (a tuple, or None: all `num_layers`) of a diffusion model on `images`
    `[B, H, W, 3]` (in [−1, 1]) at each of params["timesteps"] `[T]`: per layer q/k/v `[B, T·H, N, D]`, timestep-major.
    Pure and jittable (`layers`, `hidden` and the keyword arguments static; `params` as `diffusion_params` builds it).

    vae_def, denoiser_def: the nnx graph definitions the states merge into; step(denoiser, latents, noise, t,
    context, schedule, layers) → Taps of one timestep (`unet_step`, `models.dit.backbone.dit_step`); sample: the
    VAE posterior sample (else its mean); shift: subtracted from the scaled latent (SD3/FLUX's VAE shift); title:
    names the family when `hidden` is asked for (diffusion models expose no hidden states: an `InputError`)."""
    if hidden:
        raise InputError("--hidden", f"is not available for {title} models", "drop --hidden")
    chosen = resolve_layers(layers, num_layers, "self-attention layers")
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    k_vae, k_noise = seed_keys(params["noise_key"])
    latents = nnx.merge(vae_def, params["vae"]).encode(images, k_vae if sample else None)
    if shift:
        latents = latents - shift
    ts = jnp.asarray(params["timesteps"], jnp.int32).reshape(-1)

    def one(carry, ti):
        t, i = ti
        net = nnx.merge(denoiser_def, params["denoiser"])
        taps = step(net, latents, image_noise(k_noise, i, latents), t, params["context"], schedule, chosen)
        return carry, Taps({j: taps.layers[j] for j in chosen})

    _, per_step = jax.lax.scan(one, None, (ts, jnp.arange(ts.shape[0], dtype=jnp.int32)))
    return fold_timesteps(per_step)


_STATIC = ("layers", "hidden", "vae_def", "denoiser_def", "step", "schedule", "num_layers", "sample", "shift", "title")
_jit_taps = jax.jit(diffusion_taps, static_argnames=_STATIC)


def backbone_apply(**static):
    """A diffusion family's `Backbone.apply`: `diffusion_taps` with its static keyword arguments bound, under the one
    `jax.jit` of this module. Every caller's trace (`Backbone.taps`, the dataset's geometry, feature widths and
    forward) then binds one call whose jaxpr jax traced once per (static structure, layers, input shapes) in the
    process, instead of tracing the whole model again. XLA inlines the call: the taps are those of `diffusion_taps`
    itself."""
    return functools.partial(_jit_taps, **static)


def encode_images(model, images, *, latent: str = "mean", seed: int = 0) -> jax.Array:
    """Scaled VAE latents `[B, h, w, 4]` of images `[B, H, W, 3]` in [−1, 1]: scaling_factor · z, z the posterior
    mean ("mean") or a sample from `seed` ("sample", as the official code does; one draw of an image's shape for
    the whole batch, as in `diffusion_taps`)."""
    if latent not in LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(LATENTS)}")
    graphdef, state = nnx.split(model.vae)
    return _encode(graphdef, state, jnp.asarray(images, jnp.float32), seed_keys(seed)[0], latent == "sample")


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"))
def _encode(graphdef, state, images, key, sample: bool):
    return nnx.merge(graphdef, state).encode(images, key if sample else None)


def noisy_latents(model, latents, timesteps, seed: int = 0) -> jax.Array:
    """The UNet inputs `collect_taps` uses: `[T, B, h, w, 4]`, x_{t_i} = add_noise(latents, ε_i, t_i), ε_i
    (`image_noise`) from (seed, i), the same for every image of the batch."""
    ts = model.schedule.check(np.asarray(timesteps).reshape(-1))
    k = seed_keys(seed)[1]
    return jnp.stack([model.schedule.add_noise(latents, image_noise(k, i, latents), int(t)) for i, t in enumerate(ts)])


def collect_taps(images, model, timesteps, seed: int = 0, *, layers: Sequence[int] | None = None,
                 latent: str = "mean") -> Taps:
    """Self-attention taps of `model` (a `StableDiffusion`) on `images` `[B, H, W, 3]` (in [−1, 1], sides multiples
    of 8) at each of `timesteps` (ints in [0, 999]), folded timestep-major: per layer q/k/v `[B, T·H, h_l·w_l, D]`.

    `diffusion_taps` on `diffusion_params(model..., seed, timesteps)`, compiled once per architecture, layer
    selection and input shape (the timesteps and seed are data). latent: "mean" or "sample" (the VAE posterior; a
    sample is drawn from `seed`). layers: indices of self-attention layers (None → all 16 for SD 1.x/2.x). Memory:
    O(T · Σ_l N_l·H·D), the q/k/v themselves — no attention matrix is kept.
    """
    images, ts, chosen = check_request(images, model.schedule, timesteps, layers, model.cfg.num_layers)
    if latent not in LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(LATENTS)}")
    params = diffusion_params(model.vae, model.unet, model.context, seed, ts)
    return _jit_taps(params, images, chosen, False, **unet_static(model, latent))


def unet_static(model, latent: str) -> dict:
    """The static keyword arguments of `diffusion_taps` for a `StableDiffusion` `model` (graph definitions, the
    schedule, the layer count, the latent mode)."""
    return dict(vae_def=nnx.split(model.vae)[0], denoiser_def=nnx.split(model.unet)[0], step=unet_step,
                schedule=model.schedule, num_layers=model.cfg.num_layers, sample=latent == "sample",
                title="Stable Diffusion")


def check_request(images, schedule, timesteps, layers, num_layers: int):
    """(images float32 `[B, H, W, 3]`, timesteps int64 `[T]` checked against `schedule`'s range and the cap
    (`check_timesteps`), layer indices) of a taps request."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    return images, ts, resolve_layers(layers, num_layers, "self-attention layers")
