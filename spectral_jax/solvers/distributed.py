"""The whole-dataset kNN operator kept sharded by rows over a mesh, and a matrix-free block eigensolver on it.

`exact` (solvers/exact.py) holds the whole graph on every process and multiplies a coalesced CSR / ELL matrix.
Here nothing of size N × k·L or N × N is ever gathered: each device keeps only its own rows of every layer's kNN
graph, and the operator's product is a collective over the mesh (`jax.shard_map`). The eigensolver is LOBPCG in
float32 (soft locking, a guard block) whose every tall-skinny operation is local to a device's rows, with
K×K-sized Gram matrices summed over the mesh (`psum`) and solved redundantly on every device.

The operator (`DistOperator`): A = Σ_l w_l sym(P_l), sym(P) = ½(P + Pᵀ), P_l = D_l⁻¹ S_l, S_l = ½(A_l + A_lᵀ)
(`graphs.KnnGraph`: A_l stored as `[N, k]` neighbour indices and weights). A stored edge i→j of weight a adds
c = ¼ a (1/d_i + 1/d_j) to A at (i, j) and at (j, i) (`solvers.sparse.sym_coo`), so A = Σ_l w_l (C_l + C_lᵀ) with
C_l stored by the rows that own the edges: `cols` `[L, N, k]` (global column indices) and `coef` `[L, N, k]`.
Device r of D holds rows [r·n, (r+1)·n), n = N/D (N padded to a multiple of D with rows that have no edges).
Each device stores its rows' outgoing edges (cols, coef: the k slots of every layer) and, built once by
`operator` (one all-to-all of the edges, `_transpose`), its rows' incoming edges (tsrc, tdst, tval: every edge
i → j whose j it owns, the layer weight folded in, sorted by source, padded to the most any device receives).
One product Y = A X, X `[N, K]` sharded by rows, is, on every device:
    C X    all_gather X (each device receives (D−1)/D · N·K floats), then Σ_slots c · X[j] over the local rows'
           outgoing slots (a gather);
    Cᵀ X   Σ over the local rows' incoming edges of c · X[i] (a gather from the same all-gathered X, in source
           order, and a segment-sum into the local rows `[n, K]`) — no exchange: the edges were moved once, at build.
so N·K·(D−1)/D float32 move into each device per product and nothing out (the replaced Cᵀ X scattered into an
`[N, K]` buffer and reduce-scattered it: twice the traffic and a second N·K buffer). Per-device memory of a
product: the stored operator, n·L·k·8 B outgoing + ≈ n·L·k·12 B incoming (falls as 1/D), the all-gathered X,
N·K·4 B (the one term that does not fall with D), and O(n·K) for Y and one chunk of gathered rows (XLA's
memory analysis of the compiled product: tests/test_distributed.py, benchmarks/results/scale.md). A ring —
`ppermute` of X blocks, D steps, each applying the edges whose source is in the block at hand — would replace the
all-gathered X by two n·K blocks at the same traffic, but needs the edges grouped by source block on both sides
(D padded edge lists per device); not implemented. With one device the all_gather is a no-op. The segment-sum
is a scatter-add into the local rows: deterministic on the CPU; on a GPU XLA may use atomic adds, whose order —
hence the last bits of a product — can vary between runs unless its deterministic ops are on
(`--xla_gpu_deterministic_ops=true`). On CPU a solve is deterministic for a given seed and mesh. The incoming
edges are in source order because the CPU gathers the rows of X fastest in order (random gathers of X leave the
cache at large N: benchmarks/results/scale.md).

Built once per operator, not per product (memory of the build): the degrees (a scatter-add and `psum_scatter`
of `[L, N]` floats) and the coefficients' all-gathered 1/deg `[L, N]`; the all-to-all's send and receive boxes,
`[D, most edges one device sends another]` each (≈ the device's own edges when they spread evenly).

The eigensolver (`lobpcg`): top-K of A by LOBPCG on a block of K + guard vectors, X0 random from `seed` (generated
sharded: the same numbers for any mesh), iterations in jitted chunks of `chunk` (a `lax.while_loop` stopping early
when converged; one compiled program for all chunks, a scalar read back between chunks). Each iteration applies A
to 2·(K + guard) vectors (the orthonormalised residuals and search directions; A X by the Rayleigh–Ritz recurrence).
Soft locking: a converged pair's residual leaves the search space (its vector keeps being refined by the
Rayleigh–Ritz step). Convergence is `exact`'s: per pair the relative residual ‖A x − λ x‖ / (‖A x‖ + |λ| ‖x‖)
(`exact.residuals`' definition, computed here with the same collectives from a fresh product at the end), converged
when all K are ≤ tol; the record is a `Convergence` with criterion "max_residual <= tol". float32: residuals reach
≈ 1e-5 (tol 1e-5 converges on the test graphs; at 1e-6 the iteration stalls around 1e-5 — the rounding of the
products and of the Gram matrices), and the eigenvalues then agree with float64 `eigh` to ≲ 1e-6 of λ_max and the
subspace to a mean principal-angle cosine ≥ 0.99999 (tests/test_distributed.py measures these).

Building: `knn_sharded` searches the features (as `graphs.knn`, each device its own images' rows; the other devices'
keys pass by in a `ppermute` ring, never all-gathered) and keeps the result sharded; `shard_graph` distributes a
whole `KnnGraph`; `from_rows` takes rows already placed on the mesh (per-process rows via
`jax.make_array_from_process_local_data`); `knn_tiled` searches features read in tiles (a store's), its key tiles
passed round the mesh — or, approximately (an ivf `knn_search.Search`), each device's IVF index over its own key
block passed round instead (`_ivf_ring`: O(N·candidates) work, not O(N²)), its recall checked on a seeded sample
first (`_ivf_layer`). Degrees of S_l need the column sums of A_l: one scatter-add and `psum_scatter` of N floats
per layer, once.

Shape legend
    N  nodes (padded to a multiple of D)   n = N/D rows per device   D  devices on the mesh axis
    L  graphs (layers) of all groups       k  neighbour slots        K  eigenvectors   Kb = K + guard
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax.options import MAXITER, TOL, check_num_eigs
from spectral_jax.solvers.result import Convergence

CHUNK = 10          # LOBPCG iterations per compiled call (`lobpcg`)
GUARD = 4           # extra vectors of the block beyond K (`lobpcg`)
DROP = 1e-6         # SVQB: a direction whose Gram eigenvalue is below DROP · the largest is dropped (float32)


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


def _check_mesh(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh {dict(mesh.shape)} has no axis {axis!r}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"a 1-D mesh is expected (axis {axis!r}), got axes {mesh.axis_names}")
    return int(mesh.shape[axis])


def padded_nodes(n: int, devices: int) -> int:
    """Nodes rounded up to a multiple of the devices (the rows each device holds are equal in number)."""
    return -(-int(n) // int(devices)) * int(devices)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedKnn:
    """The kNN graphs of one group, rows sharded over `mesh`'s `axis` (never gathered).

    idx `[L, N, k]` int32 global neighbour indices, w `[L, N, k]` float32 (0: no edge), deg `[L, N]` row sums of
    S_l = ½(A_l + A_lᵀ) — all sharded `P(None, axis)`. N = `padded_nodes(num_nodes, D)`: rows ≥ num_nodes have
    no edges. batch_shape: the group's batch dims (L = their product), as `KnnGraph`'s, so that per-group weights
    `[*S]` and per-graph quotients keep their shape.
    """

    idx: jax.Array
    w: jax.Array
    deg: jax.Array
    grid: tuple[int, int] = _static()
    num_images: int = _static(1)
    batch_shape: tuple[int, ...] = _static(())
    mesh: Mesh = _static(None)
    axis: str = _static("data")

    @property
    def num_nodes(self) -> int:
        return self.num_images * self.grid[0] * self.grid[1]

    def select(self, layers) -> "ShardedKnn":
        """The graphs at flat batch indices `layers` (a group of batch shape `(m,)`; still sharded by rows), e.g.
        one layer's graph for its own solve."""
        i = jnp.asarray(np.asarray(layers, np.int32).reshape(-1))
        take = jax.jit(lambda x: jnp.take(x, i, axis=0), out_shardings=NamedSharding(self.mesh, P(None, self.axis)))
        return dataclasses.replace(self, idx=take(self.idx), w=take(self.w), deg=take(self.deg),
                                   batch_shape=(int(i.shape[0]),))

    @property
    def nbytes_per_device(self) -> int:
        """Bytes of idx, w and deg one device holds."""
        d = int(self.mesh.shape[self.axis])
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (self.idx, self.w, self.deg)) // d


def _degrees(idx, w, axis):
    """Local rows' degrees of S = ½(A + Aᵀ) under `shard_map`: idx, w `[L, n, k]` → `[L, n]` (row sums plus the
    column sums scattered into `[L, N]` and reduce-scattered to their owners)."""
    n = idx.shape[1]
    big = n * jax.lax.axis_size(axis)
    col = jax.vmap(lambda i, x: jnp.zeros(big, jnp.float32).at[i.reshape(-1)].add(x.reshape(-1)))(idx, w)
    col = jax.lax.psum_scatter(col, axis, scatter_dimension=1, tiled=True)
    return 0.5 * (w.sum(-1) + col)


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _build_degrees(idx, w, mesh, axis):
    return jax.shard_map(functools.partial(_degrees, axis=axis), mesh=mesh, in_specs=(P(None, axis),) * 2,
                         out_specs=P(None, axis))(idx, w)


def from_rows(idx: jax.Array, w: jax.Array, grid: tuple[int, int], num_images: int, mesh: Mesh, axis: str = "data",
              batch_shape: tuple[int, ...] | None = None) -> ShardedKnn:
    """A `ShardedKnn` from edge rows already on the mesh: idx, w `[L, N, k]` global arrays sharded `P(None, axis)`
    with N = `padded_nodes(num_images·h·w, D)` (rows past the nodes: w = 0). Computes the degrees (one collective);
    moves no rows. batch_shape default `(L,)`."""
    d = _check_mesh(mesh, axis)
    nodes = int(num_images) * int(grid[0]) * int(grid[1])
    if idx.ndim != 3 or idx.shape != w.shape or idx.shape[1] != padded_nodes(nodes, d):
        raise ValueError(f"idx {idx.shape} / w {w.shape} must be [L, {padded_nodes(nodes, d)}, k] (nodes padded to "
                         f"a multiple of {d} devices)")
    deg = _build_degrees(idx, w, mesh, axis)
    batch = (idx.shape[0],) if batch_shape is None else tuple(batch_shape)
    return ShardedKnn(idx, w, deg, (int(grid[0]), int(grid[1])), int(num_images), batch, mesh, axis)


def shard_graph(graph, mesh: Mesh, axis: str = "data") -> ShardedKnn:
    """A whole `graphs.KnnGraph` (host or device, every process the same) distributed by rows over `mesh` (tests,
    and graphs that fit one host). Its degrees are kept as they are."""
    d = _check_mesh(mesh, axis)
    batch = tuple(graph.batch_shape)
    idx = np.asarray(graph.idx, np.int32).reshape(-1, *graph.idx.shape[-2:])
    w = np.asarray(graph.w, np.float32).reshape(idx.shape)
    deg = np.asarray(graph.deg, np.float32).reshape(idx.shape[:2])
    pad = padded_nodes(idx.shape[1], d) - idx.shape[1]
    idx, w = (np.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (idx, w))
    deg = np.pad(deg, ((0, 0), (0, pad)))
    rows = NamedSharding(mesh, P(None, axis))
    put = lambda x: jax.make_array_from_callback(x.shape, rows, lambda i: x[i])
    return ShardedKnn(put(idx), put(w), put(deg), tuple(graph.grid), int(graph.num_images), batch, mesh, axis)


def knn_sharded(a: jax.Array, b: jax.Array, grid: tuple[int, int], num_images: int, k_intra: int, k_inter: int,
                min_cos: float = 0.1, block: int = 512, *, valid=None, mesh: Mesh, axis: str = "data") -> ShardedKnn:
    """`graphs.knn`'s search with the rows left where they were found and the keys never gathered: a, b `[L, N, F]`
    (global arrays sharded `P(None, axis)`, or host arrays, the same on every process), N = num_images·h·w,
    num_images a multiple of the devices on `axis` (whole images per device). Each device keeps its own query rows
    and its own key block; the intra-image neighbours come from its own block, the inter-image ones from a ring
    (`_ring_inter`: the key blocks travel round the mesh by `ppermute`, a running top-k merged at each step), so a
    device holds O(N/D·F + N/D·k) of a layer, never all N·F keys. With one device the search is `graphs.knn`'s own
    (`_knn_rows`) and the graph equals its bit for bit. On more, the rules are `graphs.knn`'s (ties to the lower
    column, weight 0 where cos ≤ min_cos or the row's image is invalid, the same slot layout), but a cosine is
    computed in a key tile of N/D columns instead of `kernels.topk_inter`'s chunk of up to N, and XLA's CPU matmul
    rounds by the tile's shape: cosines and weights may differ by a few float32 ulps (as the all-gathered search's
    did on 4 and 8 devices), so candidates whose cosines tie within that rounding may be exchanged; otherwise the
    neighbours are the same (tests/test_distributed.py). The degrees come from one reduce-scatter. k_intra /
    k_inter as `graphs.knn` takes them after `graphs.clamp_k` (not checked again here); valid `[num_images]`."""
    from spectral_jax.graphs import _check_grid

    d = _check_mesh(mesh, axis)
    grid = _check_grid(a, grid, num_images, "a")
    if num_images % d:
        raise ValueError(f"num_images={num_images} must be a multiple of the {d} devices on axis {axis!r}")
    rows, rep = NamedSharding(mesh, P(None, axis)), NamedSharding(mesh, P())
    a, b = jax.device_put(a, rows), jax.device_put(b, rows)           # no-ops for arrays already laid out so
    valid = jax.device_put(np.ones((num_images,), bool) if valid is None else valid, rep)
    idx, w = _search(a, b, valid, grid[0] * grid[1], int(k_intra), int(k_inter), float(min_cos), int(block), mesh,
                     axis)
    return from_rows(idx, w, grid, num_images, mesh, axis, (a.shape[0],))


def _order_key(cos):
    """int32 keys of float32 cosines `[..]` that sort ascending as the cosines sort descending in the total order
    `lax.top_k` uses (−0.0 below 0.0), so that a sort on (key, column) breaks ties to the lower column as top_k
    breaks them to the lower position: `kernels._rank_key`, reversed."""
    from spectral_jax import kernels

    return ~kernels._rank_key(cos)


def _merge_top(best, new, k: int):
    """The running top-k (idx, cos) `[R, k]` merged with new (idx, cos) `[R, k']` by a sort on (cosine, column):
    the lower column wins a tie, whatever the order the candidates arrive in; best None: new as it is."""
    if best is None:
        return new
    i = jnp.concatenate([best[0], new[0]], axis=1)
    c = jnp.concatenate([best[1], new[1]], axis=1)
    _, i, c = jax.lax.sort((_order_key(c), i, c), dimension=1, num_keys=2)
    return i[:, :k], c[:, :k]


def _ring_tile(a, b, best, valid, i0, j0, n: int, per: int, k: int, block: int, axis: str, row_img=None):
    """One query tile against one key tile of every device, under `shard_map`: a `[tq, F]` unit rows of this
    device's query tile (its images from i0 on, padded rows at the end; or any rows of its own, their images
    row_img `[tq]` given), b `[tk, F]` unit rows of its key tile (its images from j0 on), best: the running (idx
    `[tq, k]` global columns, cos `[tq, k]`) or None (the first key tile); n rows per device → the running top-k
    merged with the key tile of every device.

    D steps and D − 1 transfers of the key tile: at step s the device holds the tile of device (r + s) mod D,
    searches it (`kernels.topk_inter`: the own image masked, invalid images' columns excluded; a tile of fewer
    than k columns, or past the device's last image, padded with excluded columns), merges its top-k into the
    running top-k (a sort on (cosine, column): the lower column wins a tie, whatever the order the tiles arrive
    in), and passes the tile on (`ppermute` to device r − 1) while it searches. A device holds its query tile, its
    key tile, the tile in flight and the running top-k. Columns of a tile's padding get indices ≥ D·n (after every
    real column; never kept while there are k real ones)."""
    from spectral_jax import kernels

    d = jax.lax.axis_size(axis)
    r = jax.lax.axis_index(axis)
    tk = b.shape[0]
    if row_img is None:
        row_img = (r * n + i0 * per + jnp.arange(a.shape[0], dtype=jnp.int32)) // per
    perm = [(j, (j - 1) % d) for j in range(d)]                # device j's tile to j − 1: r holds (r + s) mod D
    m = max(tk, k)                                             # a tile of fewer than k columns: padded
    pos = jnp.arange(m, dtype=jnp.int32)
    cnt = jnp.minimum(tk, n - j0 * per)                        # the tile's columns inside the device's rows
    real = pos < cnt

    def found(blk, src):
        cols = src * n + j0 * per + pos
        img = jnp.where(real, cols // per, -2)
        blk = jnp.pad(blk, ((0, m - tk), (0, 0)))
        i, c = kernels.topk_inter(a, blk, row_img, img, real & valid[jnp.where(real, img, 0)], k, block)
        return jnp.where(i < cnt, i + src * n + j0 * per, d * n + i), c

    merge = functools.partial(_merge_top, k=k)

    def step(carry, s):
        blk, best = carry
        nxt = jax.lax.ppermute(blk, axis, perm)
        return (nxt, merge(best, found(blk, (r + s) % d))), None

    best = merge(best, found(b, r))
    if d > 1:
        blk = jax.lax.ppermute(b, axis, perm)
        (blk, best), _ = jax.lax.scan(step, (blk, best), jnp.arange(1, d - 1, dtype=jnp.int32))
        best = merge(best, found(blk, (r + d - 1) % d))
    return best


def _no_candidate(i, c, n: int, d: int, k: int, block: int):
    """Slots without a candidate (cos −inf) given the column `topk_inter` gives them over all D·n columns: the
    lowest masked columns when D·n fit one of its column chunks (as the merged tiles left them), else 0 (its
    chunked merge's)."""
    from spectral_jax import kernels

    whole = d * n <= max(k, kernels.INTER_BUDGET // min(block, n))
    return i if whole else jnp.where(c == -jnp.inf, 0, i)


def _ring_inter(a_loc, b_loc, valid, per: int, k: int, block: int, axis: str):
    """The inter-image top-k of the local rows under `shard_map`, keys never gathered: a_loc, b_loc `[G, n, F]`
    this device's rows and key block (whole images) → (idx `[G, n, k]` int32 global columns, cos `[G, n, k]`
    float32), as `kernels.topk_inter` returns them over all N columns inside `graphs._knn_rows`: one graph at a
    time (`lax.map`), the device's rows against every device's block (`_ring_tile` with the whole block as one
    tile; `knn_tiled` runs the same in tiles read from a store). A device holds its rows, its block, the block in
    flight and the running top-k: O(n·F + n·k); nothing of size N·F. Slots without a candidate: `_no_candidate`."""
    from spectral_jax import kernels

    d = jax.lax.axis_size(axis)
    n = a_loc.shape[1]

    def one(ab):
        ai, bi = (kernels.unit_rows(x) for x in ab)
        i, c = _ring_tile(ai, bi, None, valid, 0, 0, n, per, k, block, axis)
        return _no_candidate(i, c, n, d, k, block), c

    return jax.lax.map(one, (a_loc, b_loc))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8, 9))
def _search(a, b, valid, per, k_intra, k_inter, min_cos, block, mesh, axis):
    """idx, w `[L, N, k_intra + k_inter]` sharded `P(None, axis)`: `graphs._knn_rows` on each device's rows, the
    inter-image part from `_ring_inter` on more than one device (one device: `_knn_rows`' own search)."""
    from spectral_jax.graphs import _knn_rows

    ring = int(mesh.shape[axis]) > 1 and k_inter > 0

    def local(a_loc, b_loc, valid):
        row0 = jax.lax.axis_index(axis) * a_loc.shape[1]
        inter = _ring_inter(a_loc, b_loc, valid, per, k_inter, block, axis) if ring else None
        # with `inter` given, _knn_rows' third argument (all columns) is not read; b_loc stands in for it
        return _knn_rows(a_loc, b_loc, b_loc, row0, valid, per, k_intra, k_inter, min_cos, block, inter=inter)[:2]

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P(None, axis), P()),
                         out_specs=(P(None, axis), P(None, axis)))(a, b, valid)


def knn_tiled(read, grid: tuple[int, int], num_images: int, layers: int, width: int, k_intra: int, k_inter: int,
              min_cos: float = 0.1, block: int = 512, *, valid=None, mesh: Mesh, axis: str = "data",
              rows: int | None = None, cols: int | None = None, same: bool = True, progress=None,
              cached: dict | None = None, save=None, search=None, report: list | None = None) -> ShardedKnn:
    """`knn_sharded`'s search with the features read in tiles instead of held: read(which, layer, first, stop) →
    the host rows `[(stop − first)·h·w, F]` (F = width) of "a" (queries) or "b" (keys) of graph `layer`, images
    [first, stop) (global indices; e.g. `store.FeatureStore.rows`, memory-mapped) — only rows of the images this
    process's devices own are asked for. Each device's images (num_images / D, whole images per device, num_images a
    multiple of D) are searched `rows` images at a time (a query tile: its rows and, for the intra-image part, the
    same images' keys) against its key tiles of `cols` images, each passed round the mesh (`_ring_tile`: D − 1
    `ppermute`s of a key tile), the running top-k kept on the devices between key tiles; the tile's edges are then
    made by `graphs._knn_rows` (intra-image, weights) and copied to host arrays of this process's rows.
    rows / cols None: a device's whole block (then the search is `knn_sharded`'s, bit for bit). same: "b" is "a"
    (knn-vv: the query tile serves as its own keys). progress: called with 1 after each query tile's edges
    (layers × ⌈images per device / rows⌉ calls). cached: {layer: (idx, w)} this process's rows `[N/P, k]` of
    layers found earlier (a resumed search), taken as they are instead of searched — every process must name the
    same layers (the search of a layer is collective); save: called (layer, idx, w, recall) with this process's rows
    of each layer searched and its measured recall (None for the exact search), as soon as it is done (so that a
    search stopped midway resumes at its first missing layer).
    search: a `knn_search.Search` of kind "ivf" (its nlist, nprobe, seed, iters, recall_rows, min_recall for the
    N/D columns of one device) for an approximate inter-image search instead of the exact ring — per layer each
    device builds an IVF index over its own key block (read whole) and the indexes travel round the mesh
    (`_ivf_layer`, `_ivf_ring`): O(N·candidates) work in all, not O(N²); with min_recall its sampled recall is
    checked first and nprobe doubled until it is reached, else that layer is searched exactly. None or "exact": the
    exact ring. report (a list): one dict per layer is appended — search ("ivf" or "exact"), recall (1 for exact),
    tries [{nprobe, recall}] and the IVF sizes (`knn_search.plan`), seed, recall_rows; a cached layer: its recall
    (the third entry of its cached tuple, else 1) and tries [].

    Memory per process: the query tile (and its keys), one key tile and the one in flight, the running top-k
    `[rows·h·w, k_inter]` per device, and the graph's rows `[L, N/P, k]` (host, then once as device arrays) —
    not the N/P·F features (the IVF search: per device its key block and, for knn-qk, its query block while the
    index is built and its recall checked, then its index — a list-ordered copy of the block — and the one in
    flight). Reads per layer: a device's keys once per query tile. The graph: the same neighbours
    as `knn_sharded` (ties to the lower column, the same slots without a candidate); cosines are computed in key
    tiles of `cols` images, which XLA's CPU matmul may round differently from a whole block's by a few float32 ulps
    (candidates tied within that rounding may be exchanged). The degrees: `from_rows`. Every process must call it."""
    d = _check_mesh(mesh, axis)
    if num_images % d:
        raise ValueError(f"num_images={num_images} must be a multiple of the {d} devices on axis {axis!r}")
    grid = (int(grid[0]), int(grid[1]))
    per, mine = grid[0] * grid[1], num_images // d
    n = mine * per                                           # rows per device
    tq, tk = (mine if t is None else max(1, min(int(t), mine)) for t in (rows, cols))
    spec = NamedSharding(mesh, P(axis))
    flat = list(mesh.devices.flat)
    local = [r for r, dev in enumerate(flat) if dev.process_index == jax.process_index()]
    if local != list(range(local[0], local[0] + len(local))):
        raise ValueError(f"mesh {dict(mesh.shape)}: this process's devices must be consecutive on axis {axis!r} "
                         "(a process-major mesh), so that its rows are one block")
    valid = jax.device_put(np.ones((num_images,), bool) if valid is None else valid, NamedSharding(mesh, P()))
    k = int(k_intra) + int(k_inter)

    def tile(which, layer, i0, t):
        """[D·t·h·w, F] sharded by rows: device r's images [r·mine + i0, +t), zero rows past its last image."""
        def cb(index):
            r = (index[0].start or 0) // (t * per)
            x = read(which, layer, r * mine + i0, r * mine + min(i0 + t, mine))
            if x.shape != ((min(i0 + t, mine) - i0) * per, width):
                raise ValueError(f"read({which!r}, {layer}, …) gave {list(x.shape)}, not "
                                 f"[{(min(i0 + t, mine) - i0) * per}, {width}]")
            return np.pad(x, ((0, t * per - x.shape[0]), (0, 0)))

        return jax.make_array_from_callback((d * t * per, int(width)), spec, cb)

    idx_h = np.zeros((layers, len(local) * n, k), np.int32)
    w_h = np.zeros((layers, len(local) * n, k), np.float32)
    statics = dict(n=n, per=per, block=int(block), mesh=mesh, axis=axis)
    a = own = best = None
    approx = search is not None and search.kind == "ivf" and int(k_inter) > 0
    for layer in range(layers):
        if cached is not None and layer in cached:
            idx_h[layer], w_h[layer] = cached[layer][:2]
            if report is not None:
                report.append({"recall": float(cached[layer][2]) if len(cached[layer]) > 2 else 1.0, "tries": []})
            if progress is not None:
                progress(-(-mine // tq))
            continue
        ix, rec = None, {"search": "exact", "recall": 1.0, "tries": []}
        if approx:
            ix, rec = _ivf_layer(tile, layer, mine, n, int(k_inter), same, search, valid, int(block), mesh, axis)
        for i0 in range(0, mine, tq):
            a = tile("a", layer, i0, tq)
            own = a if same else tile("b", layer, i0, tq)
            best = None
            if ix is not None:
                best = _tile_ivf(a, ix, valid, np.int32(i0), n=n, per=per, k=int(k_inter), cap=rec["cap"],
                                 p=rec["nprobe"], mesh=mesh, axis=axis)
            for j0 in range(0, mine, tk) if k_inter and ix is None else ():
                keys = own if (tk, j0) == (tq, i0) else tile("b", layer, j0, tk)    # read while the last step runs
                if best is not None:        # then wait for it: at most two key tiles alive (dispatch is async)
                    jax.block_until_ready(best)
                best = _tile_inter(a, keys, best, valid, np.int32(i0), np.int32(j0), k=int(k_inter), **statics)
            ii, ww = jax.block_until_ready(_tile_edges(a, own, best, valid, np.int32(i0), k_intra=int(k_intra),
                                                       k_inter=int(k_inter), min_cos=float(min_cos), **statics))
            m = (min(i0 + tq, mine) - i0) * per
            for s_i, s_w in zip(ii.addressable_shards, ww.addressable_shards):
                at = local.index((s_i.index[0].start or 0) // (tq * per)) * n + i0 * per
                idx_h[layer, at:at + m] = np.asarray(s_i.data)[:m]
                w_h[layer, at:at + m] = np.asarray(s_w.data)[:m]
            if progress is not None:
                progress(1)
        if report is not None:
            report.append(rec)
        if save is not None:
            save(layer, idx_h[layer], w_h[layer], rec["recall"] if approx else None)
        del ix
    del a, own, best
    shape, lo = (layers, d * n, k), local[0] * n
    put = lambda x: jax.make_array_from_callback(shape, NamedSharding(mesh, P(None, axis)),
                                                 lambda i: x[:, (i[1].start or 0) - lo:(i[1].stop or d * n) - lo])
    return from_rows(put(idx_h), put(w_h), grid, num_images, mesh, axis, (layers,))


@functools.partial(jax.jit, static_argnames=("n", "per", "k", "block", "mesh", "axis"))
def _tile_inter(a, b, best, valid, i0, j0, *, n, per, k, block, mesh, axis):
    """`_ring_tile` over the mesh: a `[D·tq, F]`, b `[D·tk, F]` the devices' query and key tiles (sharded by
    rows), best (idx, cos) `[D·tq, k]` or None → the merged running top-k `[D·tq, k]`."""
    from spectral_jax import kernels

    def local(a, b, valid, i0, j0, *best):
        return _ring_tile(kernels.unit_rows(a), kernels.unit_rows(b), best or None, valid, i0, j0, n, per, k, block,
                          axis)

    spec, best = P(axis), tuple(best or ())
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P(), P(), *(spec,) * len(best)),
                         out_specs=(spec, spec))(a, b, valid, i0, j0, *best)


@functools.partial(jax.jit, static_argnames=("n", "per", "k_intra", "k_inter", "min_cos", "block", "mesh", "axis"))
def _tile_edges(a, own, best, valid, i0, *, n, per, k_intra, k_inter, min_cos, block, mesh, axis):
    """The edges of the query tiles (`graphs._knn_rows` with the inter-image top-k `best`, `_no_candidate`'s
    columns for empty slots): a, own `[D·tq, F]`, best (idx, cos) `[D·tq, k_inter]` or None (k_inter 0) → idx, w
    `[D·tq, k_intra + k_inter]` sharded by rows."""
    from spectral_jax.graphs import _knn_rows

    d = int(mesh.shape[axis])

    def local(a, own, valid, i0, *best):
        if not best:
            best = (jnp.zeros((a.shape[0], 0), jnp.int32), jnp.zeros((a.shape[0], 0), jnp.float32))
        i, c = best
        inter = (_no_candidate(i, c, n, d, k_inter, block)[None], c[None])
        row0 = jax.lax.axis_index(axis) * n + i0 * per
        idx, w = _knn_rows(a[None], own[None], own[None], row0, valid, per, k_intra, k_inter, min_cos, block,
                           inter=inter)[:2]
        return idx[0], w[0]

    spec, best = P(axis), tuple(best or ())
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P(), *(spec,) * len(best)),
                         out_specs=(spec, spec))(a, own, valid, i0, *best)


# ------------------------------------------------------------------------------------------ approximate (IVF) ring


def _ivf_ring(a, row_img, ix, col_img, col_ok, k: int, cap: int, p: int, axis: str):
    """The rows' approximate inter-image top-k among every device's columns, under `shard_map`: a `[R, F]` unit rows
    of this device, their images row_img `[R]`; ix this device's `knn_search.Index` over its own key block (column
    ids global); col_img `[D·n]` every column's image, col_ok `[D·n]` columns that may be neighbours → (idx `[R, k]`
    global columns, 0 where no candidate; cos `[R, k]`, −inf there). D steps: at step s the device searches the
    index of device (r + s) mod D (`knn_search._list_scan`: rows grouped by that index's lists, each row cell
    against the p cells nearest its list's centroid) and merges its top-k into the running top-k (`_merge_top`)
    while the index travels on (`ppermute` to device r − 1). A device holds its rows, its index, the index in
    flight and the running top-k; never all N·F keys."""
    from spectral_jax import knn_search

    d = jax.lax.axis_size(axis)
    perm = [(j, (j - 1) % d) for j in range(d)]
    send = lambda ix: jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), ix)

    def found(ix):
        c, i = knn_search._list_scan(a, row_img, ix.cent, ix.bs, ix.ids, ix.start, ix.cnt, ix.cell_list, col_img,
                                     col_ok, k, cap, p, 1)
        return i, c

    def step(carry, _):
        ix, best = carry
        return (send(ix), _merge_top(best, found(ix), k)), None

    best = found(ix)
    if d > 1:
        (ix, best), _ = jax.lax.scan(step, (send(ix), best), None, length=d - 2)
        best = _merge_top(best, found(ix), k)
    i, c = best
    return jnp.where(jnp.isfinite(c), i, 0), c


def _columns(valid, n: int, per: int, d):
    """Every column's image `[D·n]` int32 and whether it may be a neighbour (its image valid) `[D·n]`."""
    img = jnp.arange(d * n, dtype=jnp.int32) // per
    return img, valid[img]


@functools.partial(jax.jit, static_argnames=("n", "nlist", "cap", "cells", "sample", "iters", "mesh", "axis"))
def _ivf_build(b, seed, *, n, nlist, cap, cells, sample, iters, mesh, axis):
    """Each device's IVF index over its own key block (`knn_search.ivf_index`): b `[D·n, F]` sharded by rows, the
    k-means drawn with PRNGKey(seed) (device 0, as `knn_search.ivf_topk` draws it), folded with the device's index
    on the others → the `knn_search.Index` fields, each sharded by its leading axis (device r's: cent `[nlist, F]`,
    bs `[n + cap, F]`, ids `[n + cap]` global columns, start, cnt `[cells + 1]`, cell_list `[cells]`)."""
    from spectral_jax import kernels, knn_search

    pl = dict(nlist=nlist, cap=cap, cells=cells, sample=sample)

    def local(b, seed):
        r = jax.lax.axis_index(axis)
        key = jax.random.PRNGKey(seed)                      # device 0: graphs.knn's own key (one device: its index)
        key = jnp.where(r == 0, key, jax.random.fold_in(key, r))
        return tuple(knn_search.ivf_index(kernels.unit_rows(b), pl, iters, key, offset=r * n)[0])

    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P()), out_specs=(P(axis),) * 6)(b, seed)


@functools.partial(jax.jit, static_argnames=("n", "per", "k", "cap", "p", "mesh", "axis"))
def _tile_ivf(a, ix, valid, i0, *, n, per, k, cap, p, mesh, axis):
    """`_ivf_ring` over the mesh: a `[D·tq, F]` the devices' query tiles (sharded by rows; device r's images from
    i0 on), ix the devices' indexes (`_ivf_build`) → (idx, cos) `[D·tq, k]` sharded by rows."""
    from spectral_jax import kernels, knn_search

    def local(a, valid, i0, *ix):
        r, d = jax.lax.axis_index(axis), jax.lax.axis_size(axis)
        row_img = (r * n + i0 * per + jnp.arange(a.shape[0], dtype=jnp.int32)) // per
        col_img, col_ok = _columns(valid, n, per, d)
        return _ivf_ring(kernels.unit_rows(a), row_img, knn_search.Index(*ix), col_img, col_ok, k, cap, p, axis)

    return jax.shard_map(local, mesh=mesh, check_vma=False, in_specs=(P(axis), P(), P(), *(P(axis),) * 6),
                         out_specs=(P(axis), P(axis)))(a, valid, i0, *ix)


@functools.partial(jax.jit, static_argnames=("n", "per", "k", "rows", "block", "mesh", "axis"))
def _ring_truth(a, b, valid, seed, *, n, per, k, rows, block, mesh, axis):
    """What the ring IVF's recall (`_ivf_recall`) compares with, once per layer (not per try): every device draws
    `rows` of its own rows of valid images (PRNGKey(seed) folded with `knn_search.RECALL_STREAM` and the device) and
    searches them exactly (`_ring_tile` against the devices' whole key blocks). a, b `[D·n, F]` the devices' whole
    query and key blocks (sharded by rows) → (x `[D·rows, F]` the sampled rows' unit features, row_img `[D·rows]`
    their images, live `[D·rows]` from a valid image, kth `[D·rows, 1]` their exact k-th inter-image cosine, want
    `[D·rows]` their count of finite exact neighbours), sharded by rows."""
    from spectral_jax import kernels, knn_search

    def local(a, b, valid, seed):
        r = jax.lax.axis_index(axis)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), knn_search.RECALL_STREAM), r)
        row_ok = valid[(r * n + jnp.arange(n, dtype=jnp.int32)) // per]
        _, pick = jax.lax.top_k(jax.random.uniform(key, (n,)) + row_ok, rows)     # valid rows first
        x = kernels.unit_rows(a)[pick]
        row_img = (r * n + pick.astype(jnp.int32)) // per
        _, exact = _ring_tile(x, kernels.unit_rows(b), None, valid, 0, 0, n, per, k, block, axis, row_img=row_img)
        fin = jnp.isfinite(exact)
        kth = jnp.min(jnp.where(fin, exact, jnp.inf), axis=1, keepdims=True)
        return x, row_img, row_ok[pick], kth, jnp.sum(fin, axis=1)

    return jax.shard_map(local, mesh=mesh, check_vma=False, in_specs=(P(axis), P(axis), P(), P()),
                         out_specs=(P(axis),) * 5)(a, b, valid, seed)


@functools.partial(jax.jit, static_argnames=("n", "per", "k", "cap", "p", "mesh", "axis"))
def _ivf_recall(truth, ix, valid, *, n, per, k, cap, p, mesh, axis):
    """The ring IVF's recall at `p` cells on `_ring_truth`'s sample (`knn_search.recall_of`'s measure: the share of
    the exact inter-image top-k matched, an approximate neighbour counting when its cosine reaches the exact k-th):
    the sampled rows searched by `_ivf_ring`, the counts summed over the mesh → a float32 scalar in [0, 1] (1 when
    no sampled row has a candidate). A row's approximate neighbours do not depend on the other rows searched with
    it, so this is the recall of those rows in `_tile_ivf`'s graph."""
    from spectral_jax import knn_search

    def local(x, row_img, live, kth, want, valid, *ix):
        col_img, col_ok = _columns(valid, n, per, jax.lax.axis_size(axis))
        _, approx = _ivf_ring(x, row_img, knn_search.Index(*ix), col_img, col_ok, k, cap, p, axis)
        hit = jax.lax.psum(jnp.sum(jnp.where(live, knn_search.hits(approx, kth, want), 0)), axis)
        tot = jax.lax.psum(jnp.sum(jnp.where(live, want, 0)), axis)
        return jnp.where(tot > 0, hit / jnp.maximum(tot, 1), 1.0).astype(jnp.float32)

    return jax.shard_map(local, mesh=mesh, check_vma=False, in_specs=(*(P(axis),) * 5, P(), *(P(axis),) * 6),
                         out_specs=P())(*truth, valid, *ix)


def _ivf_layer(tile, layer: int, mine: int, n: int, k: int, same: bool, search, valid, block: int, mesh, axis):
    """A layer's checked ring IVF: each device's index over its key block (`_ivf_build`) and the sample's exact
    search (`_ring_truth`, once), then the sampled recall (`_ivf_recall`) of nprobe cells, doubled
    (`knn_search.next_try`) while under search.min_recall, until the exact search instead. tile(which, layer, i0, t)
    reads the devices' tiles (`knn_tiled`'s). Returns (the indexes, or None when the layer is to be searched
    exactly; the layer's record: search, recall (1 for exact), tries [{nprobe, recall}] and, for ivf, the
    `knn_search.plan` sizes of the try kept — its nprobe —, probe, seed, recall_rows)."""
    from spectral_jax import knn_search

    keys = tile("b", layer, 0, mine)
    rows = keys if same else tile("a", layer, 0, mine)
    pl = knn_search.plan(n, k, search)
    seed = np.uint32(search.seed % 2 ** 32)
    ix = _ivf_build(keys, seed, n=n, nlist=pl["nlist"], cap=pl["cap"], cells=pl["cells"], sample=pl["sample"],
                    iters=search.iters, mesh=mesh, axis=axis)
    d = int(mesh.shape[axis])
    m = max(1, min(n, -(-search.recall_rows // d)))
    truth = _ring_truth(rows, keys, valid, seed, n=n, per=n // mine, k=k, rows=m, block=block, mesh=mesh, axis=axis)
    tries, s = [], search
    while True:
        p = knn_search.plan(n, k, s)["nprobe"]
        rec = float(_ivf_recall(truth, ix, valid, n=n, per=n // mine, k=k, cap=pl["cap"], p=p, mesh=mesh,
                                axis=axis))
        tries.append({"nprobe": p, "recall": round(rec, 6)})
        if search.min_recall is None or rec >= search.min_recall:
            return ix, {"search": "ivf", "recall": rec, "tries": tries, **knn_search.plan(n, k, s),
                        "probe": "list", "seed": search.seed, "recall_rows": m * d}
        s = knn_search.next_try(n, k, s)
        if s.kind == "exact":
            return None, {"search": "exact", "recall": 1.0, "tries": tries}


# ------------------------------------------------------------------------------------------------------ operator


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DistOperator:
    """A = Σ_l lw_l (C_l + C_lᵀ) (module docstring), rows sharded. Outgoing edges (C X): cols, coef `[L, N, k]`
    sharded `P(None, axis)`, lw `[L]` replicated (the layer weights, normalised over all graphs). Incoming edges
    (Cᵀ X, `_transpose`): tsrc, tdst, tval `[D·E]` sharded `P(axis)`, on each device its rows' incoming edges
    sorted by (global source, local destination): tsrc the source row (global), tdst the destination row (local,
    0 … n−1), tval lw_l · c (the layer weight folded in); E = the most edges any device receives, rounded up to a
    multiple of n (padding at the end: tsrc 0, tdst 0, tval 0). `groups`: the batch shapes of the groups it was
    made of, in order (their L's concatenated), for per-group quotients. Never holds an N × N or a whole graph on
    one device."""

    cols: jax.Array
    coef: jax.Array
    lw: jax.Array
    tsrc: jax.Array
    tdst: jax.Array
    tval: jax.Array
    num_nodes: int = _static()
    groups: tuple[tuple[int, ...], ...] = _static()
    mesh: Mesh = _static(None)
    axis: str = _static("data")

    @property
    def devices(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def rows(self) -> int:
        """N, the padded node count (a multiple of the devices)."""
        return int(self.cols.shape[1])

    @property
    def nbytes_per_device(self) -> int:
        """Bytes of the stored operator one device holds: outgoing (cols, coef: 8 B per slot) and incoming (tsrc,
        tdst, tval: 12 B per edge, padded) edges."""
        arrays = (self.cols, self.coef, self.tsrc, self.tdst, self.tval)
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in arrays) // self.devices

    def _arrays(self):
        return self.cols, self.coef, self.lw, self.tsrc, self.tdst, self.tval

    def spec(self) -> NamedSharding:
        """The row sharding of a block X `[N, K]` this operator multiplies."""
        return NamedSharding(self.mesh, P(self.axis))

    def matvec(self, x: jax.Array) -> jax.Array:
        """A X: x `[N, K]` (sharded by rows, or any array: it is placed) → `[N, K]` sharded by rows."""
        return _matvec(self, jax.device_put(jnp.asarray(x, jnp.float32), self.spec()))

    def quotients(self, x: jax.Array) -> jax.Array:
        """Per-graph quotients xₖᵀ sym(P_l) xₖ `[L, K]` (unweighted) of x `[N, K]` sharded by rows."""
        return _quotients(self, jax.device_put(jnp.asarray(x, jnp.float32), self.spec()))


def _op_specs(ax):
    """shard_map in_specs of `DistOperator._arrays()`."""
    return (P(None, ax), P(None, ax), P(), P(ax), P(ax), P(ax))


def operator(groups: Sequence[ShardedKnn], weights=None) -> DistOperator:
    """The sharded operator Σ_g Σ_l w_{g,l} sym(P_{g,l}) of kNN groups on one grid (one mesh); weights: per group
    `[*S]` (None: equal), normalised to sum 1 over all graphs (`objective.normalised_weights`). Builds the incoming
    edges once (`_transpose`: one all-to-all of the edges)."""
    from spectral_jax.objective import normalised_weights

    groups = list(groups) if isinstance(groups, (list, tuple)) else [groups]
    g0 = groups[0]
    for g in groups[1:]:
        if (g.num_nodes, g.idx.shape[1], g.mesh, g.axis) != (g0.num_nodes, g0.idx.shape[1], g0.mesh, g0.axis):
            raise ValueError("sharded kNN groups must share the nodes, the mesh and its axis")
    ws = normalised_weights(groups, weights)
    k = max(g.idx.shape[2] for g in groups)
    coefs, cols = [], []
    for g in groups:
        c = _coefficients(g.idx, g.w, g.deg, g.mesh, g.axis)
        pad = ((0, 0), (0, 0), (0, k - g.idx.shape[2]))
        coefs.append(jnp.pad(c, pad))
        cols.append(jnp.pad(g.idx, pad))
    lw = jnp.concatenate([jnp.reshape(w, -1) for w in ws]).astype(jnp.float32)
    rows = NamedSharding(g0.mesh, P(None, g0.axis))
    cat = lambda xs: xs[0] if len(xs) == 1 else jax.jit(lambda *x: jnp.concatenate(x), out_shardings=rows)(*xs)
    lw = jax.device_put(lw, NamedSharding(g0.mesh, P()))
    cols, coef = cat(cols), cat(coefs)
    return DistOperator(cols, coef, lw, *_transpose(cols, coef, lw, g0.mesh, g0.axis), g0.num_nodes,
                        tuple(tuple(g.batch_shape) for g in groups), g0.mesh, g0.axis)


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _coefficients(idx, w, deg, mesh, axis):
    """¼ a (1/d_i + 1/d_j) of each local edge (d_j read from the all-gathered 1/deg, `[L, N]`, once)."""
    def local(idx, w, deg):
        inv = jnp.where(deg > 0, 1.0 / jnp.where(deg > 0, deg, 1.0), 0.0)
        inv_all = jax.lax.all_gather(inv, axis, axis=1, tiled=True)
        far = jax.vmap(lambda v, i: v[i])(inv_all, idx)
        return 0.25 * w * (inv[:, :, None] + far)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis),) * 3, out_specs=P(None, axis))(idx, w, deg)


def _outgoing(cols, coef, lw, axis):
    """The local edges as flat lists under `shard_map`: (owner device of the destination `[L·n·k]` (D: no edge),
    global source, local destination row, lw · c)."""
    d = jax.lax.axis_size(axis)
    n = cols.shape[1]
    val = (coef * lw[:, None, None]).reshape(-1)
    dst = cols.reshape(-1)
    src = jnp.broadcast_to((jax.lax.axis_index(axis) * n + jnp.arange(n, dtype=jnp.int32))[None, :, None],
                           cols.shape).reshape(-1)
    owner = jnp.where(val != 0, dst // n, d)
    return owner.astype(jnp.int32), src, (dst % n).astype(jnp.int32), val


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _edge_counts(cols, coef, lw, mesh, axis):
    """`[D, D]` (rows sharded; every process reads it whole with `gather_rows`): row s, column t = the edges
    device s's rows send to device t's rows."""
    d = _check_mesh(mesh, axis)

    def local(cols, coef, lw):
        owner = _outgoing(cols, coef, lw, axis)[0]
        counts = jnp.zeros(d + 1, jnp.int32).at[owner].add(1)[:d]
        return counts[None]

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P(None, axis), P()), out_specs=P(axis))(
        cols, coef, lw)


@functools.partial(jax.jit, static_argnames=("send", "keep", "mesh", "axis"))
def _exchange(cols, coef, lw, send, keep, mesh, axis):
    """Every edge sent to the device owning its destination (one `all_to_all` of `[D, send]` per device), then
    each device's received edges sorted by (source, local destination) and cut or padded to `keep` → tsrc, tdst,
    tval (padding: 0, 0, 0)."""
    d = _check_mesh(mesh, axis)

    def local(cols, coef, lw):
        n = cols.shape[1]
        owner, src, dst, val = jax.lax.sort(_outgoing(cols, coef, lw, axis), num_keys=1, is_stable=True)
        first = jnp.searchsorted(owner, jnp.arange(d + 1, dtype=jnp.int32))
        at = jnp.arange(owner.shape[0], dtype=jnp.int32) - first[owner]
        box = lambda v, fill: jnp.full((d, send), fill, v.dtype).at[owner, at].set(v, mode="drop")
        # unused places: source N (sorts after every row)
        got = [jax.lax.all_to_all(box(v, f), axis, 0, 0, tiled=True) for v, f in ((src, n * d), (dst, 0), (val, 0))]
        src, dst, val = jax.lax.sort([g.reshape(-1) for g in got], num_keys=2, is_stable=True)
        pad = max(keep - src.shape[0], 0)
        src, dst, val = (jnp.pad(v[:keep], (0, pad), constant_values=f) for v, f in ((src, n * d), (dst, 0), (val, 0)))
        real = src < n * d
        return jnp.where(real, src, 0), jnp.where(real, dst, 0), jnp.where(real, val, 0.0)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P(None, axis), P()),
                         out_specs=(P(axis),) * 3)(cols, coef, lw)


def _transpose(cols, coef, lw, mesh, axis):
    """The incoming edges of every device's rows (`DistOperator`'s tsrc, tdst, tval), from the outgoing ones:
    one collective for the counts (so that the shapes are static), one all-to-all of the edges. Each device holds
    its own rows' incoming edges only; transient during the build: the `[D, most edges one device sends another]`
    send and receive boxes (≈ its own edges for a graph whose edges spread evenly)."""
    counts = gather_rows(_edge_counts(cols, coef, lw, mesh, axis))
    n = int(cols.shape[1]) // _check_mesh(mesh, axis)
    keep = max(-(-int(counts.sum(0).max()) // n), 1) * n          # the most any device receives, a multiple of n
    return _exchange(cols, coef, lw, max(int(counts.max()), 1), keep, mesh, axis)


def _local_apply(cols, coef, lw, tsrc, tdst, tval, x, axis):
    """Y = A X of the local rows under `shard_map`: the operator's arrays (`DistOperator._arrays()`, local blocks),
    x `[n, K]` → `[n, K]`. One `all_gather` of X (`[N, K]`); C X: the outgoing slots scanned one at a time
    (Σ c · X[j], a gather); Cᵀ X: the incoming edges in chunks of n (a gather of X[src] in source order and a
    segment-sum into the local rows). Nothing else of size N; per step `[n, K]` (never `[n, k, K]`)."""
    n = x.shape[0]
    x_all = jax.lax.all_gather(x, axis, axis=0, tiled=True)                       # [N, K]
    c = (coef * lw[:, None, None]).transpose(0, 2, 1).reshape(-1, coef.shape[1])  # [L·k, n]
    j = cols.transpose(0, 2, 1).reshape(-1, cols.shape[1])

    def slot(y, s):
        js, cs = s
        return y + cs[:, None] * x_all[js], None

    def incoming(y, s):
        src, dst, val = s
        return y.at[dst].add(val[:, None] * x_all[src]), None

    y = jax.lax.scan(slot, jnp.zeros_like(x), (j, c))[0]
    return jax.lax.scan(incoming, y, (tsrc.reshape(-1, n), tdst.reshape(-1, n), tval.reshape(-1, n)))[0]


def _local_quotients(cols, coef, x, axis):
    """xₖᵀ (C_l + C_lᵀ) xₖ = 2 Σ_edges c x_i x_j per graph `[L, K]` (psum over the mesh)."""
    x_all = jax.lax.all_gather(x, axis, axis=0, tiled=True)

    def one(cl, kl):
        def slot(acc, s):
            js, cs = s
            return acc + jnp.sum(cs[:, None] * x * x_all[js], axis=0), None

        return jax.lax.scan(slot, jnp.zeros_like(x[0]), (cl.T, kl.T))[0]

    return jax.lax.psum(2.0 * jax.lax.map(lambda a: one(*a), (cols, coef)), axis)


@jax.jit
def _matvec(op: DistOperator, x):
    ax = op.axis
    return jax.shard_map(functools.partial(_local_apply, axis=ax), mesh=op.mesh,
                         in_specs=(*_op_specs(ax), P(ax)), out_specs=P(ax))(*op._arrays(), x)


@jax.jit
def _quotients(op: DistOperator, x):
    ax = op.axis
    return jax.shard_map(functools.partial(_local_quotients, axis=ax), mesh=op.mesh,
                         in_specs=(P(None, ax), P(None, ax), P(ax)), out_specs=P())(op.cols, op.coef, x)


# ------------------------------------------------------------------------------------------------------ LOBPCG


def _gram(a, b, axis):
    return jax.lax.psum(a.T @ b, axis)


def _svqb(w, axis):
    """Orthonormalise the columns of w `[n, m]` (rows sharded) by the eigen-decomposition of its Gram matrix
    (SVQB): columns in directions with a relative Gram eigenvalue below `DROP` are dropped (returned as zero) →
    (q `[n, m]`, keep `[m]` bool)."""
    g = _gram(w, w, axis)
    d = jnp.sqrt(jnp.clip(jnp.diag(g), 0.0))
    d = jnp.where(d > 0, d, 1.0)
    e, v = jnp.linalg.eigh(g / d[:, None] / d[None, :])
    keep = e > DROP * jnp.max(e)
    scale = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, e, 1.0)), 0.0)
    return w @ ((v / d[:, None]) * scale[None, :]), keep


def _orth_against(x, w, axis):
    """w `[n, m]` made orthonormal and orthogonal to the orthonormal x `[n, Kb]` (two rounds of block
    Gram–Schmidt + SVQB) → (q `[n, m]`, keep `[m]`)."""
    keep = jnp.ones(w.shape[1], bool)
    for _ in range(2):
        w = w - x @ _gram(x, w, axis)
        w = w - x @ _gram(x, w, axis)
        w, k = _svqb(w, axis)
        keep = keep & k
    return w * keep[None, :], keep


def _rayleigh_ritz(s, as_, keep, kb, axis):
    """The top `kb` Ritz pairs of A on span(s) (s `[n, m]`, as_ = A s, columns with keep False ignored): solves
    H c = θ M c with H = sᵀ A s, M = sᵀ s (nearly I) through M^{-1/2} → (θ `[kb]` descending, c `[m, kb]`)."""
    h = _gram(s, as_, axis)
    h = 0.5 * (h + h.T)
    m = _gram(s, s, axis)
    both = keep[:, None] & keep[None, :]
    eye = jnp.eye(s.shape[1], dtype=s.dtype)
    m = jnp.where(both, 0.5 * (m + m.T), eye)
    big = 1e4 * (jnp.max(jnp.abs(h)) + 1.0)
    h = jnp.where(both, h, 0.0) - big * jnp.diag(~keep).astype(s.dtype)
    em, vm = jnp.linalg.eigh(m)
    mi = (vm / jnp.sqrt(em)[None, :]) @ vm.T
    e, v = jnp.linalg.eigh(mi @ h @ mi)
    return e[::-1][:kb], (mi @ v)[:, ::-1][:, :kb]


def _residuals(x, ax, theta, axis):
    """`exact.residuals`' relative residuals ‖A x − θ x‖ / (‖A x‖ + |θ| ‖x‖) per column, rows sharded."""
    sq = lambda y: jnp.sqrt(jax.lax.psum(jnp.sum(y * y, axis=0), axis))
    num = sq(ax - x * theta[None, :])
    den = sq(ax) + jnp.abs(theta) * sq(x)
    return num / jnp.where(den > 0, den, 1.0)


def _local_init(arrs, x0, axis):
    """Orthonormalise the start, one Rayleigh–Ritz on it: (x, A x, θ); arrs: `DistOperator._arrays()`' blocks."""
    x, _ = _svqb(x0, axis)
    ax = _local_apply(*arrs, x, axis)
    theta, c = _rayleigh_ritz(x, ax, jnp.ones(x.shape[1], bool), x.shape[1], axis)
    return x @ c, ax @ c, theta


def _local_chunk(*args, k, axis):
    """LOBPCG iterations until `stop` or every one of the first k pairs has a relative residual ≤ tol."""
    *arrs, state, stop, tol = args
    kb = state["x"].shape[1]

    def cond(st):
        return (st["it"] < stop) & (jnp.max(st["res"][:k]) > tol)

    def body(st):
        x, ax, p, theta = st["x"], st["ax"], st["p"], st["theta"]
        active = st["res"] > tol                                       # soft locking: converged residuals leave
        r = jnp.where(active[None, :], ax - x * theta[None, :], 0.0)
        q, keep = _orth_against(x, jnp.concatenate([r, p], axis=1), axis)
        aq = _local_apply(*arrs, q, axis)
        s, as_ = jnp.concatenate([x, q], axis=1), jnp.concatenate([ax, aq], axis=1)
        theta, c = _rayleigh_ritz(s, as_, jnp.concatenate([jnp.ones(kb, bool), keep]), kb, axis)
        x, ax = s @ c, as_ @ c
        p = q @ c[kb:]
        return dict(x=x, ax=ax, p=p, theta=theta, res=_residuals(x, ax, theta, axis), it=st["it"] + 1)

    return jax.lax.while_loop(cond, body, state)


def _specs(ax):
    return dict(x=P(ax), ax=P(ax), p=P(ax), theta=P(), res=P(), it=P())


def _start(op: DistOperator, kb: int, seed: int):
    """X0 `[N, kb]` from `seed`, generated sharded by rows (the same numbers for any mesh), zero on padded rows."""
    def make():
        x0 = jax.random.normal(jax.random.key(seed), (op.rows, kb), jnp.float32)
        return jnp.where(jnp.arange(op.rows)[:, None] < op.num_nodes, x0, 0.0)

    return jax.jit(make, out_shardings=op.spec())()


@jax.jit
def _init(op: DistOperator, x0):
    ax_ = op.axis

    def local(*args):
        x, ax, theta = _local_init(args[:-1], args[-1], ax_)
        return dict(x=x, ax=ax, p=jnp.zeros_like(x), theta=theta, res=_residuals(x, ax, theta, ax_),
                    it=jnp.zeros((), jnp.int32))

    return jax.shard_map(local, mesh=op.mesh, in_specs=(*_op_specs(ax_), P(ax_)),
                         out_specs=_specs(ax_))(*op._arrays(), x0)


@functools.partial(jax.jit, static_argnames=("k",), donate_argnums=(1,))
def _chunk(op: DistOperator, state, stop, k: int, tol):
    ax_ = op.axis
    return jax.shard_map(functools.partial(_local_chunk, k=k, axis=ax_), mesh=op.mesh,
                         in_specs=(*_op_specs(ax_), _specs(ax_), P(), P()),
                         out_specs=_specs(ax_))(*op._arrays(), state, stop, tol)


@jax.jit
def _final(op: DistOperator, x, theta):
    """A fresh product of the returned vectors: their residuals `[Kb]` (not the recurrence's A X)."""
    ax_ = op.axis

    def local(*args):
        x, theta = args[-2:]
        return _residuals(x, _local_apply(*args[:-2], x, ax_), theta, ax_)

    return jax.shard_map(local, mesh=op.mesh, in_specs=(*_op_specs(ax_), P(ax_), P()),
                         out_specs=P())(*op._arrays(), x, theta)


@dataclasses.dataclass(frozen=True)
class Solve:
    """What `lobpcg` returns: eigvals `[K]` float32 host, largest first; eigvecs `[N, K]` a jax Array sharded by
    rows over the operator's mesh (N padded; rows ≥ num_nodes are 0; orthonormal; signs as the iteration left
    them); convergence (`Convergence`: residuals `[K]` from a fresh product, iterations, tol, converged);
    seconds: wall time of the solve (start, iterations, final residuals); rq `[L, K]` host: per-graph quotients
    xₖᵀ sym(P_l) xₖ in the operator's graph order; objective: Σ_k Σ_l w_l rq_{l,k}."""

    eigvals: np.ndarray
    eigvecs: jax.Array
    convergence: Convergence
    seconds: float
    rq: np.ndarray
    objective: float


def lobpcg(op: DistOperator, num_eigs: int, *, tol: float = TOL, maxiter: int = MAXITER, seed: int = 0,
           guard: int = GUARD, chunk: int = CHUNK) -> Solve:
    """Top-`num_eigs` eigenpairs of the sharded operator `op` by LOBPCG (module docstring): a block of
    num_eigs + guard vectors, at most `maxiter` iterations in compiled chunks of `chunk`, stopping when the first
    num_eigs relative residuals are all ≤ `tol`. A run that stops at maxiter above tol has converged False and
    warns. Deterministic for a given seed and mesh; every process of a multi-process mesh must call it (it returns
    the same host values on each). Does not gather the graph; the eigenvectors stay sharded (`gather_rows` brings
    them to the host)."""
    check_num_eigs(num_eigs, op.num_nodes)
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol} must be a positive relative residual, e.g. {TOL:.1e}")
    if int(maxiter) < 1 or int(chunk) < 1 or int(guard) < 0:
        raise ValueError(f"maxiter={maxiter}, chunk={chunk} must be ≥ 1 and guard={guard} ≥ 0")
    k = int(num_eigs)
    kb = max(k, min(k + int(guard), op.num_nodes // 3))          # the basis [X, R, P] has 3·kb ≤ N columns
    tol = float(tol)
    t0 = time.perf_counter()
    x0 = _start(op, kb, int(seed))
    state = _init(op, x0)
    done = lambda st: bool(jax.device_get(jnp.max(st["res"][:k]) <= tol))
    it = 0
    while it < maxiter and not done(state):
        it = min(it + int(chunk), int(maxiter))
        state = _chunk(op, state, jnp.asarray(it, jnp.int32), k, jnp.float32(tol))
    res = _final(op, state["x"], state["theta"])
    vecs = state["x"][:, :k]
    rq = _quotients(op, vecs)
    theta, res, rq, iters, lw = jax.device_get((state["theta"][:k], res[:k], rq, state["it"], op.lw))
    seconds = time.perf_counter() - t0
    res = np.asarray(res, np.float64)
    converged = bool(res.max() <= tol)
    if not converged:
        warnings.warn(f"distributed lobpcg: stopped at maxiter={maxiter} with max relative residual "
                      f"{res.max():.2e} > tol {tol:.1e}; raise maxiter or tol", RuntimeWarning, stacklevel=2)
    conv = Convergence(converged, int(iters), tol, "max_residual <= tol", float(res.max()), tuple(res))
    rq = np.asarray(rq, np.float32)
    return Solve(np.asarray(theta, np.float32), vecs, conv, seconds, rq,
                 float(np.sum(np.asarray(lw, np.float64)[:, None] * rq)))


def gather_rows(x: jax.Array, num_nodes: int | None = None) -> np.ndarray:
    """A row-sharded array (possibly over several processes) as one host array on every process, the first
    `num_nodes` rows (every process must call it). For the eigenvectors `[N, K]`: N·K floats, not the graph."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        out = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    else:
        out = np.asarray(x)
    return out if num_nodes is None else out[:num_nodes]


def to_result(sol: Solve, op: DistOperator, grid: tuple[int, int], num_images: int, *, method: str =
              "exact-lobpcg-distributed", info=None):
    """The `Result` of a distributed solve (as `exact` returns for the dataset's kNN groups): eigenvectors
    gathered to the host (N·K floats) and sorted largest first, signs fixed, per-group quotients shaped by
    `op.groups`. Every process must call it."""
    from spectral_jax.solvers.result import assemble

    vecs = gather_rows(sol.eigvecs, op.num_nodes)
    order = np.argsort(-sol.eigvals, kind="stable")
    rq, rqs, at = sol.rq[:, order], [], 0
    for shape in op.groups:
        m = int(np.prod(shape, dtype=np.int64))
        rqs.append(rq[at:at + m].reshape(*shape, -1))
        at += m
    c = sol.convergence
    conv = dataclasses.replace(c, residuals=tuple(np.asarray(c.residuals)[order]))
    return assemble(vecs[:, order], sol.eigvals[order], rqs, sol.objective, None, num_images, tuple(grid), steps=0,
                    seconds=sol.seconds, method=method, info=dict(info or {}, devices=op.devices,
                                                                  processes=jax.process_count()),
                    convergence=conv)


def layer_spectra(groups: Sequence[ShardedKnn], group_layers: Sequence[Sequence[int]], num_eigs: int,
                  **kw) -> np.ndarray:
    """Each layer's own top-K eigenvalues `[L, K]`, layers ascending (as `exact.layer_spectra`, which the
    layer-weight rules read): one distributed solve per layer on its graph alone (`ShardedKnn.select`), still
    sharded; kw go to `lobpcg`. Every process must call it."""
    where = {l: (g, j) for g, ls in zip(groups, group_layers) for j, l in enumerate(ls)}
    out = []
    for l in sorted(where):
        g, j = where[l]
        out.append(lobpcg(operator([g.select([j])]), num_eigs, **kw).eigvals)
    return np.stack(out)


__all__ = ["DistOperator", "ShardedKnn", "Solve", "from_rows", "gather_rows", "knn_sharded", "knn_tiled",
           "layer_spectra", "lobpcg", "operator", "padded_nodes", "shard_graph", "to_result"]
