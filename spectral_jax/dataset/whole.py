"""`method="exact"`: the whole-dataset kNN graph, built once, and its top-K eigenvectors, converged.

    features → graph → eigenvectors:
  1. the backbone runs batch by batch over the folder (`batch_size` images per forward, sharded over the mesh);
     of each batch only the merged per-layer features are kept (`graphs.knn_inputs`: heads concatenated; q and k
     for knn-qk, v for knn-vv), float32 or bfloat16 (`features_dtype`) → `[L, m·h·w, H·D]` per group (diffusion
     taps: `[L, m·h·w, T·H·D]`, the T timesteps' heads side by side), written at once to a shard of the on-disk
     feature store (`store`: OUT/checkpoints/features, atomic per shard);
  2. one kNN graph per layer — per (layer, timestep) for diffusion taps, each timestep's heads on their own
     (`graphs.split_timesteps`), a group `[L, T]` — over ALL tokens of the dataset (`graphs.knn`'s definition:
     `k_intra` neighbours in the token's own image, `k_inter` among all other images' tokens, cos ≤ `min_cos`
     dropped, ½(A + Aᵀ), row-normalised), searched in tiles read memory-mapped from the store (`search_store`: never
     N×N, never all features in memory); unreadable images and the padding to a multiple of the devices are masked
     (no edges). The kept edges' weights (`settings.edge_weights`): the cosine (the paper's recipe) or an RBF of the distance,
     exp(−d²/2σ²) with σ per graph the median distance of `graphs.SIGMA_PAIRS` token pairs drawn with the seed
     (`store_sigma`, `graphs.weight_edges`), recorded with the graph. The inter-image search (`settings.search`,
     `make_graphs`): the store's tiled exact search, or an approximate index (`knn_search`: ivf / faiss by name,
     "auto" from `knn_search.AUTO_MIN_COLUMNS` tokens) over one graph's features read into memory, its recall
     measured on a seeded sample of rows and reported (summary.json, one stderr line);
  3. `solvers.exact` on it: for N > `dense_max` Σ_l w_l sym(P_l) coalesced into one sparse matrix
     (`solvers.sparse`) and its top-K by ARPACK on the CPU backend, LOBPCG on accelerators, float32, until every
     pair's relative residual is below `tol` (or `maxiter`), with the convergence report in the summary.
Several processes: process p reads its images [p·n/P, (p+1)·n/P) (`process_share`) and writes their shards. Then
(`solver_path`) either the sharded path (`solve_sharded`, the default with several processes when every layer
group shares one grid and there are no timesteps): each group's graph is searched from each process's shards in
tiles (`search_sharded`: `distributed.knn_tiled`, key tiles passed round the mesh; with --search auto from
`knn_search.AUTO_MIN_COLUMNS` tokens, or ivf, each device's IVF index over its own keys instead, `sharded_search`)
and stays sharded by rows —
never gathered; each process caches its own rows (OUT/checkpoints/graph-rows, `GRAPH_ROWS`) —, and
`distributed.lobpcg` solves Σ w sym(P) as a collective over the mesh, only the N·K eigenvectors gathered (`distributed.to_result`); or the gathered path (several
grids, diffusion groups `[L, T]`, RBF edges, an approximate search, or asked for): the graph is searched sharded
from each process's rows held in memory (`build_graphs`; an approximate search: each process gathers all rows of
its share of a layer group's graphs, searches them and broadcasts them), gathered to every process, each solves it
(the same deterministic solve).
Process 0 writes.
Resume: the store's finished shards are read back (checked, `store.read_shard`) and only the batches without one
are computed; the search keeps each finished layer's edges as a part (OUT/checkpoints/graph-parts, one per layer,
or per layer and process on the sharded path, named with the process count; removed once the whole graph or the
process's rows are kept, and with them the parts a search by another process count or path left unfinished, which
no run of this layout reads: `store.release_parts`), so a stopped search resumes at its first missing layer; the
graph is cached in OUT/checkpoints/graph.npz (with the settings and the image files' content digests that made it,
`cache_key`). A shard, part or graph made from other images or settings is refused in one line
(`checkpoint.check_same`; one made with other graph settings only says which cache to delete to keep the features),
and one whose arrays are damaged — unreadable, changed since written, of the wrong shape or dtype, non-finite,
neighbour indices out of range — too (`store.read_shard`, `store.read_part`, `load_cache`), never used.

Memory (`memory.estimate`): the features live on disk (one process, and the sharded path: tiles in memory at a
time — its ring IVF: each device's own block and its index; the gathered path with several processes: each
process's own rows); the graph
(L·N·k indices and weights per group) and the coalesced operator and the solver's vectors must fit in memory.

Shape legend
    n  images (padded to a multiple of the devices)    N  nodes = n·h·w    L  layers of a group    F  H·D
    K  eigenvectors    (h, w)  grid
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
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
from spectral_jax.dataset import store
from spectral_jax.dataset.store import finite
from spectral_jax.errors import InputError
from spectral_jax.files import save_npz

GRAPH = "graph.npz"
GRAPH_ROWS = "graph-rows"       # the sharded path's graph cache: a folder, one file per process (its rows)


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


_LAST_FORWARD: list = []     # [(apply, layers, settings, geom, mesh), forward]: the last `_forward` made


def _forward(backbone, layers, settings: Settings, geom: Geometry, mesh: Mesh):
    """The jitted forward of a batch x `[B, H, W, 3]` → (per group (a, b or None) `[L, B·h·w, F]` in the features
    dtype, rows sharded over `mesh`, a NaN image's rows 0; nonfinite `[B]`, `layout.tapped`). The same function
    for the same backbone apply and settings as the last call, so that the program `memory.forward_bytes`
    compiled before the run is the one the run calls (compiled once)."""
    key = (backbone.apply, backbone.name, layers, settings, geom, mesh)
    if _LAST_FORWARD and len(_LAST_FORWARD[0]) == len(key) and all(
            a is b or a == b for a, b in zip(_LAST_FORWARD[0], key)):
        return _LAST_FORWARD[1]
    dtype = jnp.bfloat16 if settings.features_dtype == "bfloat16" else jnp.float32
    per = [grid[0] * grid[1] for grid, _ in geom.groups]
    what, apply = f"backbone {backbone.name!r}", backbone.apply

    @functools.partial(jax.jit, out_shardings=(NamedSharding(mesh, P(None, AXIS)), NamedSharding(mesh, P(AXIS))))
    def forward(params, x):
        taps, nonfinite = tapped(apply, params, x, layers, what)
        out = []
        for (grid, group), p in zip(geom.groups, per):
            keep = jnp.repeat(nonfinite < 0, p)[None, :, None]          # [1, B·h·w, 1]: a NaN image's rows → 0
            a, bb = (jnp.where(keep, y, 0).astype(dtype)
                     for y in G.knn_inputs([taps.layers[i] for i in group], settings.graph))
            out.append((a, None if settings.graph == "knn-vv" else bb))
        return out, nonfinite

    _LAST_FORWARD[:] = [key, forward]
    return forward


def forward_args(backbone, settings: Settings, geom: Geometry, mesh: Mesh) -> tuple:
    """(params, x): the abstract arguments of the run's jitted forward (`_forward`) for one batch — x
    `[batch_size, H, W, 3]` float32 with its rows sharded over `mesh`, the params as `stream_features` passes them
    (replicated over processes) — the same in `feature_widths` and `memory.forward_bytes`, so that JAX traces the
    forward once for both (and the run's first batch reuses that trace)."""
    x = jax.ShapeDtypeStruct((settings.batch_size, *geom.size, 3), jnp.float32,
                             sharding=NamedSharding(mesh, P(AXIS)))
    params = backbone.params if jax.process_count() == 1 else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P())), backbone.params)
    return params, x


def feature_widths(backbone, layers, settings: Settings, geom: Geometry, mesh: Mesh) -> list[int]:
    """F of each layer group's merged features, from the forward traced abstractly (`jax.eval_shape`: nothing
    computed)."""
    outs, _ = jax.eval_shape(_forward(backbone, layers, settings, geom, mesh),
                             *forward_args(backbone, settings, geom, mesh))
    return [int(a.shape[-1]) for a, _ in outs]


def _arrays(settings: Settings, geom: Geometry, widths=None):
    """{array name: rows per image} of a shard (a{g}, and b{g} for knn-qk), or with `widths` a function of the
    shard's images m → {name: (stored dtype name, [L_g, m·h·w, F_g])} (`store.read_shard`'s `expect`)."""
    per = {}
    for g, (grid, group) in enumerate(geom.groups):
        for x in ("a", "b") if settings.graph != "knn-vv" else ("a",):
            per[f"{x}{g}"] = (g, grid[0] * grid[1], len(group))
    if widths is None:
        return {name: p for name, (_, p, _) in per.items()}
    dtype = "uint16" if settings.features_dtype == "bfloat16" else "float32"
    return lambda m: {name: (dtype, (layers, m * p, widths[g])) for name, (g, p, layers) in per.items()}


def stream_features(backbone, layers, settings: Settings, geom: Geometry, root: str, files: list, mesh: Mesh,
                    ckdir: str, key: dict, out: str, bar=None) -> "Streamed":
    """Run the backbone over this process's share of `files` (`process_share`), batch by batch (each process
    `batch_size`/P images of a batch), and write each batch's merged features of each layer group to a shard of
    the on-disk store as soon as it is computed (`store.write_shard`: a{g}, b{g} `[L, m·h·w, F]`, valid, failed;
    keyed by `key`). Batches that already have a finished shard (a resumed run's) are read back instead
    (`store.read_shard`: checked, a damaged or foreign shard is one `InputError`) and not recomputed. Returns
    (the `store.FeatureStore` of this process's images, with `valid` `[n]` and `failed` gathered over all
    processes, the images read from the store — all processes') as a `Streamed`.

    The taps are checked where they arrive (`layout.tapped`): a wrong shape is refused while tracing (one
    `InputError`); an image whose taps hold NaN or Inf — found inside the jitted forward, one int per image beside
    the features — is not valid, its features are zeros, and `failed` says why (the first such layer)."""
    procs, me = jax.process_count(), jax.process_index()
    n = padded_images(len(files), geom.devices)
    first, share = process_share(n)
    b_loc = settings.batch_size // procs
    pre, per = backbone.preprocess, [grid[0] * grid[1] for grid, _ in geom.groups]
    rows = NamedSharding(mesh, P(AXIS))
    forward = _forward(backbone, layers, settings, geom, mesh)
    expect = _arrays(settings, geom, feature_widths(backbone, layers, settings, geom, mesh))
    real = {s: max(0, min(b_loc, len(files) - first - s, share - s)) for s in range(0, share, b_loc)}
    store.remove_unfinished(ckdir, me)
    names, done = store.plan(ckdir, [(first + s, first + s + real[s]) for s in range(0, share, b_loc)])
    shards = [store.read_shard(os.path.join(store.folder(ckdir), name), key, out, expect) for name in names]
    todo = [s for s, d in zip(range(0, share, b_loc), done) if not d]
    cached, steps = sum(s.count for s in shards), todo
    if procs > 1:           # the forward is a collective: every process steps through a batch any process lacks
        from jax.experimental import multihost_utils

        cached = int(np.sum(multihost_utils.process_allgather(np.array([cached], np.int64))))
        every = np.asarray(multihost_utils.process_allgather(np.array(done, bool))).reshape(procs, -1)
        steps = [s for s, d in zip(range(0, share, b_loc), every.all(0)) if not d]
    if bar is not None:
        bar.update(cached)
    if cached and me == 0:
        rest = len(files) - cached
        _say(f"spectral-jax dataset: {cached} of {len(files)} images' features read from {store.folder(ckdir)}"
             + (f"; computing the other {rest}" if rest else ""))
    params = backbone.params if procs == 1 else jax.tree.map(
        lambda x: global_array(mesh, P(), np.asarray(x), np.shape(x)), backbone.params)

    def produce(start):
        idx = first + np.arange(start, start + b_loc)
        idx = np.where((idx < len(files)) & (idx < first + share), idx, -1)
        return (idx,) + F.read_slots(root, files, idx, geom.size, pre)

    with F.Prefetcher(produce, steps, depth=settings.prefetch) as batches:
        for start, (idx, x, ok, bad) in batches:
            x = jax.device_put(x, rows) if procs == 1 else global_array(mesh, P(AXIS), x,
                                                                           (settings.batch_size, *x.shape[1:]))
            outs, nonfinite = forward(params, x)
            m = real[start]
            if start not in todo or not m:
                continue
            nonfinite = _local_rows(nonfinite, axis=0)[:m]                 # [m] this process's real slots
            failed = {int(i): w for i, w in bad.items() if i >= 0}
            for i, layer in zip(idx[:m], nonfinite):
                if layer >= 0 and i not in bad:
                    failed[int(i)] = nonfinite_reason(backbone.name, int(layer))
            arrays = {}
            for g, pair in enumerate(outs):
                for x_name, y in zip("ab", pair):
                    if y is not None:
                        arrays[f"{x_name}{g}"] = _local_rows(y)[:, :m * per[g]]
            path = store.write_shard(ckdir, key, first + start, ok[:m] & (nonfinite < 0), failed, arrays, me,
                                     (first, first + share))
            shards.append(store.Shard(path, first + start, m, ok[:m] & (nonfinite < 0), failed,
                                      {a: np.load(os.path.join(path, a + ".npy"), mmap_mode="r") for a in arrays}))
            if bar is not None:
                bar.update(m)
    fs = store.FeatureStore(shards, first, share, _arrays(settings, geom))
    valid, failed = fs.valid, dict(fs.failed)
    if procs > 1:
        from jax.experimental import multihost_utils

        valid = np.asarray(multihost_utils.process_allgather(valid, tiled=True))
        failed = gather_reasons(failed)
    return Streamed(fs, valid, failed, cached)


class Streamed(NamedTuple):
    """What `stream_features` leaves: this process's `store.FeatureStore`, valid `[n]` and failed {image: why} of
    all processes, and how many images (all processes') were read from the store rather than computed."""

    store: object
    valid: np.ndarray
    failed: dict
    cached: int


def local_features(st: Streamed, settings: Settings, geom: Geometry) -> Features:
    """This process's rows of the store `fs` in memory, as `build_graphs` takes them (several processes: each
    holds only its own images' rows): a, b `[L, (n/P)·h·w, F]`; valid `[n]`, failed all processes'."""
    fs, dtype = st.store, jnp.bfloat16 if settings.features_dtype == "bfloat16" else None
    a, b = [], []
    for g, (_, group) in enumerate(geom.groups):
        def rows(name):
            return np.stack([fs.rows(name, l, fs.first, fs.first + fs.share, dtype) for l in range(len(group))])

        a.append(rows(f"a{g}"))
        b.append(a[-1] if settings.graph == "knn-vv" else rows(f"b{g}"))
    return Features(a, b, st.valid, st.failed)


def _say(msg: str) -> None:
    """One line on stderr (through tqdm, so that a progress bar stays intact), from process 0 only: what it says
    (the search's recall, isolated tokens, a cache read) is the run's, the same on every process."""
    import sys

    if jax.process_index() != 0:
        return
    try:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)


def _local_rows(x: jax.Array, axis: int = 1) -> np.ndarray:
    """This process's rows of `x` sharded over `axis` (`[L, R, F]`: axis 1; `[R]`: axis 0), in order, as one host
    array."""
    shards = sorted({s.index[axis].start or 0: s for s in x.addressable_shards}.items())
    return np.concatenate([np.asarray(s.data) for _, s in shards], axis=axis)


def _search_graph(a, b, grid, n: int, k: tuple[int, int], settings: Settings, valid, search):
    """One graph's approximate search (`graphs.knn`'s checked one, a resolved `knn_search.Search`): a, b `[N, F]`
    (b is a: knn-vv, one array for rows and columns — `graphs.knn`'s same) → (idx, w `[N, k]` host arrays, the
    search's info)."""
    rows = a[None]
    one, used = G.knn(rows, rows if b is a else b[None], grid, n, k[0], k[1], settings.min_cos, settings.block,
                      valid=valid, search=search, info=True)
    return np.asarray(one.idx[0]), np.asarray(one.w[0]), used


def _jsonable(v):
    """numpy / JAX arrays and scalars as JSON values (`_owned_searches`' search infos)."""
    return np.asarray(v).tolist()


def _owned_searches(count: int, search_one) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Every process's (idx `[N, k]` int32, w `[N, k]` float32, info) of a group's `count` graphs, each searched
    once: graph j by process j mod P (`search_one(j)`), then broadcast from that process, its info as JSON (so
    every process, the searching one too, holds the same round-tripped record). P processes thus search a group of
    L graphs in about ⌈L/P⌉ graphs' time, not L; a process that owns no graph waits. A search that fails raises
    its error in its process, and every other process raises `layout.PeerFailed` before the broadcasts
    (`layout.fail_together`), none waiting for graphs that will not come. Every process must call it with the same
    count."""
    from jax.experimental import multihost_utils

    from spectral_jax.dataset.layout import fail_together

    me, procs = jax.process_index(), jax.process_count()
    mine, err = {}, None
    try:
        for j in range(me, count, procs):
            mine[j] = search_one(j)
    except Exception as e:              # noqa: BLE001 — re-raised by fail_together, after the others are told
        err = e
    fail_together(err, "share of the kNN search")
    out = []
    for j in range(count):
        src = j % procs == me
        if src:
            idx, w, used = mine.pop(j)
            idx, w = np.asarray(idx, np.int32), np.asarray(w, np.float32)
            meta = np.frombuffer(json.dumps(used, default=_jsonable).encode(), np.uint8)
            head = np.array([*idx.shape, meta.size], np.int32)
        else:
            head = np.zeros(3, np.int32)
        r, k, m = (int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(head, is_source=src)))
        if not src:
            idx, w, meta = np.zeros((r, k), np.int32), np.zeros((r, k), np.float32), np.zeros(m, np.uint8)
        idx, w, meta = (np.asarray(v) for v in multihost_utils.broadcast_one_to_all((idx, w, meta), is_source=src))
        out.append((idx, w, json.loads(meta.tobytes())))
    return out


def owned_peak(graphs: int, procs: int) -> int:
    """The most graphs' gathered features a process holds at once in `_owned_features` (its own so far, plus the
    one in flight when that is another's), over the P processes."""
    return max(max(sum(1 for i in range(j + 1) if i % procs == p) + (j % procs != p) for j in range(graphs))
               for p in range(procs)) if graphs else 0


def _owned_features(mesh: Mesh, a, b=None) -> dict[int, tuple[jax.Array, jax.Array]]:
    """{j: (a_j, b_j) `[N, F]` with all processes' rows} for the graphs j this process searches (j mod P, as
    `_owned_searches`), from each process's own rows a, b `[*S, N/P, F]` (b None: knn-vv, b_j is a_j). Every
    process joins every graph's all-gather and keeps only its own: at most `owned_peak(G, P)` of the group's G
    graphs' features at a time, not G."""
    me, procs = jax.process_index(), jax.process_count()
    a2 = np.asarray(a).reshape(-1, *a.shape[-2:])
    b2 = None if b is None else np.asarray(b).reshape(-1, *b.shape[-2:])

    def all_rows(x):                                 # one graph's rows of every process, in row order
        return jnp.asarray(gather(global_array(mesh, P(AXIS), x, (x.shape[0] * procs, x.shape[1]))))

    out = {}
    for j in range(a2.shape[0]):
        x = all_rows(a2[j])
        y = x if b2 is None else all_rows(b2[j])
        if j % procs == me:
            out[j] = (x, y)
        del x, y
    return out


def _search_info(used: dict, kinds: set, recall, tries: list, search) -> dict:
    """A group's record of its graphs' approximate searches (`search_store`'s infos entry): the kind used (the
    approximate one if any graph kept it), recall `[L(, T)]`, the IVF sizes of `used` (the last graph that kept
    the approximate search; none where every such graph was read back from its part), per graph its tries, and
    min_recall."""
    info = {k: v for k, v in used.items() if k not in ("recall", "tries", "search")}
    kind = next(iter(sorted(kinds - {"exact"})), "exact" if kinds else search.kind)
    return {**info, "search": kind, "recall": recall, "tries": tries, "min_recall": search.min_recall}


def _group_graph(idx, w, grid, shape, n: int) -> G.KnnGraph:
    """A group's `KnnGraph` from its graphs' edges idx, w `[L·T, N, k]` (host), degrees computed, batch `shape`."""
    idx_d, w_d = jnp.asarray(idx), jnp.asarray(w)
    deg = _degrees(idx_d, w_d)
    return G.KnnGraph(idx_d.reshape(*shape, *idx_d.shape[1:]), w_d.reshape(*shape, *w_d.shape[1:]),
                      deg.reshape(*shape, deg.shape[-1]), tuple(grid), shape, n)


def build_graphs(feats: Features, settings: Settings, geom: Geometry, mesh: Mesh, search=None
                 ) -> tuple[list[G.KnnGraph], list[dict]]:
    """One `graphs.knn` group per layer group over all tokens of the dataset, rows sharded over `mesh` (each
    process passes its own rows, `process_share`); the graph comes back whole on every process (host arrays),
    its edges weighted as `settings.edge_weights` says (`graphs.weight_edges`: σ from the seeded token pairs of
    the valid images, `settings.seed`). Diffusion taps (`geom.steps` T): the merged features `[L, N, T·F]` are cut
    into the timesteps' own (`graphs.split_timesteps`) and each (layer, timestep) gets its own graph: a group
    `[L, T]`. search: the inter-image search (`graphs.knn`'s; None: exact). Several processes: the exact search
    runs sharded over the mesh (each process searches its own rows); an approximate one (ivf, faiss: it cannot run
    over a mesh) is shared out: each process gathers all rows of its share of the group's graphs (graph j:
    process j mod P, `_owned_features`; to its default device), searches them whole and broadcasts them
    (`_owned_searches`: every process then holds the same graphs, each searched once, whatever a host's threads
    make of faiss's k-means), weighted on each (σ from the sharded features) — the one-process graph, in about 1/P
    of its search time where the group has P graphs or more (layers, or layers × timesteps), each process holding
    `owned_peak(G, P)` ≤ ⌈G/P⌉ + 1 of the group's G graphs' features at once.
    Returns (graphs, per group {"search", "recall" `[L(, T)]`, "sigma" `[L(, T)]` or None, the IVF sizes})."""
    n = len(feats.valid)
    procs = jax.process_count()
    shared = procs > 1 and getattr(search, "kind", search or "exact") != "exact"    # the approximate search
    out, infos = [], []
    for (grid, _), a, b in zip(geom.groups, feats.a, feats.b):
        k_intra, k_inter = geom.k_of(grid, n)
        valid, same = feats.valid, b is a
        if geom.steps is not None:                   # [L, N, T·F] → [L, T, N, F]: one graph per (layer, timestep)
            a = G.split_timesteps(a, geom.steps)
            b = a if same else G.split_timesteps(b, geom.steps)
        mine_a, mine_b = a, b                        # this process's rows `[L(, T), N/P, F]`
        if procs > 1:
            shape = (*a.shape[:-2], a.shape[-2] * procs, a.shape[-1])
            rows = P(*([None] * (a.ndim - 2)), AXIS)
            a = global_array(mesh, rows, a, shape)
            b = a if same else global_array(mesh, rows, b, shape)
            valid = global_array(mesh, P(), valid, valid.shape)
        if shared:                  # each process: all rows of the graphs it searches, one graph at a time
            valid, shape = gather(valid), a.shape[:-2]
            owned = _owned_features(mesh, mine_a, None if same else mine_b)

            def one(j, owned=owned, valid=valid, grid=grid, k=(k_intra, k_inter)):
                x, y = owned.pop(j)                          # knn-vv: y is x, one array for rows and columns
                return _search_graph(x, y, grid, n, k, settings, valid, search)

            found = _owned_searches(int(np.prod(shape)), one)
            g = _group_graph(np.stack([f[0] for f in found]), np.stack([f[1] for f in found]), grid, shape, n)
            recall = np.array([float(np.asarray(f[2]["recall"]).reshape(-1)[0]) for f in found], np.float32)
            last = next((f[2] for f in found[::-1] if f[2]["search"] != "exact"), found[-1][2])
            info = _search_info(last, {f[2]["search"] for f in found}, recall.reshape(shape),
                                [f[2].get("tries", []) for f in found], search)
            del owned, found
        else:
            g, info = G.knn(a, b, grid, n, k_intra, k_inter, settings.min_cos, settings.block, valid=valid,
                            mesh=mesh if procs > 1 else None, axis=AXIS, search=search or "exact", info=True)
        g, sigma = G.weight_edges(g, a, settings.edge_weights, settings.seed, jnp.repeat(jnp.asarray(valid),
                                                                                         grid[0] * grid[1]))
        if procs > 1 and not shared:                # (shared: every process already holds every graph)
            g = dataclasses.replace(g, idx=gather(g.idx), w=gather(g.w), deg=gather(g.deg))
        out.append(g)
        infos.append({**info, "recall": np.asarray(info["recall"]),
                      "sigma": None if sigma is None else np.asarray(sigma)})
    return out, infos


ROW_TILE_BYTES = 1 << 29    # features per row tile of `search_store`: 512 MiB (the store is read once per row tile)
COL_TILE_BYTES = 1 << 26    # features per column tile: 64 MiB


def search_store(st: Streamed, settings: Settings, geom: Geometry, row_bytes: int = ROW_TILE_BYTES,
                 col_bytes: int = COL_TILE_BYTES, bar=None, ckdir: str | None = None, key: dict | None = None,
                 out: str | None = None, search=None, infos: list | None = None) -> list[G.KnnGraph]:
    """The whole-dataset kNN graph of each layer group (as `graphs.knn` defines it: `k_intra` neighbours in the
    token's own image, `k_inter` among the other images' tokens, cos ≤ `min_cos` dropped, invalid images without
    edges) searched from the on-disk store in tiles: for each layer, each tile of whole images' rows (≤ `row_bytes`
    of features) is read from the memory-mapped shards, searched within its images (`kernels.topk_intra`) and
    against every column tile (≤ `col_bytes`) read in turn (`kernels.topk_inter`), the running top-k merged between
    column tiles (earlier columns first on ties, as within one search). One process; the rows run on the default
    device.

    Memory: a row tile (a and its own columns) and a column tile at a time, not the features, plus the graph
    itself — idx and w `[L, N, k]`, deg `[L, N]` per group on the host and once more as device arrays. Reads: the
    group's columns once per row tile (features² / row_bytes per layer). bar: a tqdm bar, reset to count the
    row tiles of every layer. ckdir: each layer's edges are kept as they are found, as a part
    (`store.write_part`, keyed by `key`: the graph cache key), and a layer with a part is read back (checked:
    `store.read_part`, then neighbour indices in range and weights 0 or cosines above min_cos) instead of searched
    again, so that a search killed midway resumes at its first missing layer.

    search: a resolved approximate `knn_search.Search` (ivf, faiss; None: the exact tiles above) — then each graph's
    features (one layer, one timestep: a and, for knn-qk, b `[N, F]`) are read whole from the store and searched by
    `graphs.knn` (its checked search: more cells until the sampled recall reaches the search's min_recall, else
    exact); memory one layer's features and the index, not every layer's; infos (a list): one dict per group is
    appended — search (the approximate kind if any graph kept it), recall `[L(·T)]` (a graph read back from its
    part: the recall kept with it), the IVF sizes and, for a checked search, its tries per graph ([] for one read
    back)."""
    fs, n = st.store, len(st.valid)
    approx = search is not None and search.kind != "exact"
    steps = geom.graphs_per_layer                   # T graphs per layer: each timestep's columns of the features
    dtype = jnp.bfloat16 if settings.features_dtype == "bfloat16" else jnp.float32
    item = jnp.dtype(dtype).itemsize
    sizes = [_tile_images(n, g[0] * g[1] * (fs.width(f"a{i}") // steps) * item, row_bytes)
             for i, (g, _) in enumerate(geom.groups)]
    if approx:                                      # one whole graph at a time
        sizes = [n] * len(geom.groups)
    if bar is not None:
        bar.reset(total=sum(-(-n // ti) * len(ls) * steps for ti, (_, ls) in zip(sizes, geom.groups)))
        bar.set_description("kNN search")
        bar.unit = "graph" if approx else "tile"
    found = []
    for g, (grid, group) in enumerate(geom.groups):
        per, graphs = grid[0] * grid[1], len(group) * steps
        k_intra, k_inter = geom.k_of(grid, n)
        f = fs.width(f"a{g}") // steps
        ti = sizes[g]
        tj = min(n, max(1, col_bytes // (per * f * item), -(-k_inter // per)))
        valid = jnp.asarray(np.concatenate([st.valid, np.zeros(max(ti, tj), bool)]))
        bname = f"a{g}" if settings.graph == "knn-vv" else f"b{g}"
        idx = np.zeros((graphs, n * per, k_intra + k_inter), np.int32)
        w = np.zeros((graphs, n * per, k_intra + k_inter), np.float32)

        def tile(name, layer, t, i0, size):
            x = fs.rows(name, layer, i0, min(n, i0 + size))[:, t * f:(t + 1) * f]
            x = x.view(dtype) if x.dtype == np.uint16 else x.astype(dtype)
            return jnp.asarray(np.pad(x, ((0, size * per - x.shape[0]), (0, 0))))

        recall, tries, used, kinds = np.ones(graphs, np.float32), [], {}, set()
        for j in range(graphs):                     # graph j: layer j // T of the group, timestep j % T
            layer, t = divmod(j, steps)
            part = f"g{g}-l{layer}" + (f"-t{t}" if geom.steps is not None else "")
            if _read_layer(ckdir, part, key, out, idx, w, j, settings.min_cos, recall=recall if approx else None):
                tries.append([])
                if bar is not None:
                    bar.update(-(-n // ti))
                continue
            if approx:
                a = tile(f"a{g}", layer, t, 0, n)
                b = a if bname == f"a{g}" else tile(bname, layer, t, 0, n)
                idx[j], w[j], got = _search_graph(a, b, grid, n, (k_intra, k_inter), settings, st.valid, search)
                recall[j] = float(np.asarray(got["recall"]).reshape(-1)[0])
                tries.append(got.get("tries", []))
                kinds.add(got["search"])
                if got["search"] != "exact" or not used:    # the sizes reported: the last approximate graph's
                    used = got
                del a, b
                if bar is not None:
                    bar.update(1)
            for i0 in range(0, n, ti) if not approx else ():
                a, own = tile(f"a{g}", layer, t, i0, ti), tile(bname, layer, t, i0, ti)
                vals = jnp.full((ti * per, k_inter), -jnp.inf, jnp.float32)
                near = jnp.zeros((ti * per, k_inter), jnp.int32)
                if k_inter:
                    for j0 in range(0, n, tj):
                        vals, near = _inter_tile(a, tile(bname, layer, t, j0, tj), i0, j0, vals, near, valid, per,
                                                 k_inter, settings.block)
                ii, ww = _rows_tile(a, own, i0, vals, near, valid, per, k_intra, settings.min_cos)
                m = (min(n, i0 + ti) - i0) * per
                idx[j, i0 * per:i0 * per + m] = np.asarray(ii)[:m]
                w[j, i0 * per:i0 * per + m] = np.asarray(ww)[:m]
                if bar is not None:
                    bar.update(1)
            if ckdir is not None:
                store.write_part(ckdir, part, key, {"idx": idx[j], "w": w[j],
                                                    **({"recall": recall[j:j + 1]} if approx else {})})
        shape = geom.graph_shape(group)             # [L] or [L, T]
        found.append(_group_graph(idx, w, grid, shape, n))
        del idx, w
        if infos is not None:
            infos.append(_search_info(used, kinds, recall.reshape(shape), tries, search) if approx else
                         {"search": "exact", "recall": recall.reshape(shape)})
    return found


def store_sigma(st: Streamed, settings: Settings, geom: Geometry) -> list[np.ndarray]:
    """The RBF σ of every graph of each layer group `[L(·T)]` float32 (`graphs.median_sigma`), from the on-disk
    store: the rows of `graphs.sigma_pairs` (the valid images' tokens, `settings.seed`) read memory-mapped
    (`_store_rows`), never the whole features — the same σ as `graphs.weight_edges` on the features in memory."""
    fs, steps = st.store, geom.graphs_per_layer
    dtype = jnp.bfloat16 if settings.features_dtype == "bfloat16" else jnp.float32
    out = []
    for g, (grid, group) in enumerate(geom.groups):
        per = grid[0] * grid[1]
        i, j = (np.asarray(x) for x in G.sigma_pairs(np.repeat(st.valid, per), settings.seed))
        rows = np.concatenate([i, j])
        f = fs.width(f"a{g}") // steps
        sig = []
        for layer in range(len(group)):
            x = _store_rows(fs, f"a{g}", layer, rows)
            x = x.view(dtype) if x.dtype == np.uint16 else x
            for t in range(steps):
                xt = jnp.asarray(x[:, t * f:(t + 1) * f])
                sig.append(float(G.median_sigma(xt[:len(i)], xt[len(i):], jnp.asarray(i == j))))
        out.append(np.asarray(sig, np.float32))
    return out


def _store_rows(fs, name: str, layer: int, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (global token indices) of array `name`, layer `layer`, of a `store.FeatureStore` `[len(rows), F]`
    as stored, read from the memory-mapped shards (rows of images without a shard: zeros)."""
    per = fs.per[name]
    first = fs.shards[0].arrays[name] if fs.shards else None
    out = np.zeros((len(rows), fs.width(name)), first.dtype if first is not None else np.float32)
    img = rows // per
    for sh in fs.shards:
        m = (img >= sh.first) & (img < sh.first + sh.count)
        if m.any():
            out[m] = sh.arrays[name][layer, rows[m] - sh.first * per]
    return out


def _tile_images(n: int, bytes_per_image: int, row_bytes: int) -> int:
    """Images per row tile of `search_store`: as many as `row_bytes` of features hold, at least 1, at most n."""
    return max(1, min(n, row_bytes // max(1, bytes_per_image)))


def _read_layer(ckdir, name: str, key, out, idx: np.ndarray, w: np.ndarray, layer: int, min_cos: float,
                nodes: int | None = None, recall: np.ndarray | None = None) -> bool:
    """Layer `layer`'s idx, w `[R, k]` filled from part `name` when there is one (True), checked: the part as
    `store.read_part` checks it, indices in [0, nodes) (default R: the rows are every node), weights 0 or in
    (min_cos, 1]; else one `InputError` naming it. recall `[L]` (an approximate search's parts): the part's
    measured recall `[1]` too, in [0, 1], into recall[layer]."""
    from spectral_jax.dataset import checkpoint

    if ckdir is None:
        return False
    shape = tuple(idx.shape[1:])
    nodes = shape[0] if nodes is None else nodes
    expect = {"idx": ("int32", shape), "w": ("float32", shape)}
    if recall is not None:
        expect["recall"] = ("float32", (1,))
    got = store.read_part(ckdir, name, key, out, expect)
    if got is None:
        return False
    i, x = got["idx"], got["w"]
    where = os.path.join(ckdir, store.PARTS, name)
    if i.size and (i.min() < 0 or i.max() >= nodes):
        raise checkpoint.damaged(where, f"idx holds neighbours outside [0, {nodes})")
    if not ((x == 0) | ((x > min_cos) & (x <= 1 + 1e-5))).all():
        raise checkpoint.damaged(where, "w holds weights that are not 0 or cosines above min_cos")
    if recall is not None and not 0 <= float(got["recall"][0]) <= 1:
        raise checkpoint.damaged(where, "recall is not in [0, 1]")
    idx[layer], w[layer] = i, x
    if recall is not None:
        recall[layer] = got["recall"][0]
    return True


@jax.jit
def _degrees(idx, w):
    """The row sums of ½(A + Aᵀ) `[L, N]` of idx, w `[L, N, k]` (as `graphs.knn` computes them)."""
    return 0.5 * (w.sum(-1) + jax.vmap(lambda i, x: jnp.zeros(i.shape[0], x.dtype).at[i.reshape(-1)].add(
        x.reshape(-1)))(idx, w))


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _inter_tile(a, b, i0, j0, vals, near, valid, per: int, k: int, block: int):
    """The running top-k (vals, near `[r, k]`, near global column indices) of the rows of `a` (images from i0)
    merged with the columns of `b` (images from j0) of other, valid images."""
    from spectral_jax import kernels

    row_img = i0 + jnp.arange(a.shape[0], dtype=jnp.int32) // per
    col_img = j0 + jnp.arange(b.shape[0], dtype=jnp.int32) // per
    i_o, c_o = kernels.topk_inter(kernels.unit_rows(a), kernels.unit_rows(b), row_img, col_img, valid[col_img], k,
                                  block)
    both, where = jax.lax.top_k(jnp.concatenate([vals, c_o], axis=1), k)        # earlier columns first on ties
    return both, jnp.take_along_axis(jnp.concatenate([near, i_o + j0 * per], axis=1), where, axis=1)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _rows_tile(a, own, i0, vals, near, valid, per: int, k_intra: int, min_cos: float):
    """Edges of the rows of `a` (images from i0): the intra-image top-k among `own` (the same images' columns)
    then the inter-image (vals, near), weights 0 where cos ≤ min_cos or the row's image is invalid."""
    from spectral_jax import kernels

    i_s, c_s = kernels.topk_intra(kernels.unit_rows(a), kernels.unit_rows(own), per, k_intra)
    idx = jnp.concatenate([i_s + i0 * per, near], axis=1)
    cos = jnp.concatenate([c_s, vals], axis=1)
    row_img = i0 + jnp.arange(a.shape[0], dtype=jnp.int32) // per
    return idx, jnp.where((cos > min_cos) & valid[row_img][:, None], cos, 0.0)


def cache_key(kind: str, fp: dict) -> dict:
    """The fingerprint fields a cache depends on: the forward's (model, weights, layers, size, the image files and
    their content digests, graph kind, features dtype, and a diffusion model's load options, timesteps and noise
    seed) for features; plus k, min_cos, block, the edge weights, the search and its min_recall for the graph (and
    the seed where they draw samples: rbf's σ pairs, a search other than "exact")."""
    keys = ["model", "weights", "layers", "size", "files", "num_images", "graph", "features_dtype"]
    if fp.get("timesteps"):
        keys += ["model_options", "timesteps", "seed"]
    if kind == "graph":
        keys += ["k_intra_effective", "k_inter_effective", "min_cos", "block", "edge_weights", "search", "min_recall"]
        # σ's token pairs and an approximate index's sample depend on the seed ("auto"'s too, when it picks ivf;
        # the run's fingerprint, checked before any cache, holds the seed in every case)
        if (fp.get("edge_weights") == "rbf" or fp.get("search") in ("ivf", "faiss")) and "seed" not in keys:
            keys.append("seed")
    return {k: fp.get(k) for k in keys}


def load_cache(path: str, key: dict, geom: Geometry, problem=None, stale: str | None = None) -> dict | None:
    """The arrays of a graph cache file made with `key` (None when absent), checked against the run (`geom`,
    `key`): "failed" parsed to {image: why}. Made with another key: one `InputError` naming OUT and what changed
    (`checkpoint.check_same`; where only the graph's settings changed, its fix says that deleting `stale` —
    default `path` — keeps the cached features); unreadable or damaged (`problem`, default `_cache_problem`: the
    whole graph's checks): one `InputError` naming the file."""
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
    stale = stale or path                                   # OUT/checkpoints/graph.npz or …/graph-rows
    checkpoint.check_same(os.path.dirname(os.path.dirname(stale)), old, json.loads(json.dumps(key, sort_keys=True)),
                          graph=stale)
    why = (problem or _cache_problem)(d, key, geom)
    if why:
        raise checkpoint.damaged(path, why)
    return d


def _valid_failed_problem(d: dict, n: int, images: int) -> str | None:
    """What is wrong with a graph cache's valid (`[n]` bool, False past the `images`, some True) and failed
    ({image < images: why} on invalid images, JSON) — None: nothing, and "failed" in `d` becomes a dict."""
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
    return None


def _cache_problem(d: dict, key: dict, geom: Geometry) -> str | None:
    """What is wrong with the arrays `d` of a cache made with `key` for a run of geometry `geom` (None: nothing).
    valid `[n]` bool (False past the images, some True), failed {image < images: why} on invalid images; idx{g}
    `[L_g, n·h·w, k]` integers in [0, n·h·w), w{g} finite with 0 or (min_cos, 1], 0 on invalid images' rows,
    deg{g} `[L_g, n·h·w]` the row sums of ½(A + Aᵀ). Modifies `d`: "failed" becomes a dict."""
    images = key["num_images"]
    n = padded_images(images, geom.devices)
    why = _valid_failed_problem(d, n, images)
    if why:
        return why
    valid = d["valid"]
    if "info" not in d and key.get("edge_weights") == "cosine":   # a graph cached before the record existed
        d["info"] = np.array(json.dumps({"edge_weights": {"kind": "cosine"},
                                         "knn_search": {"asked": "exact", "used": "exact", "recall_min": 1.0}}))
    info = _info_record(d.get("info", ""))
    if info is None or info.get("edge_weights", {}).get("kind") != key.get("edge_weights"):
        return "info is not the graph's JSON record of its edge weights and search"
    rbf = key.get("edge_weights") == "rbf"
    for g, (grid, layers) in enumerate(geom.groups):
        rows, shape = n * grid[0] * grid[1], (len(layers), n * grid[0] * grid[1])
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
        if rbf and (not finite(w) or not ((w >= 0) & (w <= 1 + 1e-5)).all()):
            return f"w{g} holds weights that are not RBF weights in [0, 1]"
        if not rbf and (not finite(w) or not ((w == 0) | ((w > key["min_cos"]) & (w <= 1 + 1e-5))).all()):
            return f"w{g} holds weights that are not 0 or cosines above min_cos"
        if w.reshape(shape[0], n, -1)[:, ~valid].any():
            return f"w{g} gives edges to unreadable images"
        for layer in range(shape[0]):
            sums = 0.5 * (w[layer].sum(-1, dtype=np.float64) + np.bincount(
                idx[layer].ravel(), w[layer].ravel().astype(np.float64), minlength=rows))
            if not np.allclose(deg[layer], sums, rtol=1e-4, atol=1e-5):
                return f"deg{g} is not the degree of idx{g}, w{g}"
    return None


def _failed_json(failed: dict) -> np.ndarray:
    return np.array(json.dumps({str(i): w for i, w in failed.items()}))


def save_graphs(path: str, gs: list, key: dict, valid: np.ndarray, failed: dict, info: dict) -> None:
    """The graph cache: the key, valid, failed, the `graph_report` (JSON) and each group's idx, w, deg."""
    arrays = {"key": np.array(json.dumps(key, sort_keys=True)), "valid": valid, "failed": _failed_json(failed),
              "info": np.array(json.dumps(info, sort_keys=True))}
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
    images_cached: int = 0  # images whose features were read from OUT/checkpoints (the store or the graph)
    solver: str = "gathered"    # `solver_path`: "sharded" (graph split by rows, never gathered) or "gathered"
    graph_info: dict | None = None  # `graph_report`: the edge weights (σ per graph) and the kNN search (recall)


def solver_path(settings: Settings, geom: Geometry) -> str:
    """Where the exact graph lives: "sharded" (`solve_sharded`: rows split over the mesh, never gathered, the
    distributed LOBPCG) or "gathered" (every process holds the whole graph, `solvers.exact`). settings.exact_solver
    "auto": sharded with several processes when every layer group shares one grid and the taps have no timesteps,
    else gathered. "sharded" asked for where it cannot run (several grids, diffusion taps `[L, T]`): one
    `InputError`, before any work. (The layer-weight rules run on either path: "select" reads no head agreement
    at dataset level, `layer_weights`.) The sharded path builds the paper's cosine edges only, by the exact ring or
    the checked ring IVF (`sharded_search`: --search auto from `knn_search.AUTO_MIN_COLUMNS` tokens, or ivf by
    name): with edge_weights "rbf" auto is gathered and "sharded" one `InputError`; with several processes and an
    approximate --search asked for by name (ivf, faiss: its index built over a group's gathered features,
    `build_graphs`) auto is gathered; "sharded" with faiss is one `InputError` (with ivf it runs the ring IVF);
    --search faiss without faiss installed: one `InputError`."""
    one_grid = geom.grids == 1 and geom.steps is None
    choice = settings.exact_solver
    from spectral_jax.errors import InputError

    approx = settings.search in ("ivf", "faiss") and jax.process_count() > 1
    if settings.search == "faiss" and choice == "sharded":
        raise InputError("--search faiss", "does not run on the sharded path (faiss's index is built over all "
                         "features in one process's memory: the gathered path; the sharded path's approximate "
                         "search is the ring IVF)", "pass --search ivf or auto, or --solver gathered (or auto)")
    if settings.search == "faiss":
        from spectral_jax import knn_search

        if not knn_search.faiss_available():
            raise InputError("--search faiss", "needs faiss, which is not installed",
                             "pip install faiss-cpu, or pass --search ivf")
    plain = settings.edge_weights == "cosine"       # the sharded path builds the paper's cosine edges only
    if choice == "auto":
        return "sharded" if jax.process_count() > 1 and one_grid and plain and not approx else "gathered"
    if choice == "sharded" and not plain:
        raise InputError("--solver sharded", f"cannot run with --edge-weights {settings.edge_weights} (the sharded "
                         "path weights its edges by the cosine)", "pass --solver gathered (or auto)")
    if choice == "sharded" and not one_grid:
        why = ("the taps have diffusion timesteps (graphs [L, T])" if geom.steps is not None else
               f"the layers sit on {geom.grids} grids")
        raise InputError("--solver sharded", f"cannot run here: {why}; the sharded path takes one grid and one "
                         "graph per layer",
                         "pass --solver gathered (or auto)")
    return choice


def solve(backbone, layers, settings: Settings, geom: Geometry, root: str, files: list, ckdir: str, fp: dict,
          mesh: Mesh, weights, bar=None) -> Solved:
    """Features (cached), graph (cached), exact eigenvectors: see the module docstring. On the sharded path
    (`solver_path`) `solve_sharded` does the graph and the solve instead."""
    from spectral_jax.solvers.exact import exact

    path = solver_path(settings, geom)
    timings, cached, images_cached = {"forward": 0.0, "graph": 0.0, "solve": 0.0}, [], 0
    gpath = os.path.join(ckdir, GRAPH)
    n = padded_images(len(files), geom.devices)
    gkey, fkey = cache_key("graph", fp), cache_key("features", fp)
    d = load_cache(gpath, gkey, geom) if path == "gathered" else None
    rows = _cached_rows(ckdir, {**gkey, "nodes": n}, geom) if path == "sharded" else None
    if rows is not None:                  # the sharded path's graph cache: neither features nor search
        cached.append("graph")
        _say_graph_cached(len(files), os.path.join(ckdir, GRAPH_ROWS))
        return solve_sharded(None, settings, geom, mesh, weights, timings, cached, ckdir, {**gkey, "nodes": n}, rows,
                             model=backbone.name)
    if d is not None:
        cached.append("graph")
        if jax.process_index() == 0:        # the whole graph is kept: parts of any search left unfinished go
            store.remove_parts(ckdir)
        gs = graphs_from(d, geom, n)
        valid, failed = d["valid"], d["failed"]
        images_cached = len(files)
        _say_graph_cached(images_cached, gpath)
        info = json.loads(str(d["info"]))
    else:
        t = time.perf_counter()
        st = stream_features(backbone, layers, settings, geom, root, files, mesh, ckdir, fkey,
                             os.path.dirname(ckdir), bar)
        images_cached = st.cached
        if st.cached == len(files):
            cached.append("features")
        timings["forward"] = time.perf_counter() - t
        valid, failed = st.valid, st.failed
        if not valid.any():
            return Solved(None, valid, failed, timings, cached, 0, images_cached=images_cached, solver=path)
        if path == "sharded":
            return solve_sharded(st, settings, geom, mesh, weights, timings, cached, ckdir, {**gkey, "nodes": n},
                                 bar=bar, model=backbone.name)
        t = time.perf_counter()
        gs, info = make_graphs(st, settings, geom, mesh, n, bar=bar, ckdir=ckdir, key={**gkey, "nodes": n})
        del st
        say_search(info)
        # refused before it is cached (the search's parts removed): a --resume with another --min-cos reuses the
        # features
        edges, lone = _checked(gs, geom, valid, settings.min_cos,
                               (lambda: store.remove_parts(ckdir)) if jax.process_index() == 0 else None)
        if jax.process_index() == 0:
            os.makedirs(ckdir, exist_ok=True)
            save_graphs(gpath, gs, gkey, valid, failed, info)
            store.remove_parts(ckdir)
        timings["graph"] = time.perf_counter() - t
    if d is not None:
        edges, lone = _checked(gs, geom, valid, settings.min_cos)
    info = {**info, "isolated": lone}
    t = time.perf_counter()
    weights, chosen = layer_weights(gs, geom, weights, settings, model=backbone.name)
    from spectral_jax.layer_weights import base_grid

    base = None if weights is None else base_grid(gs, weights)    # the finest grid with weight (a rule may pick
    res = exact(gs, settings.num_eigs, weights, base, maxiter=settings.maxiter, tol=settings.tol,   # a coarse one)
                seed=settings.seed)
    timings["solve"] = time.perf_counter() - t
    return Solved(res, valid, failed, timings, cached, edges, chosen, images_cached, path, info)


def _say_graph_cached(images: int, path: str) -> None:
    """The stderr line of a run whose graph is read from its cache (process 0): as many images as the run has,
    neither read nor searched again (`stream_features` says it where features are read from the store)."""
    if jax.process_index() == 0:
        _say(f"spectral-jax dataset: {images} of {images} images' graph read from {path} (cached: no forward, no "
             "search)")


ISOLATED_WARN = 0.5     # `say_isolated`: a graph with more of the read tokens than this without an edge


def isolated(gs: list, geom: Geometry, valid: np.ndarray, min_cos: float) -> dict:
    """JSON-ready record of the tokens without an edge to another token (every neighbour's cosine at or below
    min_cos: their rows of P are zero, or only their edge to themselves — which knn-vv keeps, at cosine 1 — so their
    graph adds nothing for them): fraction {graph: f} over the read images' tokens, per layer ("layer/t" keys with
    timesteps), the largest, and the graph it is in. A token counts as isolated where its degree less its own
    edge's weight is at most `_LONE` of its degree (`_lone`). gs: the groups' graphs,
    `KnnGraph`s (deg `[L_g·T, N]`) or the sharded path's `ShardedKnn`s (deg `[L_g, N']` sharded by rows, N' ≥ N
    padded: counted where it lies, a global sum; every process must call it then); valid `[n]` the images read.
    Does not look at why (an untrained model's cosines centred on 0, a too-high --min-cos, a layer whose tokens are
    all alike)."""
    parts = []
    for (grid, _), g in zip(geom.groups, gs):
        per = grid[0] * grid[1]
        read = max(int(np.asarray(valid, bool).sum()) * per, 1)
        if isinstance(g, G.KnnGraph):
            rows = np.repeat(np.asarray(valid, bool), per)
            n, k = rows.size, g.idx.shape[-1]
            lone = np.asarray(_lone(g.deg.reshape(-1, n), g.idx.reshape(-1, n, k), g.w.reshape(-1, n, k)))
            parts.append(lone[:, rows].sum(1) / read)
        else:
            ok = jax.device_put(np.asarray(valid, bool), NamedSharding(g.mesh, P()))
            parts.append(np.asarray(gather(_no_edge(g.deg, g.idx, g.w, ok, per)), np.float64) / read)
    frac = _per_graph(geom, parts)
    worst = max(frac, key=frac.get) if frac else None
    return {"fraction": frac, "max": frac[worst] if worst else 0.0, "graph": worst, "min_cos": min_cos}


_LONE = 1e-6     # `_lone`: a degree this close (relative) to the token's own edge's weight is that edge alone


@jax.jit
def _lone(deg, idx, w):
    """Tokens without an edge to another token `[L, N]` bool, of deg `[L, N]` (S's row sums, S = ½(A + Aᵀ)) and the
    stored idx, w `[L, N, k]`: S_ii = A_ii, so deg − A_ii is what the token's edges to others add (exactly 0 in
    float32 where its own edge is its only one: ½(a + a) = a); at most `_LONE` of deg counts as none. Elementwise
    over rows, so a sharded graph stays sharded (no scatter)."""
    own = jnp.sum(jnp.where(idx == jnp.arange(idx.shape[1], dtype=idx.dtype)[None, :, None], w, 0.0), axis=-1)
    return deg - own <= _LONE * jnp.abs(deg)


@functools.partial(jax.jit, static_argnums=(4,))
def _no_edge(deg, idx, w, valid, per: int):
    """Tokens of read images without an edge to another token per graph `[L]` int32 (`_lone`) of deg `[L, N']`,
    idx, w `[L, N', k]` (rows ≥ len(valid)·per, the padding, left out; sharded: a global sum), valid `[n]` the
    images read."""
    row = jnp.arange(deg.shape[1]) // per
    ok = (row < valid.shape[0]) & valid[jnp.minimum(row, valid.shape[0] - 1)]
    return jnp.sum(_lone(deg, idx, w) & ok[None, :], axis=1, dtype=jnp.int32)


def _checked(gs: list, geom: Geometry, valid: np.ndarray, min_cos: float, drop=None) -> tuple[int, dict]:
    """(the edges kept between two tokens — `graphs.other_edges`: a token's own edge, which knn-vv keeps at cosine
    1, not counted —, `isolated`'s record) of the graphs just made or read — `KnnGraph`s or the sharded path's
    `ShardedKnn`s (every process must call it then) —, refused by `check_edges` where they hold no edge between two
    tokens (before they are cached; drop() first, if given: what the search kept of them goes)."""
    if gs and isinstance(gs[0], G.KnnGraph):
        edges = int(sum(int(G.other_edges(np.asarray(g.idx), np.asarray(g.w), np)) for g in gs))
    else:
        edges = int(sum(int(e) for g in gs for e in np.asarray(gather(_edges(g.idx, g.w)))))
    rec = isolated(gs, geom, valid, min_cos)
    try:
        check_edges(edges, rec)
    except InputError:
        if drop:
            drop()
        raise
    return edges, rec


def check_edges(edges: int, rec: dict) -> None:
    """The graphs' stored edges, before the solve: none at all, or none but tokens' edges to themselves (every read
    token isolated in every graph, `isolated`: knn-vv keeps a token's own edge at cosine 1), is an `InputError`
    (every eigenvalue would be 0 — or 1 — and the segments noise; every other kept cosine was at or below
    --min-cos); else `say_isolated`'s warning."""
    if edges == 0 or (rec["fraction"] and min(rec["fraction"].values()) >= 1.0):
        raise no_edge(rec["min_cos"], "lower --min-cos (-1 keeps every neighbour found) and run again with "
                      "--resume: the features are kept in OUT/checkpoints, the graph is not")
    say_isolated(rec)


def no_edge(min_cos: float, fix: str) -> InputError:
    """The error of graphs left without an edge between two tokens by `min_cos` (exact's `check_edges`, gd's first
    epoch), with `fix`."""
    return InputError(f"--min-cos {min_cos}", "leaves no edge between two tokens in any graph (every neighbour's "
                      "cosine is at or below it)", fix)


def say_isolated(rec: dict) -> None:
    """One stderr line when a graph leaves more than `ISOLATED_WARN` of the read tokens without an edge."""
    if rec["max"] > ISOLATED_WARN:
        many = sum(f > ISOLATED_WARN for f in rec["fraction"].values())
        _say(f"spectral-jax dataset: warning: {rec['max']:.0%} of the tokens have no edge in graph {rec['graph']} "
             f"({many} of {len(rec['fraction'])} graphs over {ISOLATED_WARN:.0%}): their cosines are all at or "
             f"below --min-cos {rec['min_cos']}, so those graphs add little to the solve; lower --min-cos, or "
             f"weigh those layers less (summary.json: isolated)")


def make_graphs(st: Streamed, settings: Settings, geom: Geometry, mesh: Mesh, n: int, bar=None,
                ckdir: str | None = None, key: dict | None = None) -> tuple[list[G.KnnGraph], dict]:
    """The gathered path's whole-dataset graphs and their `graph_report`. The search: `knn_search.resolve` of
    `settings.search` for the group's N nodes — "auto" is the exact search below `knn_search.AUTO_MIN_COLUMNS`
    nodes, above it `knn_search.auto_search`'s checked search (faiss on the CPU where it is installed, else the JAX
    IVF); "ivf" and "faiss" by name are checked the same way (more cells probed until the sampled recall of each
    graph reaches `settings.min_recall` — None: `knn_search.AUTO_MIN_RECALL` —, else exact). One process →
    `search_store` from the on-disk store, resumable by layer: the tiled exact search, or one whole graph's
    features at a time for an approximate search, and the RBF σ from the store (`store_sigma`); several processes
    → `build_graphs` on each process's rows in memory (`local_features`): the exact search sharded over the mesh,
    an approximate one on the gathered group, its graphs shared out among the processes. The approximate
    searches' recall is measured by `graphs.knn` on a seeded sample of rows, the seed `settings.seed`."""
    from spectral_jax import knn_search

    procs = jax.process_count()
    nodes = max(n * grid[0] * grid[1] for grid, _ in geom.groups)
    asked = knn_search.Search(settings.search, seed=settings.seed, min_recall=settings.min_recall)
    if asked.kind in ("ivf", "faiss"):                                  # checked, as graphs.knn's auto
        asked = knn_search.auto_search(nodes, asked, asked.kind)
    sr = knn_search.resolve(asked, nodes, True, None)        # an approximate search runs without the mesh
    if procs == 1:
        infos = []
        gs = jax.block_until_ready(search_store(st, settings, geom, bar=bar, ckdir=ckdir, key=key,
                                                out=os.path.dirname(ckdir) if ckdir else None, search=sr,
                                                infos=infos))
        sig = store_sigma(st, settings, geom) if settings.edge_weights == "rbf" else [None] * len(gs)
        gs = [g if s is None else G.rbf_edges(g, s.reshape(g.batch_shape)) for g, s in zip(gs, sig)]
        infos = [{**i, "sigma": s} for i, s in zip(infos, sig)]
    else:
        gs, infos = build_graphs(local_features(st, settings, geom), settings, geom, mesh, sr)
        gs = jax.block_until_ready(gs)
    return gs, graph_report(settings, geom, infos)


def graph_report(settings: Settings, geom: Geometry, infos: list[dict]) -> dict:
    """JSON-ready record of how the graph was made, for the summary: edge_weights {kind, and for rbf: sigma
    {layer: σ} (per layer; "layer/t" keys with timesteps), sigma_pairs, sigma_seed}; knn_search {asked, used,
    recall {layer: r} (1 for exact), recall_min, recall_rows, seed and the IVF sizes for an approximate one, and
    for a checked search its tries per layer group and graph and min_recall}."""
    per_graph = lambda arrays: _per_graph(geom, arrays)
    ew = {"kind": settings.edge_weights}
    if settings.edge_weights == "rbf":
        ew.update(sigma=per_graph([i["sigma"] for i in infos]), sigma_pairs=G.SIGMA_PAIRS, sigma_seed=settings.seed,
                  rule="exp(-d²/2σ²), d² = 2 - 2cos, σ the median distance of seeded token pairs")
    used = infos[0]["search"] if infos else "exact"
    recall = per_graph([i["recall"] for i in infos])
    ks = {"asked": settings.search, "used": used, "recall": recall,
          "recall_min": min(recall.values()) if recall else 1.0}
    if used != "exact":
        ks.update({k: int(v) for k, v in infos[0].items() if k in ("nlist", "cap", "cells", "nprobe", "sample",
                                                                    "seed", "recall_rows")})
    tries = [i["tries"] for i in infos if "tries" in i]
    if tries:                           # the checked search: per layer group, per graph, its tries [{nprobe, recall}]
        ks.update(tries=tries, min_recall=next(i["min_recall"] for i in infos if "tries" in i))
    return {"edge_weights": ew, "knn_search": ks}


def _per_graph(geom: Geometry, arrays) -> dict:
    """{graph: value} of one value per graph, arrays a list per group (`[L_g·T]` in layer-major order): keys
    "layer", or "layer/t" with timesteps; values rounded to 6 decimals."""
    out = {}
    for (_, group), x in zip(geom.groups, arrays):
        x = np.asarray(x, np.float64).reshape(len(group), -1)
        for layer, row in zip(group, x):
            for t, v in enumerate(row):
                out[str(layer) if geom.steps is None else f"{layer}/{t}"] = round(float(v), 6)
    return out


def say_search(info: dict) -> None:
    """One stderr line for an approximate search: the search used and its measured recall (nothing for exact)."""
    ks = info["knn_search"]
    if ks["used"] != "exact":
        sizes = ", ".join(f"{k} {ks[k]}" for k in ("nlist", "nprobe") if ks.get(k) is not None)
        rows = f" on {ks['recall_rows']} sampled rows" if ks.get("recall_rows") is not None else ""
        _say(f"spectral-jax dataset: kNN search {ks['used']}" + (f" ({sizes})" if sizes else "") + f": recall "
             f"{ks['recall_min']:.4f} (the lowest over the layers' graphs) of the exact inter-image top-k{rows}")
    elif ks.get("tries"):
        _say(f"spectral-jax dataset: kNN search exact: the approximate search's sampled recall stayed under "
             f"{ks['min_recall']} with the cells it may probe (summary.json: knn_search.tries)")


@jax.jit
def _edges(idx, w):
    """`graphs.other_edges` of each graph `[L]` of the sharded path's idx, w `[L, N, k]` (global arrays, rows
    sharded: global sums; int32 each, summed on the host)."""
    return jax.vmap(G.other_edges)(idx, w)


def _rows_file(ckdir: str) -> str:
    """This process's file of the sharded path's graph cache."""
    return os.path.join(ckdir, GRAPH_ROWS, f"rows-{jax.process_index()}-of-{jax.process_count()}.npz")


def _rows_problem(d: dict, key: dict, geom: Geometry) -> str | None:
    """What is wrong with one process's rows `d` of the sharded graph cache (None: nothing): valid `[n]` bool
    (False past the images, some True), failed {image: why} on invalid images; per group idx{g} `[L, m·h·w, k]`
    integers in [0, n·h·w) and w{g} float32 0 or (min_cos, 1], 0 on the rows of unreadable images, m = n / processes
    images (`process_share`).
    The degrees are not stored: `distributed.from_rows` computes them. Modifies `d`: "failed" becomes a dict."""
    n, procs, me, images = key["nodes"], key["processes"], key["process"], key["num_images"]
    why = _valid_failed_problem(d, n, images)
    if why:
        return why
    valid = d["valid"]
    m = n // procs
    mine = valid[me * m:(me + 1) * m]
    for g, (grid, layers) in enumerate(geom.groups):
        per = grid[0] * grid[1]
        k_intra, k_inter = G.clamp_k(key["k_intra_effective"], key["k_inter_effective"], grid, n)
        full = (len(layers), m * per, k_intra + k_inter)
        idx, w = d.get(f"idx{g}"), d.get(f"w{g}")
        if not isinstance(idx, np.ndarray) or not np.issubdtype(idx.dtype, np.integer) or idx.shape != full:
            return f"idx{g} is not integers {list(full)}"
        if idx.size and (idx.min() < 0 or idx.max() >= n * per):
            return f"idx{g} holds neighbours outside [0, {n * per})"
        if not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.shape != full:
            return f"w{g} is not float32 {list(full)}"
        if not finite(w) or not ((w == 0) | ((w > key["min_cos"]) & (w <= 1 + 1e-5))).all():
            return f"w{g} holds weights that are not 0 or cosines above min_cos"
        if w.reshape(full[0], m, -1)[:, ~mine].any():
            return f"w{g} gives edges to unreadable images"
    if "info" in d and _info_record(d["info"]) is None:    # the graph's `graph_report`, absent in older rows
        return "info is not the graph's JSON record of its search"
    return None


def _info_record(text) -> dict | None:
    """A cached graph's `graph_report` (JSON text, a 0-d array of it) as a dict with a "knn_search" dict and an
    "edge_weights" dict where present; None when it is not one."""
    try:
        info = json.loads(str(text))
    except (ValueError, TypeError):
        return None
    ok = isinstance(info, dict) and isinstance(info.get("knn_search"), dict) and isinstance(
        info.get("edge_weights", {}), dict)
    return info if ok else None


def _all_say(row: list, err, where: str, what: str) -> np.ndarray:
    """Every process's `row` (ints; row[0] == 2: this process's cache could not be used, err the `InputError` that
    says why) → `[P, len(row)]`, gathered so that no process waits at a collective another has left: this process
    raises err; every other one, one `InputError` naming the process whose `what` (at `where`) cannot be used."""
    from spectral_jax.dataset import checkpoint

    state = np.array([row], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        state = np.asarray(multihost_utils.process_allgather(state)).reshape(-1, len(row))
    if err is not None:
        raise err
    if (state[:, 0] == 2).any():
        bad = int(np.flatnonzero(state[:, 0] == 2)[0])
        raise checkpoint.damaged(where, f"process {bad}'s {what} cannot be used: it said why on its stderr")
    return state


def _drop_other_rows(ckdir: str, processes: int) -> None:
    """Remove the graph-rows files of another process count (rows-p-of-Q.npz, Q ≠ `processes`): once this run's
    rows are kept, no resume of this layout reads them (`_cached_rows` reads its own count's only), and they held
    the whole graph again. Process 0's, once; this run's own files and anything else are never touched."""
    root = os.path.join(ckdir, GRAPH_ROWS)
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        m = re.fullmatch(r"rows-\d+-of-(\d+)\.npz", name)
        if m and int(m.group(1)) != processes:
            try:
                os.remove(os.path.join(root, name))
            except OSError:
                pass


def _cached_rows(ckdir: str, key: dict, geom: Geometry) -> dict | None:
    """This process's rows of the sharded graph cache (`cache_key`'s graph fields and "nodes": `key`; the process
    and the process count are added) when every process has its own (else None: search again), checked
    (`load_cache` with `_rows_problem`; the processes' valid images the same). One made with other settings or
    damaged on any process: every process raises one `InputError` (the process whose file it is names it), so
    none waits at a collective."""
    from spectral_jax.dataset import checkpoint
    from spectral_jax.errors import InputError

    key = {**key, "processes": jax.process_count(), "process": jax.process_index()}
    path, err, d = _rows_file(ckdir), None, None
    try:
        d = load_cache(path, key, geom, problem=_rows_problem, stale=os.path.join(ckdir, GRAPH_ROWS))
    except InputError as e:
        err = e
    code = 2 if err else (0 if d is None else 1)
    state = _all_say([code, zlib.crc32(np.packbits(d["valid"]).tobytes()) if code == 1 else 0], err,
                     os.path.join(ckdir, GRAPH_ROWS), "rows")
    if not (state[:, 0] == 1).all():
        return None
    if len(set(state[:, 1].tolist())) > 1:
        raise checkpoint.damaged(os.path.join(ckdir, GRAPH_ROWS), "the processes' rows disagree on the readable "
                                 "images")
    return d


def _sharded_part(g: int, layer: int) -> str:
    """The name of this process's part of layer `layer` of group g's sharded search (`store.write_part`)."""
    return store.sharded_part(g, layer, jax.process_index(), jax.process_count())


def _sharded_parts(ckdir: str | None, key: dict | None, settings: Settings, geom: Geometry, n: int,
                   approx: list | None = None) -> list[dict]:
    """Per layer group, {layer: (idx, w)} this process's rows `[n/P·h·w, k]` of the layers whose search every
    process has kept as a part (`_sharded_part`; checked by `_read_layer`: neighbours in [0, n·h·w)) — (idx, w,
    recall) for a group whose search is approximate (approx[g]: its parts keep the measured recall); a layer some
    process lacks is searched again by all (the search is collective). A damaged part, or one made with other
    settings, on any process: every process raises one `InputError` (the process whose part it is names it), so
    none waits at a collective. Nothing without ckdir."""
    from spectral_jax.errors import InputError

    if ckdir is None:
        return [{} for _ in geom.groups]
    procs, found, have, err = jax.process_count(), [], [], None
    for g, (grid, group) in enumerate(geom.groups):
        per = grid[0] * grid[1]
        k = sum(geom.k_of(grid, n))
        idx = np.zeros((len(group), n // procs * per, k), np.int32)
        w = np.zeros(idx.shape, np.float32)
        rec = np.ones(len(group), np.float32) if approx and approx[g] else None
        found.append({})
        for layer in range(len(group)):
            try:
                ok = err is None and _read_layer(ckdir, _sharded_part(g, layer), key, os.path.dirname(ckdir), idx, w,
                                                 layer, settings.min_cos, nodes=n * per, recall=rec)
            except InputError as e:
                ok, err = False, e
            if ok:
                found[g][layer] = (idx[layer], w[layer]) + (() if rec is None else (rec[layer],))
            have.append(int(ok))
    state = _all_say([2 if err else 0, *have], err, os.path.join(ckdir, store.PARTS), "parts of the search")
    everyone, at = state[:, 1:].all(axis=0), 0
    for g, (_, group) in enumerate(geom.groups):
        found[g] = {l: x for l, x in found[g].items() if everyone[at + l]}
        at += len(group)
    return found


def ring_ivf(search: str, nodes: int) -> bool:
    """Whether the sharded path searches a layer group of `nodes` tokens with the ring IVF (`sharded_search`):
    --search ivf at any size, auto from `knn_search.AUTO_MIN_COLUMNS` tokens."""
    from spectral_jax import knn_search

    return search == "ivf" or (search == "auto" and nodes >= knn_search.AUTO_MIN_COLUMNS)


def sharded_search(settings: Settings, nodes: int, devices: int):
    """The sharded path's inter-image search for a layer group of N = `nodes` tokens on D devices: "auto" from
    `knn_search.AUTO_MIN_COLUMNS` tokens, and "ivf" at any size, is the checked ring IVF (`distributed.knn_tiled`'s
    search: each device's index over its own N/D columns, `knn_search.auto_search`'s lists for N/D columns, probe
    "list", a first try of as many columns per row, over the D indexes, as one process's auto probes over all N
    (its `knn_search.AUTO_NPROBE` cells of its own cap: ⌈that / (D · a device's cap)⌉ cells per index, ≥ 8), twice
    that while the sampled recall is under settings.min_recall (None: `knn_search.AUTO_MIN_RECALL`), else exact);
    "auto" below it, and "exact", None (the exact ring). Measured: benchmarks/results/dataset_search.md (10⁶ real
    tokens on 4 and 8 devices)."""
    from spectral_jax import knn_search

    if not ring_ivf(settings.search, nodes):
        return None
    asked = knn_search.Search("auto", seed=settings.seed, min_recall=settings.min_recall)
    s = knn_search.auto_search(nodes // devices, asked, "ivf")
    one = knn_search.plan(nodes, 1, knn_search.auto_search(nodes, asked, "ivf"))   # one process's first try
    cap = knn_search.plan(nodes // devices, 1, s)["cap"]
    return dataclasses.replace(s, nprobe=max(8, -(-one["nprobe"] * one["cap"] // (devices * cap))))


def search_sharded(st: Streamed, settings: Settings, geom: Geometry, mesh: Mesh, row_bytes: int = ROW_TILE_BYTES,
                   col_bytes: int = COL_TILE_BYTES, bar=None, ckdir: str | None = None, key: dict | None = None,
                   infos: list | None = None) -> list:
    """The sharded path's kNN graph of each layer group (`distributed.ShardedKnn`, rows sharded over `mesh`, never
    gathered), searched from the on-disk store in tiles (`distributed.knn_tiled`: each device's query tiles of
    ≤ `row_bytes` of features and key tiles of ≤ `col_bytes`, read memory-mapped from this process's shards by
    `store.FeatureStore.rows`, the key tiles passed round the mesh), not from the features in memory. Memory per
    device: its tiles and the running top-k, plus this process's graph rows — not its N/P·F features. The same
    graph as `distributed.knn_sharded` on the features (`graphs.knn`'s definition). bar: a tqdm bar (process 0's),
    reset to count the query tiles of every layer. ckdir and key (the graph cache key with the process and the
    process count): each process keeps its rows of each layer as a part as soon as the layer is searched
    (`_sharded_part`, `store.write_part`), and a layer every process has kept is read back instead of searched
    (`_sharded_parts`), so a search stopped midway resumes at its first missing layer. Every process must call it.
    The inter-image search: `sharded_search` (exact, or — --search auto from `knn_search.AUTO_MIN_COLUMNS` tokens,
    ivf at any size — the checked ring IVF: each device's index over its own key block, O(N·candidates) rather
    than O(N²); an approximate layer's part keeps its measured recall). infos (a list): one dict per group is appended, as
    `search_store`'s (search, recall `[L]`, the IVF sizes, tries per layer, min_recall)."""
    from spectral_jax.solvers import distributed as D

    fs, n, devices = st.store, len(st.valid), int(mesh.shape[AXIS])
    dtype = jnp.bfloat16 if settings.features_dtype == "bfloat16" else None
    item = 2 if dtype is not None else 4
    valid = global_array(mesh, P(), st.valid, st.valid.shape) if jax.process_count() > 1 else st.valid
    tiles = [tuple(_tile_images(n // devices, grid[0] * grid[1] * fs.width(f"a{g}") * item, x)
                   for x in (row_bytes, col_bytes)) for g, (grid, _) in enumerate(geom.groups)]
    if bar is not None:
        bar.reset(total=sum(-(-(n // devices) // r) * len(ls) for (r, _), (_, ls) in zip(tiles, geom.groups)))
        bar.set_description("kNN search")
        bar.unit = "tile"
    searches = [sharded_search(settings, n * grid[0] * grid[1], devices) for grid, _ in geom.groups]
    parts = _sharded_parts(ckdir, key, settings, geom, n, approx=[s is not None for s in searches])
    out = []
    for g, (grid, group) in enumerate(geom.groups):
        k_intra, k_inter = geom.k_of(grid, n)
        names = {"a": f"a{g}", "b": f"a{g}" if settings.graph == "knn-vv" else f"b{g}"}
        save = None if ckdir is None else (lambda layer, i, x, rec, g=g: store.write_part(
            ckdir, _sharded_part(g, layer), key,
            {"idx": i, "w": x, **({} if rec is None else {"recall": np.array([rec], np.float32)})},
            process=jax.process_index()))
        f, (rows, cols) = fs.width(f"a{g}"), tiles[g]
        read = lambda which, layer, lo, hi, names=names: fs.rows(names[which], layer, lo, hi, dtype)
        report = []
        out.append(D.knn_tiled(read, tuple(grid), n, len(group), f, k_intra, k_inter, settings.min_cos,
                               settings.block, valid=valid, mesh=mesh, axis=AXIS, rows=rows, cols=cols,
                               same=settings.graph == "knn-vv", progress=None if bar is None else bar.update,
                               cached=parts[g], save=save, search=searches[g], report=report))
        if infos is not None:
            infos.append(_ring_info(report, searches[g], geom.graph_shape(group)))
    return out


def _ring_info(report: list, search, shape) -> dict:
    """A group's `search_store`-like record from `distributed.knn_tiled`'s per-layer report: {search: "exact"} with
    recall 1 (search None), else `_search_info` of its layers (a layer read back from its part: its kept recall and
    no tries)."""
    recall = np.array([r["recall"] for r in report], np.float32).reshape(shape)
    if search is None:
        return {"search": "exact", "recall": recall}
    used = next((r for r in report[::-1] if r.get("search") == "ivf"), {})
    kinds = {r["search"] for r in report if "search" in r}
    return _search_info(used, kinds, recall, [r["tries"] for r in report], search)


def solve_sharded(st: "Streamed | None", settings: Settings, geom: Geometry, mesh: Mesh, weights, timings: dict,
                  cached: list, ckdir: str | None = None, key: dict | None = None, rows: dict | None = None,
                  bar=None, model: str | None = None) -> Solved:
    """The sharded path (`solver_path`): each group's kNN graph searched by `search_sharded` from each process's
    own rows of the store, read in tiles (the same search as `graphs.knn`), and kept sharded by rows, never
    gathered; layer weights by `layer_weights` with `distributed.layer_spectra` for a rule; the top-K of
    Σ w sym(P) by `distributed.lobpcg` (float32, `exact`'s convergence record) and the `Result` by
    `distributed.to_result`, which gathers only the N·K eigenvectors. The edge count is a jitted global sum.
    Graph cache (ckdir and key given: `cache_key`'s graph fields and "nodes"): after the search each process
    writes its own rows of every group (idx, w; valid, failed; atomic) to OUT/checkpoints/graph-rows/rows-p-of-P.npz
    with the key, its process and the process count. rows: this process's file as `_cached_rows` read it back
    (`solve` does, before any features are read): then st is None, nothing is searched and the graph is rebuilt
    from the rows (`distributed.from_rows`: degrees recomputed). The whole-graph cache (OUT/checkpoints/graph.npz)
    is neither read nor written. model: the backbone's name, for `layer_weights`' note. Every process must call
    it."""
    from spectral_jax.solvers import distributed as D

    info = None
    if rows is not None:
        host_valid, failed, images_cached = rows["valid"], rows["failed"], int(key["num_images"])
        info = json.loads(str(rows["info"])) if "info" in rows else None     # rows cached before the record existed
    else:
        host_valid, failed, images_cached = st.valid, st.failed, st.cached
    n = len(host_valid)
    t = time.perf_counter()
    procs = jax.process_count()
    sgs = []
    if rows is not None:
        for g, (grid, group) in enumerate(geom.groups):
            idx, w = rows[f"idx{g}"].astype(np.int32), rows[f"w{g}"]
            shape = (idx.shape[0], idx.shape[1] * procs, idx.shape[2])
            place = lambda x: global_array(mesh, P(None, AXIS), x, shape)
            sgs.append(D.from_rows(place(idx), place(w), tuple(grid), n, mesh, AXIS, (shape[0],)))
    else:
        rkey = None if ckdir is None else {**key, "processes": procs, "process": jax.process_index()}
        infos = []
        sgs = search_sharded(st, settings, geom, mesh, bar=bar, ckdir=ckdir, key=rkey, infos=infos)
        del st
        info = graph_report(settings, geom, infos)
        say_search(info)
        edges, lone = _checked(sgs, geom, host_valid, settings.min_cos,      # refused before the rows are cached
                               ckdir and (lambda: store.release_parts(ckdir, jax.process_index(), procs)))
        if ckdir is not None:
            arrays = {"key": np.array(json.dumps(rkey, sort_keys=True)), "valid": np.asarray(host_valid),
                      "failed": _failed_json(failed), "info": np.array(json.dumps(info, sort_keys=True,
                                                                                  default=_jsonable))}
            for g, sg in enumerate(sgs):
                arrays.update({f"idx{g}": _local_rows(sg.idx), f"w{g}": _local_rows(sg.w)})
            os.makedirs(os.path.join(ckdir, GRAPH_ROWS), exist_ok=True)
            save_npz(_rows_file(ckdir), arrays)
    if ckdir is not None:       # the rows are kept whole (saved now, or read back): this process's parts go, and
        store.release_parts(ckdir, jax.process_index(), procs)     # process 0 drops those of other layouts
        if jax.process_index() == 0:
            _drop_other_rows(ckdir, procs)
    jax.block_until_ready([g.deg for g in sgs])
    timings["graph"] = time.perf_counter() - t
    if rows is not None:
        edges, lone = _checked(sgs, geom, host_valid, settings.min_cos)
    info = {**(info or {}), "isolated": lone}
    t = time.perf_counter()
    kw = dict(tol=settings.tol, maxiter=settings.maxiter, seed=settings.seed)
    spectra = lambda gs, group_layers, k, layers: D.layer_spectra(gs, group_layers, k, **kw)   # all layers, sorted
    ws, chosen = layer_weights(sgs, geom, weights, settings, spectra=spectra, model=model)
    op = D.operator(sgs, ws)
    sol = D.lobpcg(op, settings.num_eigs, **kw)
    res = D.to_result(sol, op, tuple(geom.groups[0][0]), n)
    timings["solve"] = time.perf_counter() - t
    return Solved(res, host_valid, failed, timings, cached, edges, chosen, images_cached, "sharded", info)


def layer_weights(gs: list, geom: Geometry, weights, settings: Settings, spectra=None, model: str | None = None
                  ) -> tuple[list | None, dict]:
    """(per-group float32 weights for `exact`, {"rule", "weights": {layer: w}}) from `weights`, an
    `options.LayerWeights` (bound to the tapped layers by `dataset.run`) or None (equal): resolved against the
    tapped layers as analyze's are (`LayerWeights.resolve`: a layer a mapping does not name weighs 0; numbers
    scaled in float64, by the largest then to sum 1, before the float32 cast, so 1e-45 or 1e308 give the same
    weights as 1); a rule ("eigengap" / "select") reads each layer's own top-K spectrum
    (`solvers.exact.layer_spectra`: one sparse solve per layer, over its timesteps' graphs for diffusion taps);
    "select" is the layer of the largest eigengap (no head-agreement term: a layer's whole-dataset graphs are never
    made dense). A rule whose largest weight lands on an early layer says so in one stderr line
    (`layer_weights.early_pick`) where `model` (the backbone's name; None: settings.model) has its layer indices in
    depth order (`layer_weights.depth_ordered`: not a UNet, whose indices run through resolutions). spectra: (gs,
    group_layers, K, layers) → `[L, K]` (default `exact.layer_spectra`; the sharded path passes
    `distributed.layer_spectra`'s) — gs may be `KnnGraph`s or `ShardedKnn`s."""
    import functools

    from spectral_jax import layer_weights as LW
    from spectral_jax.solvers.exact import layer_spectra

    spectra = layer_spectra if spectra is None else spectra

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
            spectra, gs, group_layers, settings.num_eigs), agreement=np.ones(len(layers)))
        per = dict(zip(layers, per_layer))
        note = LW.early_pick(rule, layers, per_layer)       # the rules favour early layers at dataset level
        if note and jax.process_index() == 0 and LW.depth_ordered(settings.model if model is None else model):
            _say(note)
    return weights, {"rule": rule, "weights": {str(l): float(w) for l, w in sorted(per.items())}}   # unrounded: a
    # resume re-solves with the weights read back from it (cli.dataset), so 1e-7 must not read back as 0


__all__ = ["Features", "GRAPH", "Solved", "Streamed", "build_graphs", "cache_key", "feature_widths", "graph_report",
           "make_graphs", "padded_images", "say_search", "search_sharded", "search_store", "solve", "solve_sharded",
           "solver_path", "store_sigma", "stream_features"]
