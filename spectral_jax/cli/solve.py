"""`spectral-jax solve ACTS.npz --graph qk|vv|knn-qk|knn-vv ... --out RESULT.npz` (one-line JSON on stdout).

qk/vv graphs are per image: with B > 1 images each is solved on its own and eigvals/rq gain a leading B axis.
kNN graphs join all images (intra + inter-image edges) into one solve. --layers picks some of the file's tapped
layers (default all of them), --layer-weights weighs them and --graph-dtype stores the graphs, as `analyze`'s flags
do, so an extract → solve reproduces an analyze run with them.
"""

from __future__ import annotations

import json

from spectral_jax.errors import InputError
from spectral_jax.options import GRAPH_KINDS, METHODS, PARAMS, PRESETS

def register(sub) -> None:
    p = sub.add_parser("solve", help="solve for layer-distributed eigenvectors of an ACTS.npz",
                       description=__doc__.splitlines()[0])
    p.add_argument("acts", metavar="ACTS.npz")
    p.add_argument("--graph", required=True, choices=GRAPH_KINDS)
    p.add_argument("--num-eigs", type=int, default=20, metavar="K")
    p.add_argument("--method", choices=METHODS, default="exact")
    p.add_argument("--preset", choices=PRESETS, default="eigen")
    p.add_argument("--param", choices=PARAMS, default="table", help="paper preset's parameterisation")
    p.add_argument("--tau", type=float, default=None, metavar="T", help="temperature of the vv graph (default 0.1)")
    p.add_argument("--k-intra", type=int, default=None, help="kNN graphs: neighbours in the token's own image "
                                                             "(default 50, capped by its tokens)")
    p.add_argument("--k-inter", type=int, default=None, help="kNN graphs: neighbours in the other images (default 50, "
                                                             "capped by their tokens)")
    p.add_argument("--steps", type=int, default=None, metavar="N")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--sample", type=float, default=None, metavar="F", help="fraction of graphs drawn per gd step")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--layers", default="all", help="'all' (default) or comma-separated indices of the file's tapped "
                                                   "layers; negative ones count back from the model's depth (-1: "
                                                   "its last; several: --layers=-1,-3)")
    p.add_argument("--layer-weights", default=None, metavar="W",
                   help="weight of each layer's graphs, as analyze's: comma-separated numbers (one per layer, in the "
                        "order of --layers), L:W pairs, or a rule: uniform, geometric, eigengap, select (default: "
                        "every graph equal)")
    p.add_argument("--graph-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="what the graphs store q/k, unit v and kNN features in (default float32)")
    p.add_argument("--out", required=True, metavar="RESULT.npz", help=".npz is appended if missing; never the input")
    p.set_defaults(func=run)


def _specs(args):
    """(GraphSpec, solver spec) from the flags: every option checked once, here, before JAX loads (one line naming
    the flag); options of the other method are refused, not ignored."""
    from spectral_jax.options import (DEFAULT_K, ExactSpec, GdSpec, GraphSpec, LayerWeights, as_flag,
                                      check_graph_reads, check_num_eigs, check_seed)

    check_num_eigs(args.num_eigs, what="--num-eigs")
    check_seed(args.seed, "--seed")
    if args.method == "exact" and (args.preset != "eigen" or args.param != "table"):
        raise InputError("--preset/--param", "apply to --method gd only", "add --method gd")
    for flag, val in (("--lr", args.lr), ("--steps", args.steps), ("--sample", args.sample)):
        if args.method == "exact" and val is not None:
            raise InputError(flag, "applies to --method gd only", f"drop {flag} or add --method gd")
    given = {k: v for k, v in (("tau", args.tau), ("k_intra", args.k_intra), ("k_inter", args.k_inter))
             if v is not None}
    check_graph_reads(args.graph, given, flags=True)
    args.layer_weights = LayerWeights.parse(args.layer_weights, "--layer-weights")
    try:
        graph = GraphSpec(args.graph, **{"k_intra": DEFAULT_K, "k_inter": DEFAULT_K, **given}, dtype=args.graph_dtype)
        solver = ExactSpec() if args.method == "exact" else GdSpec(
            preset=args.preset, param=args.param, steps=args.steps, lr=args.lr, sample=args.sample, progress=True)
    except InputError as e:
        raise as_flag(e) from None
    return graph, solver


def run(args) -> int:
    graph, solver = _specs(args)   # first: option errors are instant (no JAX import)
    from spectral_jax.acts import load_acts
    from spectral_jax.files import OutputFile, npz_path
    from spectral_jax.pipeline import solve

    args.out = npz_path(args.out)   # RESULT files end in .npz: one is appended if missing, as numpy does
    with OutputFile(args.out, inputs=[args.acts]) as out:     # reserved (and checked) before any work
        _solve(args, graph, solver, load_acts(args.acts), out, solve)
    return 0


def _solve(args, graph, solver, acts, out, solve) -> None:
    import dataclasses

    import numpy as np

    from spectral_jax.options import DEFAULT_K, check_num_eigs

    depth = _depth(acts.model)
    taps = _layers(acts.taps, args.layers, depth)
    lw = None if args.layer_weights is None else args.layer_weights.bound(_order(args.layers, taps, depth),
                                                                          "--layer-weights")
    first = taps.layers[min(taps.layers)]
    nimg = first.q.shape[0]
    nodes = max(t.grid[0] * t.grid[1] for t in taps.layers.values()) * (nimg if graph.joint else 1)
    check_num_eigs(args.num_eigs, nodes, "--num-eigs")
    # the finest tapped grid's tokens: graphs.from_taps caps k by each layer group's own grid, so a given k must
    # fit the finest one only (a coarse grid's few tokens must not cap the finer ones' graphs)
    per = max(t.grid[0] * t.grid[1] for t in taps.layers.values())
    if args.k_intra is None and graph.joint:     # the default is capped by the tokens, as graphs.from_taps caps it
        graph = dataclasses.replace(graph, k_intra=min(DEFAULT_K, per))     # (only kNN graphs read it)
    if graph.joint:
        # as graphs.from_taps: k_inter is capped by the other images' tokens (0 for one image)
        k_inter = min(graph.k_inter, (nimg - 1) * per)
        if graph.k_intra > per:
            raise InputError("--k-intra", f"{graph.k_intra} exceeds the {per} tokens of an image on the finest "
                             "tapped grid", f"pass --k-intra {per}")
        if graph.k_intra + k_inter < 1:
            raise InputError("--k-intra/--k-inter", f"give the kNN graph no edges ({graph.k_intra} within the "
                             f"image, {k_inter} in {nimg - 1} other images)", "pass e.g. --k-intra 10")

    res = solve(taps, graph, args.num_eigs, solver=solver, seed=args.seed, layer_weights=lw)
    res = dataclasses.replace(res, info={**res.info, "graph": args.graph, "model": acts.model,
                                         "layers": sorted(taps.layers)})
    if not np.all(np.isfinite(res.eigvecs)):
        raise InputError(args.acts, "the solve produced NaN/Inf", "check the activations" + (
            " or use --method exact" if args.method != "exact" else ""))
    res.save(out)
    print(json.dumps({**res.summary(), "out": args.out}))


def _depth(model: str) -> int | None:
    """The layer count of the file's model where the registry knows it (what a negative --layers index counts
    back from, as for extract and analyze), else None."""
    from spectral_jax import models

    try:
        return int(models.get_spec(model).config.num_layers)
    except InputError:                          # not registered (a synthetic model's file)
        return None


def _order(layers: str, taps, depth: int | None = None) -> list[int]:
    """The chosen layers in the order --layers names them (ascending for "all"): what numbers in --layer-weights
    pair with. A negative index counts back from the model's `depth` (-1: its last layer), as extract's --layers
    does; with no depth known it stays negative (and names no layer the file holds)."""
    if str(layers).strip().lower() == "all":
        return sorted(taps.layers)
    wrap = lambda i: i + depth if depth is not None and -depth <= i < 0 else i
    return [wrap(int(s)) for s in str(layers).split(",") if s.strip()]


def _layers(taps, layers: str, depth: int | None = None):
    """`taps` with only the layers --layers names ("all": every one; negative: from the model's `depth`), each of
    which the file must hold: one line naming the layers it does hold otherwise."""
    import dataclasses

    if str(layers).strip().lower() == "all":
        return taps
    held = sorted(taps.layers)
    try:
        chosen = _order(layers, taps, depth)
    except ValueError:
        raise InputError(f"--layers {layers}", "is not 'all' or comma-separated layer indices",
                         f"pass e.g. --layers {','.join(map(str, held[-2:]))}") from None
    twice = sorted({i for i in chosen if chosen.count(i) > 1})
    if twice:
        raise InputError(f"--layers {layers}", f"names layer(s) {', '.join(map(str, twice))} more than once"
                         + (f" (a negative index counts back from the model's {depth} layers)" if depth else ""),
                         "name each layer once")
    missing = [i for i in chosen if i not in taps.layers]
    if not chosen or missing:
        raise InputError(f"--layers {layers}", (f"names layer(s) {', '.join(map(str, missing))} the file does not "
                         "hold" if missing else "names no layer"),
                         f"choose among its tapped layers {', '.join(map(str, held))} (or extract them)")
    keep = set(chosen)
    return dataclasses.replace(taps, layers={i: t for i, t in taps.layers.items() if i in keep},
                               hidden={i: h for i, h in taps.hidden.items() if i in keep})
