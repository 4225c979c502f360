"""The model-family options of the command line: one argument group (`add_arguments`) and its translation into
`models.load_backbone` options (`family_options`), for every family the registry holds — this module knows no
family by name. A flag is taken by a model when its family lists the load option the flag sets
(`models.spec.Family.options`); any other use is one `InputError` naming the flag and the registered models that do
take it, before anything loads. Timesteps are read and checked here (range, cap), before the model loads.

    add_arguments(parser)                                  # --timesteps, --num-timesteps, --schedule, --t-max, ...
    options = family_options(args, get_spec(name), family(name))     # → load_backbone(name, weights, **options)

Imports no JAX.
"""

from __future__ import annotations

import argparse

from spectral_jax.errors import InputError
from spectral_jax.models import timesteps as T

# Flag (argparse dest) → the `load_backbone` option it sets.
FLAGS = {"timesteps": "timesteps", "num_timesteps": "timesteps", "schedule": "timesteps", "t_max": "timesteps",
         "latent": "latent", "text_embedding": "text_embedding"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the family-option group (diffusion models: timesteps, latent, text conditioning) to `parser`. Every flag
    defaults to None (the family's default); `family_options` refuses one the chosen model does not take."""
    g = parser.add_argument_group("Diffusion models: self-attention taps across noise timesteps (refused for a "
                                  "model whose family does not take them)")
    g.add_argument("--timesteps", default=None,
                   help="comma-separated distinct timesteps in [0, N-1] (N: the model's training timesteps, 1000 for "
                        f"the published ones), e.g. 0,50,100, at most {T.DEFAULT_MAX_TIMESTEPS} (each is one model "
                        f"pass whose q/k/v are kept; set {T.MAX_TIMESTEPS_ENV} to change the cap) (flow-matching "
                        "models: t maps to σ as diffusers' flow-matching scheduler)")
    g.add_argument("--num-timesteps", type=int, default=None, metavar="T",
                   help=f"draw T timesteps with --schedule (dataset --timestep-draw fresh: T each step) (default "
                        f"{T.DEFAULT_NUM_TIMESTEPS}, at most "
                        f"{T.DEFAULT_MAX_TIMESTEPS}: {T.MAX_TIMESTEPS_ENV} changes the cap)")
    g.add_argument("--schedule", default=None, choices=T.SCHEDULES,
                   help="timestep schedule over [0, --t-max] (default random: t ~ U{0..t_max}, drawn from --seed)")
    g.add_argument("--t-max", type=int, default=None,
                   help=f"largest timestep of the schedule (default {T.DEFAULT_T_MAX}; dataset --timestep-draw "
                        "fresh: of each step's draw)")
    g.add_argument("--latent", default=None, choices=T.LATENTS,
                   help="the VAE posterior mean (default) or a sample from --seed")
    g.add_argument("--text-embedding", default=None, metavar="FILE",
                   help="a saved text conditioning (the empty prompt's embedding, in the format the model's family "
                        "documents: .npy or .npz) instead of running the text encoder")


def family_options(args: argparse.Namespace, spec, family) -> dict:
    """The `load_backbone` options the family flags of `args` set for model `spec` of `family`
    (`models.spec.Family`), plus `seed` where the family takes one: {"timesteps": int64 `[T]` (or absent: the
    family's default schedule), "latent", "text_embedding", "seed"}. A flag the family does not take is one
    `InputError` naming it and the registered models that take it; timesteps are checked against the model's
    schedule (`spec.config.schedule.num_train_timesteps`) and the cap. Reads no weights, imports no JAX."""
    given = [dest for dest in FLAGS if getattr(args, dest, None) is not None]
    refused = [dest for dest in given if FLAGS[dest] not in family.options]
    if refused:
        flags = ", ".join(f"--{d.replace('_', '-')}" for d in refused)
        takers = _models_taking({FLAGS[d] for d in refused})
        fix = (f"drop {'it' if len(refused) == 1 else 'them'}, or use a model that takes "
               f"{'it' if len(refused) == 1 else 'them'}: {', '.join(takers)}" if takers
               else f"drop {'it' if len(refused) == 1 else 'them'}")
        raise InputError(flags, f"{'does' if len(refused) == 1 else 'do'} not apply to {spec.name} "
                         f"({family.title} models)", fix)
    options = {}
    if "timesteps" in family.options:
        ts = _timesteps(args, spec.config.schedule.num_train_timesteps)
        if ts is not None:
            options["timesteps"] = ts
    for dest in ("latent", "text_embedding"):
        if getattr(args, dest, None) is not None:
            options[FLAGS[dest]] = getattr(args, dest)
    if "seed" in family.options and getattr(args, "seed", None) is not None:
        options["seed"] = args.seed
    return options


def recorded(options: dict, family) -> dict:
    """What a run's `family_options` set besides the timesteps (which the backbone reports), for its JSON record:
    "latent" (the family's default "mean" where none was given) and, where one was given, "text_embedding" (the
    file's absolute path) with "text_embedding_sha256" (`io.digest`: the first 128 bits of its content's sha256, as
    `dataset`'s model_options have it: a file changed under the same path shows) — each only for a family that
    takes it."""
    import os

    from spectral_jax.io import digest

    out = {}
    if "latent" in family.options:
        out["latent"] = options.get("latent") or "mean"
    if options.get("text_embedding") is not None:
        path = options["text_embedding"]
        out.update(text_embedding=os.path.abspath(path),
                   text_embedding_sha256=digest(path, "text embedding file").hex())
    return out


def _models_taking(options: set) -> list[str]:
    """Registered model names (`registry.names()`, in registry order) whose family takes every one of `options`."""
    from spectral_jax.models.registry import FAMILIES, get_spec, names

    return [n for n in names() if options <= set(FAMILIES[get_spec(n).family].options)]


def _timesteps(args: argparse.Namespace, n: int):
    """--timesteps, or --num-timesteps/--schedule/--t-max, as int64 `[T]` in the model's range [0, n) (n: its
    training timesteps), T ≤ the timestep cap; None when none is given (the family's default schedule, drawn from
    --seed). Checked before anything is drawn or run."""
    scheduled = [getattr(args, a, None) is not None for a in ("num_timesteps", "schedule", "t_max")]
    if args.timesteps is None and not any(scheduled):
        return None
    if args.timesteps is not None:
        if any(scheduled):
            raise InputError("--timesteps", "cannot be combined with --num-timesteps/--schedule/--t-max",
                             "pass either --timesteps 0,50,100 or --num-timesteps T --schedule KIND")
        return T.parse_timesteps(args.timesteps, n)
    if args.num_timesteps is not None:
        if args.num_timesteps < 1:
            raise InputError(f"--num-timesteps {args.num_timesteps}", "must be ≥ 1",
                             f"pass e.g. --num-timesteps {T.DEFAULT_NUM_TIMESTEPS}")
        T.check_count(args.num_timesteps, f"--num-timesteps {args.num_timesteps}")
    if args.t_max is not None and not 0 <= args.t_max < n:
        raise InputError(f"--t-max {args.t_max}", f"must be in [0, {n - 1}] (the model's {n} training timesteps)",
                         f"pass e.g. --t-max {T.DEFAULT_T_MAX}")
    return T.timestep_schedule(args.schedule or "random", args.num_timesteps or T.DEFAULT_NUM_TIMESTEPS,
                               getattr(args, "seed", 0), T.DEFAULT_T_MAX if args.t_max is None else args.t_max,
                               num_train_timesteps=n)


__all__ = ["FLAGS", "add_arguments", "family_options"]
