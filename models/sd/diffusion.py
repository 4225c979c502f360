"""Diffusion taps: images → VAE latents → noisy latents at T timesteps → UNet self-attention taps, folded
into one `Taps` (a cache of T samples of q/k/v per layer, never an N×N attention matrix).

    sd = spectral_jax.models.sd.load_sd("sd15")                       # or load_sd("sd_tiny", "random")
    ts = timestep_schedule("random", 8, seed=0)                       # t ~ U{0..250}, as the official code
    taps = collect_taps(images, sd, ts, seed=0)                       # q/k/v [B, T·H, h*w, D] per layer
    graphs = spectral_jax.graphs.from_taps(taps, "qk")                # one group per grid (64/32/16/8 at 512²)
    res = spectral_jax.solvers.gd.gd(graphs, 20, sample=0.25)         # a fresh (layer, timestep, head) draw per step

For each timestep t_i (i = 0..T−1): x_t = √ᾱ_t · z + √(1 − ᾱ_t) · ε_i with z the scaled VAE latent of the image
and ε_i ~ N(0, I) drawn from (seed, i); the UNet runs on (x_t, t_i, empty-prompt text) and every self-attention
layer's raw q/k/v is kept. The heads axis of each layer then holds T·H graphs, timestep-major: graph index
i·H + head — the ACTS `timesteps`/`num_heads` convention (`spectral_jax.acts`). A solve that samples a fraction
of each group's graphs per step (`gd(..., sample=F)`) therefore sees different timesteps and heads every step
without running the UNet again — the official code's fresh-t-per-step objective, from a fixed cache.

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


def fold_timesteps(per_step: Sequence[Taps]) -> Taps:
    """T single-timestep `Taps` (q/k/v `[B, H, N, D]`) → one with q/k/v `[B, T·H, N, D]`, timestep-major."""
    first = per_step[0]
    layers = {}
    for i, t in first.layers.items():
        cat = lambda name: jnp.concatenate([getattr(s.layers[i], name) for s in per_step], axis=1)
        layers[i] = LayerTap(cat("q"), cat("k"), cat("v"), t.grid, t.num_prefix)
    return Taps(layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"))
def _encode(graphdef, state, images, key, sample: bool):
    return nnx.merge(graphdef, state).encode(images, key if sample else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule"))
def _step_taps(graphdef, state, latents, t, i, key, context, schedule):
    """Taps of every self-attention layer of the UNet on x_t = add_noise(latents, ε_i, t), ε_i ~ N(0, I) from
    fold_in(key, i). All layers, so that one compilation serves every layer selection; only the taps leave, so
    XLA drops the UNet's work after the last self-attention."""
    noise = jax.random.normal(jax.random.fold_in(key, i), latents.shape, latents.dtype)
    x_t = schedule.add_noise(latents, noise, t)
    ctx = jnp.broadcast_to(context, (latents.shape[0], *context.shape[1:]))
    return nnx.merge(graphdef, state)(x_t, t, ctx)[1]


def seed_keys(seed: int):
    """(VAE sampling key, noise key) of `seed`: the split every diffusion family uses."""
    k_vae, k_noise = jax.random.split(jax.random.key(seed))
    return k_vae, k_noise


def encode_images(model, images, *, latent: str = "mean", seed: int = 0) -> jax.Array:
    """Scaled VAE latents `[B, h, w, 4]` of images `[B, H, W, 3]` in [−1, 1]: scaling_factor · z, z the posterior
    mean ("mean") or a sample from `seed` ("sample", as the official code does)."""
    if latent not in LATENTS:
        raise InputError(f"latent {latent!r}", "unknown", f"choose one of {', '.join(LATENTS)}")
    graphdef, state = nnx.split(model.vae)
    return _encode(graphdef, state, jnp.asarray(images, jnp.float32), seed_keys(seed)[0], latent == "sample")


def noisy_latents(model, latents, timesteps, seed: int = 0) -> jax.Array:
    """The UNet inputs `collect_taps` uses: `[T, B, h, w, 4]`, x_{t_i} = add_noise(latents, ε_i, t_i),
    ε_i ~ N(0, I) from (seed, i)."""
    ts = model.schedule.check(np.asarray(timesteps).reshape(-1))
    k = seed_keys(seed)[1]
    out = []
    for i, t in enumerate(ts):
        noise = jax.random.normal(jax.random.fold_in(k, i), latents.shape, latents.dtype)
        out.append(model.schedule.add_noise(latents, noise, int(t)))
    return jnp.stack(out)


def collect_taps(images, model, timesteps, seed: int = 0, *, layers: Sequence[int] | None = None,
                 latent: str = "mean") -> Taps:
    """Self-attention taps of `model` (a `StableDiffusion`) on `images` `[B, H, W, 3]` (in [−1, 1], sides multiples
    of 8) at each of `timesteps` (ints in [0, 999]), folded timestep-major: per layer q/k/v `[B, T·H, h_l·w_l, D]`.

    One UNet pass per timestep (compiled once per architecture and input shape); the noise ε_i comes from
    (seed, i); latent: "mean" or "sample" (the VAE posterior; a sample is drawn from `seed`). layers: indices of
    self-attention layers (None → all 16 for SD 1.x/2.x). Memory: O(T · Σ_l N_l·H·D), the q/k/v themselves — no
    attention matrix is kept.
    """
    images, ts, chosen = check_request(images, model.schedule, timesteps, layers, model.cfg.num_layers)
    latents = encode_images(model, images, latent=latent, seed=seed)
    graphdef, state = nnx.split(model.unet)
    return over_timesteps(lambda t, i, key: _step_taps(graphdef, state, latents, t, i, key, model.context,
                                                       model.schedule), ts, chosen, seed)


def check_request(images, schedule, timesteps, layers, num_layers: int):
    """(images float32 `[B, H, W, 3]`, timesteps int64 `[T]` checked against `schedule`'s range and the cap
    (`check_timesteps`), layer indices) of a taps request."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got {images.shape}")
    ts = check_timesteps(timesteps, schedule.num_train_timesteps)
    return images, ts, resolve_layers(layers, num_layers, "self-attention layers")


def over_timesteps(step, ts, chosen, seed: int) -> Taps:
    """`step(t, i, noise_key)` → Taps for each timestep t (its index i), the `chosen` layers kept, folded
    timestep-major (`fold_timesteps`); the noise key is `seed_keys(seed)[1]` (each step folds in i)."""
    key = seed_keys(seed)[1]
    steps = []
    for i, t in enumerate(ts):
        taps = step(jnp.int32(t), jnp.int32(i), key)
        steps.append(Taps({j: taps.layers[j] for j in chosen}))
    return fold_timesteps(steps)
