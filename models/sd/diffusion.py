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
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.errors import InputError, is_integer
from spectral_jax.models.backbone import resolve_layers
from spectral_jax.taps import LayerTap, Taps

SCHEDULES = ("random", "constant", "increasing", "decreasing", "cyclic")
DEFAULT_NUM_TIMESTEPS = 4
DEFAULT_T_MAX = 250
# At most this many timesteps per request (`max_timesteps`; SPECTRAL_JAX_MAX_TIMESTEPS changes it): each timestep is
# one model pass whose q/k/v are all kept — SD 1.5 at 512² keeps 132 MiB per image per timestep (8.3 GiB at 64),
# SD3-medium at 1024² 1.7 GiB.
DEFAULT_MAX_TIMESTEPS = 64
MAX_TIMESTEPS_ENV = "SPECTRAL_JAX_MAX_TIMESTEPS"
LATENTS = ("mean", "sample")


def timestep_schedule(kind: str, steps: int, seed: int = 0, t_max: int = DEFAULT_T_MAX, *, t_min: int = 0,
                      periods: int = 1, num_train_timesteps: int = 1000) -> np.ndarray:
    """`steps` integer timesteps in [t_min, t_max], int64 `[steps]` — the schedules the official code offers:

    random      t ~ U{t_min..t_max}, i.i.d. from `seed` (the paper's setting, t_max = 250)
    constant    t_max every step
    increasing  t_min → t_max, evenly spaced (rounded)
    decreasing  t_max → t_min
    cyclic      t_min + (t_max − t_min)·(1 − cos(2π·periods·i/steps))/2: `periods` cosine cycles from t_min
    """
    if kind not in SCHEDULES:
        raise InputError(f"schedule {kind!r}", "unknown timestep schedule", f"choose one of {', '.join(SCHEDULES)}")
    if int(steps) < 1:
        raise InputError(f"steps {steps}", "need at least one timestep", "pass e.g. --num-timesteps 4")
    if not 0 <= t_min <= t_max < num_train_timesteps:
        raise InputError(f"t_min {t_min}, t_max {t_max}", f"need 0 ≤ t_min ≤ t_max ≤ {num_train_timesteps - 1}",
                         "pass e.g. --t-max 250")
    if int(periods) < 1:
        raise InputError(f"periods {periods}", "must be ≥ 1", "pass e.g. periods=1")
    n, i = int(steps), np.arange(int(steps))
    if kind == "random":
        return np.random.default_rng(seed).integers(t_min, t_max + 1, n).astype(np.int64)
    if kind == "constant":
        return np.full(n, t_max, np.int64)
    if kind in ("increasing", "decreasing"):
        t = np.rint(np.linspace(t_min, t_max, n)).astype(np.int64)
        return t if kind == "increasing" else t[::-1].copy()
    t = t_min + (t_max - t_min) * 0.5 * (1.0 - np.cos(2.0 * np.pi * periods * i / n))
    return np.rint(t).astype(np.int64)


def max_timesteps() -> int:
    """The timestep cap: SPECTRAL_JAX_MAX_TIMESTEPS if set (a positive integer), else `DEFAULT_MAX_TIMESTEPS`."""
    from spectral_jax.io import env_cap

    return env_cap(MAX_TIMESTEPS_ENV, DEFAULT_MAX_TIMESTEPS, 256)


def check_count(count: int, what: str) -> None:
    """Refuse more than `max_timesteps()` timesteps (`what` names the input) before any of them is drawn or run."""
    cap = max_timesteps()
    if count > cap:
        raise InputError(what, f"asks for {count} timesteps, over the cap of {cap} (each is one pass of the model "
                         "whose q/k/v are all kept)", f"pass fewer, or raise the cap with {MAX_TIMESTEPS_ENV}")


def check_timesteps(timesteps, num_train_timesteps: int = 1000, what: str = "timesteps") -> np.ndarray:
    """Timesteps given to the API (a sequence of integers, or one) → int64 `[T]`: 1 ≤ T ≤ `max_timesteps()`, each
    an integer (not a bool or a float) in [0, num_train_timesteps); otherwise an `InputError` naming them. Repeats
    are allowed here (a random schedule draws with replacement; each repeat gets its own noise)."""
    shown = _shown(timesteps)
    try:
        items = np.asarray(timesteps, dtype=object).reshape(-1)
    except (TypeError, ValueError):
        items = None
    if items is None or not all(is_integer(t) for t in items):
        raise InputError(f"{what} {shown}", f"must be integers in [0, {num_train_timesteps - 1}]",
                         "pass e.g. timesteps=[0, 50, 100]")
    if items.size == 0:
        raise InputError(f"{what} {shown}", "need at least one timestep", "pass e.g. timesteps=[0, 50, 100]")
    check_count(items.size, f"{what} {shown}")
    bad = [int(t) for t in items if not 0 <= t < num_train_timesteps]
    if bad:
        raise InputError(f"{what} {shown}", f"hold {bad[0]}: must be integers in [0, {num_train_timesteps - 1}] (the "
                         f"model's {num_train_timesteps} training timesteps)", "pass e.g. timesteps=[0, 50, 100]")
    return np.array([int(t) for t in items], np.int64)


def parse_timesteps(text: str, num_train_timesteps: int = 1000) -> np.ndarray:
    """--timesteps "0,50,100" → int64 `[3]`: comma-separated integers, each in [0, num_train_timesteps), no empty
    item, no repeat (several noises at one t: a constant schedule), at most `max_timesteps()` of them; anything
    else is one `InputError` naming the flag and the offending item."""
    what, fix = f"--timesteps {_shown(text)}", "pass e.g. --timesteps 0,50,100"
    items = [s.strip() for s in text.split(",")]
    check_count(len(items), what)
    ts = []
    for s in items:
        if not s:
            raise InputError(what, "has an empty item (two commas, or a comma at an end)", fix)
        if not re.fullmatch(r"[+-]?[0-9]+", s):
            raise InputError(what, f"item {_shown(s)} is not an integer", fix)
        t = int(s)
        if not 0 <= t < num_train_timesteps:
            raise InputError(what, f"item {_shown(s)}: each must be in [0, {num_train_timesteps - 1}] (the model's "
                             f"{num_train_timesteps} training timesteps)", fix)
        if t in ts:
            raise InputError(what, f"repeats {t}", "give each timestep once (several noises at one timestep t: "
                             "--num-timesteps T --schedule constant --t-max t)")
        ts.append(t)
    return np.array(ts, np.int64)


def _shown(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters (a message stays one readable line whatever was passed)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
