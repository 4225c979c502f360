"""`method="exact"`: the whole-dataset kNN graph, built once, and its top-K eigenvectors, converged.

    features → graph → eigenvectors:
  1. the backbone runs batch by batch over the folder (`batch_size` images per forward, sharded over the mesh);
     of each batch only the merged per-layer features are kept (`graphs.knn_inputs`: heads concatenated; q and k
     for knn-qk, v for knn-vv), on the host, float32 or bfloat16 (`features_dtype`) → `[L, n·h·w, H·D]` per group
     (diffusion taps: `[L, n·h·w, T·H·D]`, the T timesteps' heads side by side);
  2. one kNN graph per layer — per (layer, timestep) for diffusion taps, each timestep's heads on their own
     (`graphs.split_timesteps`), a group `[L, T]` — over ALL tokens of the dataset (`graphs.knn`: `k_intra` neighbours in the token's own
     image, `k_inter` among all other images' tokens, cos ≤ `min_cos` dropped, ½(A + Aᵀ), row-normalised), searched
     blockwise (never N×N) with the rows sharded over the mesh; unreadable images and the padding to a multiple of
     the devices are masked (no edges);
  3. `solvers.exact` on it: for N > `dense_max` Σ_l w_l sym(P_l) coalesced into one sparse matrix
     (`solvers.sparse`) and its top-K by ARPACK on the CPU backend, LOBPCG on accelerators, float32, until every
     pair's relative residual is below `tol` (or `maxiter`), with the convergence report in the summary.
Several processes: process p reads and searches the images [p·n/P, (p+1)·n/P) (`process_share`), the graph is
gathered to every process, each solves it (the same deterministic solve), process 0 writes; no features cache.
Steps 1 and 2 are cached in OUT/checkpoints (features.npz, graph.npz, each with the settings and the image files'
content digests that made it, `cache_key`), so a rerun with `resume` skips the forward and the search; a cache made
from other images or settings is refused in one line (`checkpoint.check_same`), and one whose arrays are damaged —
unreadable, of the wrong shape or dtype, non-finite, neighbour indices out of range — too (`load_cache`), never used.

Memory: the features (L·N·H·D values) plus the graph (L·N·k indices and weights) plus the coalesced operator.

Shape legend
    n  images (padded to a multiple of the devices)    N  nodes = n·h·w    L  layers of a group    F  H·D
    K  eigenvectors    (h, w)  grid
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import zipfile
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax import folder as F
from spectral_jax import graphs as G
from spectral_jax.dataset.layout import (AXIS, Geometry, gather, gather_reasons, global_array,
                                         nonfinite_reason, tapped)
from spectral_jax.dataset.settings import Settings
from spectral_jax.files import save_npz

FEATURES, GRAPH = "features.npz", "graph.npz"


class Features(NamedTuple):
    """Per layer group: a, b `[L, N, F]` (b is a for knn-vv); valid `[n]`; failed {image: why unreadable}."""

    a: list
    b: list
    valid: np.ndarray
    failed: dict


def padded_images(num_images: int, devices: int) -> int:
    """Images rounded up to a multiple of the devices (the mesh splits the graph's rows by image)."""
    return -(-num_images // devices) * devices


def process_share(n: int) -> tuple[int, int]:
    """(first image, images) of this process: the mesh is process-major and splits the graph's rows by image, so
    process p holds images [p·n/P, (p+1)·n/P) (n padded to a multiple of the devices, hence of the processes)."""
    per = n // jax.process_count()
    return jax.process_index() * per, per


def stream_features(backbone, layers, settings: Settings, geom: Geometry, root: str, files: list, mesh: Mesh,
                    bar=None) -> Features:
    """Run the backbone over this process's share of `files` (`process_share`), batch by batch (each process
    `batch_size`/P images of a batch), and keep only the merged features of each layer group, on the host:
    a, b `[L, (n/P)·h·w, F]` (this process's rows); valid `[n]` all processes' (gathered); failed {image: why}
    all processes' (gathered).

    The taps are checked where they arrive (`layout.tapped`): a wrong shape is refused while tracing (one
    `InputError`); an image whose taps hold NaN or Inf — found inside the jitted forward, one int per image beside
    the features — is not valid, its features are zeros, and `failed` says why (the first such layer)."""
    procs = jax.process_count()
    n = padded_images(len(files), geom.devices)
    first, share = process_share(n)
    b_loc = settings.batch_size // procs
    dtype = jnp.bfloat16 if settings.features_dtype == "bfloat16" else jnp.float32
    pre, per = backbone.preprocess, [grid[0] * grid[1] for grid, _ in geom.groups]
    rows = NamedSharding(mesh, P(AXIS))
    feat_rows = NamedSharding(mesh, P(None, AXIS))
    what = f"backbone {backbone.name!r}"

    @functools.partial(jax.jit, out_shardings=(feat_rows, rows))
    def forward(params, x):
        taps, nonfinite = tapped(backbone.apply, params, x, layers, what)
        out = []
        for (grid, group), p in zip(geom.groups, per):
            keep = jnp.repeat(nonfinite < 0, p)[None, :, None]          # [1, B·h·w, 1]: a NaN image's rows → 0
            a, bb = (jnp.where(keep, y, 0).astype(dtype)
                     for y in G.knn_inputs([taps.layers[i] for i in group], settings.graph))
            out.append((a, None if settings.graph == "knn-vv" else bb))
        return out, nonfinite

    params = backbone.params if procs == 1 else jax.tree.map(
        lambda x: global_array(mesh, P(), np.asarray(x), np.shape(x)), backbone.params)
    a = [None] * len(geom.groups)
    bs = [None] * len(geom.groups)
    valid, failed = np.zeros(share, bool), {}

    def produce(start):
        idx = first + np.arange(start, start + b_loc)
        idx = np.where((idx < len(files)) & (idx < first + share), idx, -1)
        return (idx,) + F.read_slots(root, files, idx, geom.size, pre)

    with F.Prefetcher(produce, range(0, share, b_loc), depth=settings.prefetch) as batches:
        for start, (idx, x, ok, bad) in batches:
            failed.update(bad)
            x = jax.device_put(x, rows) if procs == 1 else global_array(mesh, P(AXIS), x,
                                                                           (settings.batch_size, *x.shape[1:]))
            outs, nonfinite = forward(params, x)
            nonfinite = _local_rows(nonfinite, axis=0)                     # [B/P] this process's slots
            for i, layer in zip(idx, nonfinite):
                if i >= 0 and layer >= 0 and i not in bad:
                    failed[int(i)] = nonfinite_reason(backbone.name, int(layer))
            real = idx >= 0
            valid[idx[real] - first] = ok[real] & (nonfinite[real] < 0)
            m = int(real.sum())
            for g, pair in enumerate(outs):
                fa, fb = (None if y is None else _local_rows(y) for y in pair)
                if a[g] is None:
                    a[g] = np.zeros((fa.shape[0], share * per[g], fa.shape[2]), fa.dtype)
                    bs[g] = None if fb is None else np.zeros_like(a[g])
                sl = slice(start * per[g], (start + m) * per[g])
                a[g][:, sl] = fa[:, :m * per[g]]
                if fb is not None:
                    bs[g][:, sl] = fb[:, :m * per[g]]
            if bar is not None:
                bar.update(m)
    if procs > 1:
        from jax.experimental import multihost_utils

        valid = np.asarray(multihost_utils.process_allgather(valid, tiled=True))
        failed = gather_reasons(failed)
    return Features(a, [x if y is None else y for x, y in zip(a, bs)], valid, failed)


def _local_rows(x: jax.Array, axis: int = 1) -> np.ndarray:
    """This process's rows of `x` sharded over `axis` (`[L, R, F]`: axis 1; `[R]`: axis 0), in order, as one host
    array."""
    shards = sorted({s.index[axis].start or 0: s for s in x.addressable_shards}.items())
    return np.concatenate([np.asarray(s.data) for _, s in shards], axis=axis)


def build_graphs(feats: Features, settings: Settings, geom: Geometry, mesh: Mesh) -> list[G.KnnGraph]:
    """One `graphs.knn` group per layer group over all tokens of the dataset, rows sharded over `mesh` (each
    process passes its own rows, `process_share`); the graph comes back whole on every process (host arrays).
    Diffusion taps (`geom.steps` T): the merged features `[L, N, T·F]` are cut into the timesteps' own
    (`graphs.split_timesteps`) and each (layer, timestep) gets its own graph: a group `[L, T]`."""
    n = len(feats.valid)
    procs = jax.process_count()
    out = []
    for (grid, _), a, b in zip(geom.groups, feats.a, feats.b):
        k_intra, k_inter = G.clamp_k(geom.k_intra, geom.k_inter, grid, n)
        valid, same = feats.valid, b is a
        if geom.steps is not None:                   # [L, N, T·F] → [L, T, N, F]: one graph per (layer, timestep)
            a = G.split_timesteps(a, geom.steps)
            b = a if same else G.split_timesteps(b, geom.steps)
        if procs > 1:
            shape = (*a.shape[:-2], a.shape[-2] * procs, a.shape[-1])
            rows = P(*([None] * (a.ndim - 2)), AXIS)
            a = global_array(mesh, rows, a, shape)
            b = a if same else global_array(mesh, rows, b, shape)
            valid = global_array(mesh, P(), valid, valid.shape)
        g = G.knn(a, b, grid, n, k_intra, k_inter, settings.min_cos, settings.block, valid=valid, mesh=mesh,
                  axis=AXIS)
        if procs > 1:
            g = dataclasses.replace(g, idx=gather(g.idx), w=gather(g.w), deg=gather(g.deg))
        out.append(g)
    return out


def cache_key(kind: str, fp: dict) -> dict:
    """The fingerprint fields a cache depends on: the forward's (model, weights, layers, size, the image files and
    their content digests, graph kind, features dtype, and a diffusion model's load options, timesteps and noise
    seed) for features; plus k and min_cos for the graph."""
    keys = ["model", "weights", "layers", "size", "files", "num_images", "graph", "features_dtype"]
    if fp.get("timesteps"):
        keys += ["model_options", "timesteps", "seed"]
    if kind == "graph":
        keys += ["k_intra_effective", "k_inter_effective", "min_cos", "block"]
    return {k: fp.get(k) for k in keys}


def _bf16_save(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16) if x.dtype == jnp.bfloat16 else x


def save_features(path: str, feats: Features, key: dict) -> None:
    arrays = {"key": np.array(json.dumps(key, sort_keys=True)), "valid": feats.valid,
              "failed": _failed_json(feats.failed)}
    for g, (a, b) in enumerate(zip(feats.a, feats.b)):
        arrays[f"a{g}"] = _bf16_save(a)
        if b is not a:
            arrays[f"b{g}"] = _bf16_save(b)
    save_npz(path, arrays)


def load_cache(path: str, key: dict, geom: Geometry) -> dict | None:
    """The arrays of a cache file made with `key` (None when absent), checked against the run (`geom`, `key`):
    "failed" parsed to {image: why}. Made with another key: one `InputError` naming what changed
    (`checkpoint.check_same`); unreadable or damaged (`_cache_problem`): one `InputError` naming the file."""
    from spectral_jax.dataset import checkpoint

    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
        old = json.loads(str(d.pop("key")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise checkpoint.damaged(path, f"unreadable: {type(e).__name__}") from None
    if not isinstance(old, dict):
        raise checkpoint.damaged(path, "its key is not an object")
    checkpoint.check_same(os.path.dirname(os.path.dirname(path)), old, json.loads(json.dumps(key, sort_keys=True)))
    why = _cache_problem(d, key, geom)
    if why:
        raise checkpoint.damaged(path, why)
    return d


def _cache_problem(d: dict, key: dict, geom: Geometry) -> str | None:
    """What is wrong with the arrays `d` of a cache made with `key` for a run of geometry `geom` (None: nothing).
    Both: valid `[n]` bool (False past the images, some True), failed {image < images: why} on invalid images.
    Features: a{g} (and b{g} unless knn-vv) `[L_g, n·h·w, F]` float32 or bfloat16 bits, finite. Graph: idx{g}
    `[L_g, n·h·w, k]` integers in [0, n·h·w), w{g} finite with 0 or (min_cos, 1], 0 on invalid images' rows,
    deg{g} `[L_g, n·h·w]` the row sums of ½(A + Aᵀ). Modifies `d`: "failed" becomes a dict."""
    images = key["num_images"]
    n = padded_images(images, geom.devices)
    valid = d.get("valid")
    if not isinstance(valid, np.ndarray) or valid.dtype != bool or valid.shape != (n,):
        return f"valid is not {n} booleans"
    if valid[images:].any() or not valid.any():
        return "valid marks no image, or padding as an image"
    try:
        failed = {int(i): w for i, w in json.loads(str(d.get("failed", ""))).items()}
    except (ValueError, TypeError, AttributeError):
        return "failed is not a JSON object of image: reason"
    if not all(0 <= i < images and not valid[i] and isinstance(w, str) for i, w in failed.items()):
        return "failed names images out of range or read"
    d["failed"] = failed
    graph = "k_intra_effective" in key
    for g, (grid, layers) in enumerate(geom.groups):
        rows, shape = n * grid[0] * grid[1], (len(layers), n * grid[0] * grid[1])
        if not graph:
            want = np.uint16 if key["features_dtype"] == "bfloat16" else np.float32
            names = [f"a{g}"] + ([f"b{g}"] if key["graph"] != "knn-vv" or f"b{g}" in d else [])
            for name in names:
                x = d.get(name)
                if not isinstance(x, np.ndarray) or x.dtype != want or x.ndim != 3 or x.shape[:2] != shape or \
                        x.shape[2] < 1 or x.shape != d[names[0]].shape:
                    return f"{name} is not {want.__name__} [{shape[0]}, {shape[1]}, F]"
                if not _finite(x):
                    return f"{name} holds NaN or infinite values"
            continue
        shape = (len(layers) * geom.graphs_per_layer, shape[1])        # graphs stored [L·T, …]
        k_intra, k_inter = G.clamp_k(key["k_intra_effective"], key["k_inter_effective"], grid, n)
        idx, w, deg = (d.get(f"{x}{g}") for x in ("idx", "w", "deg"))
        full = (*shape, k_intra + k_inter)
        if not isinstance(idx, np.ndarray) or not np.issubdtype(idx.dtype, np.integer) or idx.shape != full:
            return f"idx{g} is not integers {list(full)}"
        if idx.size and (idx.min() < 0 or idx.max() >= rows):
            return f"idx{g} holds neighbours outside [0, {rows})"
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.shape != full:
            return f"w{g} is not float32 {list(full)}"
        if not isinstance(deg, np.ndarray) or deg.dtype != np.float32 or deg.shape != shape:
            return f"deg{g} is not float32 {list(shape)}"
        if not _finite(w) or not ((w == 0) | ((w > key["min_cos"]) & (w <= 1 + 1e-5))).all():
            return f"w{g} holds weights that are not 0 or cosines above min_cos"
        if w.reshape(shape[0], n, -1)[:, ~valid].any():
            return f"w{g} gives edges to unreadable images"
        for layer in range(shape[0]):
            sums = 0.5 * (w[layer].sum(-1, dtype=np.float64) + np.bincount(
                idx[layer].ravel(), w[layer].ravel().astype(np.float64), minlength=rows))
            if not np.allclose(deg[layer], sums, rtol=1e-4, atol=1e-5):
                return f"deg{g} is not the degree of idx{g}, w{g}"
    return None


def _finite(x: np.ndarray, chunk: int = 1 << 24) -> bool:
    """All values finite (bfloat16 stored as uint16 bits: exponent not all ones), checked in slices of `chunk`
    values (no copy of the whole array)."""
    flat = x.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        if not (((part & 0x7F80) != 0x7F80).all() if part.dtype == np.uint16 else np.isfinite(part).all()):
            return False
    return True


def features_from(d: dict, settings: Settings, groups: int) -> Features:
    """`Features` from the arrays of a features cache (as `load_cache` gives them: checked, "failed" a dict)."""
    def arr(x):
        return x.view(jnp.bfloat16) if settings.features_dtype == "bfloat16" else x

    a = [arr(d[f"a{g}"]) for g in range(groups)]
    b = [arr(d[f"b{g}"]) if f"b{g}" in d else a[g] for g in range(groups)]
    return Features(a, b, d["valid"], d["failed"])


def _failed_json(failed: dict) -> np.ndarray:
    return np.array(json.dumps({str(i): w for i, w in failed.items()}))


def save_graphs(path: str, gs: list, key: dict, valid: np.ndarray, failed: dict) -> None:
    arrays = {"key": np.array(json.dumps(key, sort_keys=True)), "valid": valid, "failed": _failed_json(failed)}
    for g, gr in enumerate(gs):
        flat = lambda x, tail: np.asarray(x).reshape(-1, *x.shape[x.ndim - tail:])      # [L(·T), N(, k)]
        arrays.update({f"idx{g}": flat(gr.idx, 2), f"w{g}": flat(gr.w, 2), f"deg{g}": flat(gr.deg, 1)})
    save_npz(path, arrays)


def graphs_from(d: dict, geom: Geometry, num_images: int) -> list[G.KnnGraph]:
    """The graph groups of a graph cache (as `load_cache` gives it: checked; stored `[L·T, …]`, back to the
    groups' `[L, T]` with timesteps); num_images: padded."""
    def one(g, grid, layers):
        shape = geom.graph_shape(layers)
        idx, w, deg = (jnp.asarray(d[f"{x}{g}"]) for x in ("idx", "w", "deg"))
        return G.KnnGraph(idx.reshape(*shape, *idx.shape[1:]), w.reshape(*shape, *w.shape[1:]),
                          deg.reshape(*shape, *deg.shape[1:]), tuple(grid), shape, num_images)

    return [one(g, grid, layers) for g, (grid, layers) in enumerate(geom.groups)]


class Solved(NamedTuple):
    """What `solve` leaves for the export."""

    result: object          # `solvers.Result` over the padded images
    valid: np.ndarray       # [n] bool
    failed: dict
    timings: dict           # seconds: forward, graph, solve (0 for a cached stage)
    cached: list            # the stages read from OUT/checkpoints
    edges: int              # stored kNN edges (weight > 0), all layers
    layer_weights: dict | None = None   # {"rule", "weights": {layer: w}} the solve used (weights sum to 1)


def solve(backbone, layers, settings: Settings, geom: Geometry, root: str, files: list, ckdir: str, fp: dict,
          mesh: Mesh, weights, bar=None) -> Solved:
    """Features (cached), graph (cached), exact eigenvectors: see the module docstring."""
    from spectral_jax.solvers.exact import exact

    timings, cached = {"forward": 0.0, "graph": 0.0, "solve": 0.0}, []
    gpath, fpath = os.path.join(ckdir, GRAPH), os.path.join(ckdir, FEATURES)
    n = padded_images(len(files), geom.devices)
    gkey, fkey = cache_key("graph", fp), cache_key("features", fp)
    d = load_cache(gpath, gkey, geom)
    if d is not None:
        cached.append("graph")
        gs = graphs_from(d, geom, n)
        valid, failed = d["valid"], d["failed"]
    else:
        t = time.perf_counter()
        one = jax.process_count() == 1       # several processes: each holds only its rows, no features cache
        fd = load_cache(fpath, fkey, geom) if one else None
        if fd is not None:
            cached.append("features")
            feats = features_from(fd, settings, len(geom.groups))
        else:
            feats = stream_features(backbone, layers, settings, geom, root, files, mesh, bar)
            if feats.valid.any() and one:
                os.makedirs(ckdir, exist_ok=True)
                save_features(fpath, feats, fkey)
        timings["forward"] = time.perf_counter() - t
        valid, failed = feats.valid, feats.failed
        if not valid.any():
            return Solved(None, valid, failed, timings, cached, 0)
        t = time.perf_counter()
        gs = jax.block_until_ready(build_graphs(feats, settings, geom, mesh))
        del feats
        if jax.process_index() == 0:
            os.makedirs(ckdir, exist_ok=True)
            save_graphs(gpath, gs, gkey, valid, failed)
        timings["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    weights, chosen = layer_weights(gs, geom, weights, settings)
    from spectral_jax.layer_weights import base_grid

    base = None if weights is None else base_grid(gs, weights)    # the finest grid with weight (a rule may pick
    res = exact(gs, settings.num_eigs, weights, base, maxiter=settings.maxiter, tol=settings.tol,   # a coarse one)
                seed=settings.seed)
    timings["solve"] = time.perf_counter() - t
    edges = int(sum(int((np.asarray(g.w) > 0).sum()) for g in gs))
    return Solved(res, valid, failed, timings, cached, edges, chosen)


def layer_weights(gs: list, geom: Geometry, weights, settings: Settings) -> tuple[list | None, dict]:
    """(per-group float32 weights for `exact`, {"rule", "weights": {layer: w}}) from `weights`, an
    `options.LayerWeights` (bound to the tapped layers by `dataset.run`) or None (equal): resolved against the
    tapped layers as analyze's are (`LayerWeights.resolve`: a layer a mapping does not name weighs 0; numbers
    scaled in float64, by the largest then to sum 1, before the float32 cast, so 1e-45 or 1e308 give the same
    weights as 1); a rule ("eigengap" / "select") reads each layer's own top-K spectrum
    (`solvers.exact.layer_spectra`: one sparse solve per layer, over its timesteps' graphs for diffusion taps);
    "select" is the layer of the largest eigengap (no head-agreement term: a layer's whole-dataset graphs are never
    made dense)."""
    import functools

    from spectral_jax import layer_weights as LW
    from spectral_jax.solvers.exact import layer_spectra

    group_layers = [tuple(layers) for _, layers in geom.groups]
    if weights is None:
        rule = "uniform"
        total = sum(len(ls) for ls in group_layers)
        per = {l: 1.0 / total for ls in group_layers for l in ls}
    else:
        layers = sorted({l for ls in group_layers for l in ls})
        resolved = weights.resolve(layers, what="--layer-weights")
        rule = resolved if isinstance(resolved, str) else "given"
        weights, per_layer = LW.for_groups(gs, group_layers, resolved, settings.num_eigs, spectra=functools.partial(
            layer_spectra, gs, group_layers, settings.num_eigs), agreement=np.ones(len(layers)))
        per = dict(zip(layers, per_layer))
    return weights, {"rule": rule, "weights": {str(l): round(float(w), 6) for l, w in sorted(per.items())}}


__all__ = ["FEATURES", "Features", "GRAPH", "Solved", "build_graphs", "cache_key", "padded_images", "solve",
           "stream_features"]
