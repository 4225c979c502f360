"""`method="exact"`: the whole-dataset kNN graph, built once, and its top-K eigenvectors, converged.

    features → graph → eigenvectors:
  1. the backbone runs batch by batch over the folder (`batch_size` images per forward, sharded over the mesh);
     of each batch only the merged per-layer features are kept (`graphs.knn_inputs`: heads concatenated; q and k
     for knn-qk, v for knn-vv), on the host, float32 or bfloat16 (`features_dtype`) → `[L, n·h·w, H·D]` per group;
  2. one kNN graph per layer over ALL tokens of the dataset (`graphs.knn`: `k_intra` neighbours in the token's own
     image, `k_inter` among all other images' tokens, cos ≤ `min_cos` dropped, ½(A + Aᵀ), row-normalised), searched
     blockwise (never N×N) with the rows sharded over the mesh; unreadable images and the padding to a multiple of
     the devices are masked (no edges);
  3. `solvers.exact` on it: for N > `dense_max` Σ_l w_l sym(P_l) coalesced into one sparse matrix
     (`solvers.sparse`) and its top-K by ARPACK on the CPU backend, LOBPCG on accelerators, float32, until every
     pair's relative residual is below `tol` (or `maxiter`), with the convergence report in the summary.
Several processes: process p reads and searches the images [p·n/P, (p+1)·n/P) (`process_share`), the graph is
gathered to every process, each solves it (the same deterministic solve), process 0 writes; no features cache.
Steps 1 and 2 are cached in OUT/checkpoints (features.npz, graph.npz, each with the settings that made it), so a
rerun with `resume` skips the forward and the search.

Memory: the features (L·N·H·D values) plus the graph (L·N·k indices and weights) plus the coalesced operator.

Shape legend
    n  images (padded to a multiple of the devices)    N  nodes = n·h·w    L  layers of a group    F  H·D
    K  eigenvectors    (h, w)  grid
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
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
from spectral_jax.errors import InputError
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
    process passes its own rows, `process_share`); the graph comes back whole on every process (host arrays)."""
    n = len(feats.valid)
    procs = jax.process_count()
    out = []
    for (grid, _), a, b in zip(geom.groups, feats.a, feats.b):
        k_intra, k_inter = G.clamp_k(geom.k_intra, geom.k_inter, grid, n)
        valid = feats.valid
        if procs > 1:
            shape, same = (a.shape[0], a.shape[1] * procs, a.shape[2]), b is a
            a = global_array(mesh, P(None, AXIS), a, shape)
            b = a if same else global_array(mesh, P(None, AXIS), b, shape)
            valid = global_array(mesh, P(), valid, valid.shape)
        g = G.knn(a, b, grid, n, k_intra, k_inter, settings.min_cos, settings.block, valid=valid, mesh=mesh,
                  axis=AXIS)
        if procs > 1:
            g = dataclasses.replace(g, idx=gather(g.idx), w=gather(g.w), deg=gather(g.deg))
        out.append(g)
    return out


def cache_key(kind: str, fp: dict) -> dict:
    """The fingerprint fields a cache depends on: the forward's (model, weights, layers, size, files, graph kind,
    features dtype) for features; plus k and min_cos for the graph."""
    keys = ["model", "weights", "layers", "size", "files_sha256", "num_images", "graph", "features_dtype"]
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


def load_cache(path: str, key: dict) -> dict | None:
    """The arrays of a cache file made with `key` (None when absent); another key: one `InputError`."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
        old = json.loads(str(d.pop("key")))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(path, f"is an unreadable cache ({type(e).__name__})",
                         "delete it to recompute it, or choose another --out") from None
    if old != json.loads(json.dumps(key, sort_keys=True)):
        diff = sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
        raise InputError(os.path.dirname(os.path.dirname(path)), "was made with other settings: " + ", ".join(
            f"{k} {old.get(k)!r} → {key.get(k)!r}" for k in diff[:4]),
            "resume with the same folder and settings, or choose another --out")
    return d


def features_from(d: dict, settings: Settings, groups: int) -> Features:
    def arr(x):
        return x.view(jnp.bfloat16) if settings.features_dtype == "bfloat16" else x

    a = [arr(d[f"a{g}"]) for g in range(groups)]
    b = [arr(d[f"b{g}"]) if f"b{g}" in d else a[g] for g in range(groups)]
    return Features(a, b, d["valid"], {int(i): w for i, w in json.loads(str(d["failed"])).items()})


def _failed_json(failed: dict) -> np.ndarray:
    return np.array(json.dumps({str(i): w for i, w in failed.items()}))


def save_graphs(path: str, gs: list, key: dict, valid: np.ndarray, failed: dict) -> None:
    arrays = {"key": np.array(json.dumps(key, sort_keys=True)), "valid": valid, "failed": _failed_json(failed)}
    for g, gr in enumerate(gs):
        arrays.update({f"idx{g}": np.asarray(gr.idx), f"w{g}": np.asarray(gr.w), f"deg{g}": np.asarray(gr.deg)})
    save_npz(path, arrays)


def graphs_from(d: dict, geom: Geometry, num_images: int) -> list[G.KnnGraph]:
    return [G.KnnGraph(jnp.asarray(d[f"idx{g}"]), jnp.asarray(d[f"w{g}"]), jnp.asarray(d[f"deg{g}"]), tuple(grid),
                       (len(layers),), num_images) for g, (grid, layers) in enumerate(geom.groups)]


def files_hash(files: list) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


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
    d = load_cache(gpath, gkey)
    if d is not None:
        cached.append("graph")
        gs = graphs_from(d, geom, n)
        valid, failed = d["valid"], {int(i): w for i, w in json.loads(str(d["failed"])).items()}
    else:
        t = time.perf_counter()
        one = jax.process_count() == 1       # several processes: each holds only its rows, no features cache
        fd = load_cache(fpath, fkey) if one else None
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
    res = exact(gs, settings.num_eigs, weights, maxiter=settings.maxiter, tol=settings.tol, seed=settings.seed)
    timings["solve"] = time.perf_counter() - t
    edges = int(sum(int((np.asarray(g.w) > 0).sum()) for g in gs))
    return Solved(res, valid, failed, timings, cached, edges, chosen)


def layer_weights(gs: list, geom: Geometry, weights, settings: Settings) -> tuple[list | None, dict]:
    """(per-group float32 weights for `exact`, {"rule", "weights": {layer: w}}) from `weights`: None (equal), a
    rule name (`spectral_jax.layer_weights`: "eigengap" / "select" read each layer's own top-K spectrum — one sparse
    solve per layer; on kNN graphs, one graph per layer, "select" is the layer of the largest eigengap) or
    {layer: weight} over the tapped layers (`Settings.layer_weight_map`). Numbers go through
    `layer_weights.for_groups`, as analyze's do: scaled in float64 (by the largest, then to sum 1) before the
    float32 cast, so 1e-45 or 1e308 give the same weights as 1 (`Settings` has refused non-finite, negative and
    all-zero ones before anything ran)."""
    from spectral_jax import layer_weights as LW

    group_layers = [tuple(layers) for _, layers in geom.groups]
    rule = weights if isinstance(weights, str) else ("given" if weights is not None else "uniform")
    if weights is None:
        total = sum(len(ls) for ls in group_layers)
        per = {l: 1.0 / total for ls in group_layers for l in ls}
    else:
        weights, per_layer = LW.for_groups(gs, group_layers, weights, settings.num_eigs)
        per = dict(zip(sorted({l for ls in group_layers for l in ls}), per_layer))
    return weights, {"rule": rule, "weights": {str(l): round(float(w), 6) for l, w in sorted(per.items())}}


__all__ = ["FEATURES", "Features", "GRAPH", "Solved", "build_graphs", "cache_key", "padded_images", "solve",
           "stream_features"]
