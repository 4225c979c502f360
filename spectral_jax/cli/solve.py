"""`spectral-jax solve ACTS.npz --graph qk|vv|knn-qk|knn-vv ... --out RESULT.npz` (one-line JSON on stdout).

qk/vv graphs are per image: with B > 1 images each is solved on its own and eigvals/rq gain a leading B axis.
kNN graphs join all images (intra + inter-image edges) into one solve.
"""

from __future__ import annotations

import json
import math

from spectral_jax.errors import InputError

K_INTRA = 50     # --k-intra's default (capped by an image's tokens); an explicit value above them is refused


def register(sub) -> None:
    p = sub.add_parser("solve", help="solve for layer-distributed eigenvectors of an ACTS.npz",
                       description=__doc__.splitlines()[0])
    p.add_argument("acts", metavar="ACTS.npz")
    p.add_argument("--graph", required=True, choices=("qk", "vv", "knn-qk", "knn-vv"))
    p.add_argument("--num-eigs", type=int, default=20, metavar="K")
    p.add_argument("--method", choices=("exact", "gd"), default="exact")
    p.add_argument("--preset", choices=("eigen", "paper"), default="eigen")
    p.add_argument("--param", choices=("table", "conv"), default="table", help="paper preset's parameterisation")
    p.add_argument("--tau", type=float, default=0.1, metavar="T", help="temperature of the vv graph")
    p.add_argument("--k-intra", type=int, default=None, help="kNN neighbours in the token's own image (default 50, "
                                                             "capped by its tokens)")
    p.add_argument("--k-inter", type=int, default=50, help="kNN neighbours in the other images (default 50, "
                                                          "capped by their tokens)")
    p.add_argument("--steps", type=int, default=None, metavar="N")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sample", type=float, default=None, metavar="F", help="fraction of graphs drawn per gd step")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--out", required=True, metavar="RESULT.npz", help=".npz is appended if missing; never the input")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.num_eigs < 1:
        raise InputError("--num-eigs", f"must be ≥ 1, got {args.num_eigs}", "pass e.g. --num-eigs 20")
    if not (args.tau > 0 and math.isfinite(args.tau)):
        raise InputError("--tau", f"must be a positive number, got {args.tau}", "pass e.g. --tau 0.1")
    if args.steps is not None and args.steps < 1:
        raise InputError("--steps", f"must be ≥ 1, got {args.steps}", "pass e.g. --steps 300")
    if args.sample is not None and not 0 < args.sample <= 1:
        raise InputError("--sample", f"must be in (0, 1], got {args.sample}", "pass e.g. --sample 0.25")
    if args.lr is not None and not (args.lr > 0 and math.isfinite(args.lr)):
        raise InputError("--lr", f"must be a positive number, got {args.lr}", "pass e.g. --lr 0.01, or omit it")
    from spectral_jax.cli.extract import check_seed

    check_seed(args.seed)
    if (args.k_intra or 0) < 0 or args.k_inter < 0:
        raise InputError("--k-intra/--k-inter", f"must be ≥ 0, got {args.k_intra}/{args.k_inter}",
                         "pass e.g. --k-intra 50 --k-inter 50")
    if args.method == "exact" and (args.preset != "eigen" or args.param != "table"):
        raise InputError("--preset/--param", "apply to --method gd only", "add --method gd")
    for flag, val in (("--lr", args.lr), ("--steps", args.steps), ("--sample", args.sample)):
        if args.method == "exact" and val is not None:
            raise InputError(flag, "applies to --method gd only", f"drop {flag} or add --method gd")


def run(args) -> int:
    _check_args(args)   # first: option errors are instant (no JAX import)
    from spectral_jax.acts import load_acts
    from spectral_jax.files import OutputFile, npz_path
    from spectral_jax.pipeline import solve

    args.out = npz_path(args.out)   # RESULT files end in .npz: one is appended if missing, as numpy does
    with OutputFile(args.out, inputs=[args.acts]) as out:     # reserved (and checked) before any work
        _solve(args, load_acts(args.acts), out, solve)
    return 0


def _solve(args, acts, out, solve) -> None:
    import numpy as np

    taps = acts.taps
    first = taps.layers[min(taps.layers)]
    nimg = first.q.shape[0]
    joint = args.graph.startswith("knn")
    nodes = max(t.grid[0] * t.grid[1] for t in taps.layers.values()) * (nimg if joint else 1)
    if args.num_eigs >= nodes:
        raise InputError("--num-eigs", f"K={args.num_eigs} must be smaller than the {nodes} graph nodes",
                         f"pass --num-eigs {max(1, min(20, nodes - 1))} or fewer")
    per = min(t.grid[0] * t.grid[1] for t in taps.layers.values())
    if args.k_intra is None:               # the default is capped by the tokens, as graphs.from_taps caps it
        args.k_intra = min(K_INTRA, per)
    if joint:
        # as graphs.from_taps: k_inter is capped by the other images' tokens (0 for one image)
        k_inter = min(args.k_inter, (nimg - 1) * per)
        if args.k_intra > per:
            raise InputError("--k-intra", f"{args.k_intra} exceeds the {per} tokens of an image",
                             f"pass --k-intra {per}")
        if args.k_intra + k_inter < 1:
            raise InputError("--k-intra/--k-inter", f"give the kNN graph no edges ({args.k_intra} within the image, "
                             f"{k_inter} in {nimg - 1} other images)", "pass e.g. --k-intra 10")

    res = solve(taps, args.graph, args.num_eigs, args.method, preset=args.preset, param=args.param,
                     tau=args.tau, k_intra=args.k_intra, k_inter=args.k_inter, steps=args.steps, lr=args.lr,
                     sample=args.sample, seed=args.seed, progress=args.method == "gd")
    res.info.update(graph=args.graph, model=acts.model, layers=len(taps.layers), seed=args.seed)
    if not np.all(np.isfinite(res.eigvecs)):
        raise InputError(args.acts, "the solve produced NaN/Inf", "check the activations or use --method exact")
    res.save(out)
    print(json.dumps({**res.summary(), "out": args.out}))
