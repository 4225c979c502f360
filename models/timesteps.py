"""Diffusion timesteps without JAX: the schedules, the cap and the checks every diffusion family and the command line
share (`models.sd.diffusion` and `models.dit` take their timesteps from here; the CLI checks them before a model
loads). Reading this module imports numpy only.

    timestep_schedule("random", 4, seed=0)          # int64 [4], t ~ U{0..250} (the official code's range)
    parse_timesteps("0,50,100")                     # --timesteps → int64 [3]
    check_timesteps([5, 999])                       # API timesteps → int64 [T], range and cap checked

Shape legend
    T  timesteps
"""

from __future__ import annotations

import re

import numpy as np

from spectral_jax.errors import InputError, is_integer

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


__all__ = ["DEFAULT_MAX_TIMESTEPS", "DEFAULT_NUM_TIMESTEPS", "DEFAULT_T_MAX", "LATENTS", "MAX_TIMESTEPS_ENV",
           "SCHEDULES", "check_count", "check_timesteps", "max_timesteps", "parse_timesteps", "timestep_schedule"]
