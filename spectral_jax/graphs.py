"""Matrix-free affinity graphs: row-stochastic operators P that apply to vectors without forming N×N.

Every graph is a pytree with a `grid` (h, w), `num_images` (nodes = num_images·h·w, image-major, row-major
within an image), optional leading batch dims `S` (e.g. layers × heads — the graphs of one group share a grid),
and `matvec(z)` = P z, `rmatvec(z)` = Pᵀ z, `sym_matvec(z)` = ½(P + Pᵀ) z, `dense()` = P.

Precision: a graph stores its q/k (unit features, kNN inputs) in float32 or bfloat16 (`dtype=` of the builders,
`from_taps(dtype=)`; None keeps the input's dtype); whatever is stored, logits and cosines are accumulated in float32
and softmax, degrees, weights, P z and `dense()` are float32 (`spectral_jax.kernels`). Features are unit-normalised
in float32 before any cast to the storage dtype.

Shape legend
    S  batch dims of a graph group (layers, heads, ...)    N  nodes = num_images·h·w
    D  feature / head dim    K  vectors per matvec    k  neighbours per node (kNN graphs)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax import kernels
from spectral_jax.errors import InputError
from spectral_jax.options import TAU_MIN, tau_ok
from spectral_jax.options import GRAPH_KINDS

Array = Any
DEFAULT_BLOCK = 512


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


DENSE_QUADRATIC_MAX = 4096   # attention graphs up to this many nodes form their N×N for `quadratic(sequential=True)`


class _Batched:
    """Batching over the leading dims `S` of a graph's data leaves, shared by every graph type.

    Subclasses define `_matvec1`, `_rmatvec1`, `_dense1` for one graph (no batch dims), and `batch_shape`.
    """

    batch_shape: tuple[int, ...]

    @property
    def num_graphs(self) -> int:
        return int(np.prod(self.batch_shape, dtype=np.int64))

    @property
    def num_nodes(self) -> int:
        return self.num_images * self.grid[0] * self.grid[1]

    def _flat(self):
        s = len(self.batch_shape)
        return jax.tree.map(lambda x: x.reshape(self.num_graphs, *x.shape[s:]), self)

    def _map(self, fn, z: Array | None) -> Array:
        """Apply `fn(graph1, z)` to every graph in the batch; result gets the batch dims back."""
        z = None if z is None else jnp.asarray(z)
        if not self.batch_shape:
            return fn(self, z)
        out = jax.vmap(fn, in_axes=(0, None))(self._flat(), z)
        return out.reshape(*self.batch_shape, *out.shape[1:])

    def matvec(self, z: Array) -> Array:
        """P z: z `[N, K]` → `[*S, N, K]`."""
        return self._map(type(self)._matvec1, z)

    def rmatvec(self, z: Array) -> Array:
        """Pᵀ z: z `[N, K]` → `[*S, N, K]`."""
        return self._map(type(self)._rmatvec1, z)

    def sym_matvec(self, z: Array) -> Array:
        """½(P + Pᵀ) z: z `[N, K]` → `[*S, N, K]`."""
        return 0.5 * (self.matvec(z) + self.rmatvec(z))

    def quadratic(self, z: Array, sequential: bool = False) -> Array:
        """zₖᵀ P zₖ for each column: z `[N, K]` → `[*S, K]` (= zᵀ sym(P) z).

        sequential False: every graph at once (`vmap`, as `matvec`); True: one graph after the other (`lax.map`:
        one graph's working set stays in cache, where a batch of [S, N, N]-sized tiles does not), each by its
        fastest single-graph route (`_quadratic1`: a small attention graph applied densely). Both differentiable.
        """
        z = jnp.asarray(z)
        if not sequential:
            return jnp.einsum("nk,...nk->...k", z, self.matvec(z))
        if not self.batch_shape:
            return self._quadratic1(z)
        r = jax.lax.map(lambda g1: g1._quadratic1(z), self._flat())
        return r.reshape(*self.batch_shape, r.shape[-1])

    def _quadratic1(self, z: Array) -> Array:
        return jnp.einsum("nk,nk->k", z, self._matvec1(z))

    def dense(self) -> Array:
        """P materialised, `[*S, N, N]` — for small N (tests, the exact solver's fast path)."""
        return self._map(lambda g, _: g._dense1(), None)

    def select(self, idx: Array) -> "_Batched":
        """The graphs at flat batch indices `idx` `[m]` (a group with batch shape `(m,)`)."""
        flat = self._flat()
        return dataclasses.replace(jax.tree.map(lambda x: x[idx], flat), batch_shape=(idx.shape[0],))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionGraph(_Batched):
    """P = softmax(scale · q kᵀ) row-wise; q, k `[*S, N, D]`. Applied blockwise with an online softmax."""

    q: Array
    k: Array
    grid: tuple[int, int] = _static()
    scale: float = _static()
    batch_shape: tuple[int, ...] = _static(())
    num_images: int = _static(1)
    block: int = _static(DEFAULT_BLOCK)

    def _matvec1(self, z):
        return kernels.attention_matmul(self.q, self.k, z, self.scale, self.block)

    def _rmatvec1(self, z):
        lse = kernels.row_lse(self.q, self.k, self.scale, self.block)
        return kernels.softmax_apply(self.q, self.k, lse, z, self.scale, self.block, transpose=True)

    def sym_matvec(self, z):
        def one(g, z):
            pz, lse = kernels.softmax_matmul(g.q, g.k, z, g.scale, g.block)
            return 0.5 * (pz + kernels.softmax_apply(g.q, g.k, lse, z, g.scale, g.block, transpose=True))

        return self._map(one, z)

    def _dense1(self):
        return jax.nn.softmax(kernels.logits(self.q, self.k, self.scale), axis=-1)      # float32

    def _quadratic1(self, z):
        """zᵀ P z of one graph: up to `DENSE_QUADRATIC_MAX` nodes P z is (e z) / (e 1) with e = exp(L − max L) formed
        whole (a transient N×N, never normalised; faster than the blocked online softmax at these sizes), above it
        the blocked product."""
        if self.num_nodes > DENSE_QUADRATIC_MAX:
            return super()._quadratic1(z)
        logits = (self.scale * self.q) @ self.k.T                                # [N, N]
        e = jnp.exp(logits - logits.max(axis=1, keepdims=True))
        return jnp.einsum("nk,nk->k", z, (e @ z) / e.sum(axis=1)[:, None])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseGraph(_Batched):
    """An explicit row-stochastic P `[*S, N, N]` (tests, cached small graphs, user-supplied affinities)."""

    p: Array
    grid: tuple[int, int] = _static()
    batch_shape: tuple[int, ...] = _static(())
    num_images: int = _static(1)

    def _matvec1(self, z):
        return self.p @ z

    def _rmatvec1(self, z):
        return self.p.T @ z

    def _dense1(self):
        return self.p


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnnGraph(_Batched):
    """P = D⁻¹ S with S = ½(A + Aᵀ) the symmetrised sparse kNN affinity; A stored as `[N, k]` indices/weights.

    idx `[*S, N, k]` int32, w `[*S, N, k]` (0 for dropped edges), deg `[*S, N]` row sums of S.
    """

    idx: Array
    w: Array
    deg: Array
    grid: tuple[int, int] = _static()
    batch_shape: tuple[int, ...] = _static(())
    num_images: int = _static(1)

    def _a(self, z):          # A z: one gather per neighbour slot, O(N·K) memory (never [N, k, K])
        def add(acc, slot):
            idx, w = slot
            return acc + w[:, None] * z[idx], None

        return jax.lax.scan(add, jnp.zeros_like(z), (self.idx.T, self.w.T))[0]

    def _at(self, z):         # Aᵀ z: one scatter-add per neighbour slot
        def add(acc, slot):
            idx, w = slot
            return acc.at[idx].add(w[:, None] * z), None

        return jax.lax.scan(add, jnp.zeros_like(z), (self.idx.T, self.w.T))[0]

    def _inv_deg(self):
        return jnp.where(self.deg > 0, 1.0 / jnp.where(self.deg > 0, self.deg, 1.0), 0.0)

    def _matvec1(self, z):
        return self._inv_deg()[:, None] * 0.5 * (self._a(z) + self._at(z))

    def _rmatvec1(self, z):
        y = self._inv_deg()[:, None] * z
        return 0.5 * (self._a(y) + self._at(y))

    def _dense1(self):
        n = self.idx.shape[0]
        a = jnp.zeros((n, n), self.w.dtype).at[jnp.arange(n)[:, None], self.idx].add(self.w)
        return self._inv_deg()[:, None] * 0.5 * (a + a.T)


Graph = Union[AttentionGraph, DenseGraph, KnnGraph]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def storage_dtype(dtype, what: str = "dtype"):
    """The jnp dtype a graph stores its q/k / features in: "float32", "bfloat16" (or those jnp dtypes), or None (the
    input's). Anything else is an `InputError` naming `what`."""
    if dtype is None:
        return None
    try:
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise InputError(f"{what} {dtype!r}", "is not a graph storage dtype", f"choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _store(x: Array, dtype) -> Array:
    """x (stop-gradient) in the storage dtype (None: as is)."""
    x = jax.lax.stop_gradient(jnp.asarray(x))
    return x if dtype is None else x.astype(dtype)


def _unit(x: Array, dtype) -> Array:
    """Rows of x unit-normalised in float32, then stored as `dtype` (None: x's dtype)."""
    x = jax.lax.stop_gradient(jnp.asarray(x))
    return kernels.unit_rows(x.astype(jnp.float32)).astype(x.dtype if dtype is None else dtype)


def _narrowed(x: Array, dtype) -> Array:
    """x stored as `dtype` (None: as is) for a cosine search: a cast that loses precision is preceded by a float32
    unit-normalisation (cosines do not depend on the rows' lengths); other casts are plain."""
    x = _store(x, None)
    if dtype is None or x.dtype == dtype:
        return x
    return _unit(x, dtype) if jnp.finfo(dtype).bits < jnp.finfo(x.dtype).bits else x.astype(dtype)


def _check_grid(x, grid, num_images, what):
    grid = (int(grid[0]), int(grid[1]))
    if x.shape[-2] != num_images * grid[0] * grid[1]:
        raise ValueError(f"{what} has {x.shape[-2]} tokens but grid {grid} × {num_images} image(s) needs "
                         f"{num_images * grid[0] * grid[1]}")
    return grid


def attention(q: Array, k: Array, grid: tuple[int, int], scale: float | None = None,
              block: int = DEFAULT_BLOCK, *, dtype=None) -> AttentionGraph:
    """The attention graph P = softmax(q kᵀ/√D) of raw q/k projections `[*S, N, D]` (patch tokens only).

    `scale` defaults to 1/√D, as in the network; `block` is the tile size of the blocked kernels; dtype: the
    storage dtype of q/k ("float32", "bfloat16"; None: as given — bfloat16 q/k are taken as is). Logits and
    softmax are float32 either way.
    """
    dtype = storage_dtype(dtype)
    q, k = _store(q, dtype), _store(k, dtype)
    if q.shape != k.shape:
        raise ValueError(f"q {q.shape} and k {k.shape} must have the same shape [*S, N, D]")
    grid = _check_grid(q, grid, 1, "q")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return AttentionGraph(q, k, grid, scale, tuple(q.shape[:-2]), 1, int(block))


def features(x: Array, grid: tuple[int, int], tau: float = 0.1, block: int = DEFAULT_BLOCK, *,
             dtype=None) -> AttentionGraph:
    """P_ij ∝ exp(cos(x_i, x_j)/τ), row-normalised, for token features x `[*S, N, D]` (hidden states, values).

    The same blocked kernel as `attention`, with q = k = x/‖x‖ (normalised in float32, then stored as `dtype`:
    "float32", "bfloat16", None for x's dtype) and scale 1/τ.
    """
    dtype = storage_dtype(dtype)
    try:                                # a number (not text, a bool or None), finite and > 0
        t = float("nan") if isinstance(tau, (str, bytes, bool, np.bool_)) else float(tau)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and tau_ok(t)):
        raise InputError(f"tau={tau!r}", f"must be a positive number ≥ {TAU_MIN:.3g} (1/tau, the graph's scale, a "
                         "finite float32)", "pass e.g. tau=0.1")
    x = jnp.asarray(x)
    grid = _check_grid(x, grid, 1, "x")
    xn = _unit(x, dtype)
    return AttentionGraph(xn, xn, grid, 1.0 / float(tau), tuple(x.shape[:-2]), 1, int(block))


def value(v: Array, grid: tuple[int, int], tau: float = 0.1, block: int = DEFAULT_BLOCK, *,
          dtype=None) -> AttentionGraph:
    """The value graph: P_ij ∝ exp(cos(v_i, v_j)/τ), row-normalised; v `[*S, N, D]` (dtype as in `features`)."""
    return features(v, grid, tau, block, dtype=dtype)


def knn(a: Array, b: Array, grid: tuple[int, int], num_images: int = 1, k_intra: int = 50, k_inter: int = 0,
        min_cos: float = 0.1, block: int = DEFAULT_BLOCK, *, valid: Array | None = None, mesh=None,
        axis: str = "data", dtype=None, search="auto", info: bool = False):
    """Sparse kNN graph over all tokens of `num_images` images: a, b `[*S, N, D]`, N = num_images·h·w.

    Edges i→j for the `k_intra` largest cos(a_i, b_j) within i's image and the `k_inter` largest in other images,
    dropped where cos ≤ `min_cos`; then S = ½(A + Aᵀ) (implicit) and P = D⁻¹ S. QK graph: a = q, b = k;
    VV graph: a = b = v. valid `[num_images]` bool (default all): a False image (a padded batch slot, an unreadable
    file) has no edges and is nobody's neighbour. mesh: rows split over its `axis` under `shard_map` — each device
    searches its own images' tokens against all tokens (keys all-gathered), then every device gets the whole graph;
    num_images must be a multiple of the devices on `axis`. Callable under `jit` (a, b, valid traced).
    dtype: the search's storage dtype of a, b ("float32", "bfloat16": unit-normalised in float32 first, then cast;
    None: as given); cosines, weights and degrees are float32 either way.
    search: how the inter-image neighbours are found — "exact" (blockwise brute force, O(N²)), "ivf" (approximate
    inverted-file search in JAX, `spectral_jax.knn_search`), "faiss" (faiss IVF on the host; not under `jit`), "auto"
    (default: exact below `knn_search.AUTO_MIN_COLUMNS` nodes, under `jit` or with a mesh; above, the checked search
    of `knn_search.auto_search` — faiss on the CPU where installed, else the IVF: searched again with more cells until
    its sampled recall of every graph reaches `knn_search.AUTO_MIN_RECALL`, or exact), or a `knn_search.Search` (its
    nlist, nprobe, seed, probe — per row or per row cell —, min_recall, ...). The intra-image search is always exact;
    an approximate search may miss inter-image neighbours (its recall is measured, below).
    info: also return a dict — search (the kind used), recall (`[*S]` float32: the share of the exact inter-image
    top-k found, on a seeded sample of rows, `knn_search.recall`; 1 for exact), the IVF sizes (`knn_search.plan`)
    and probe, and for a checked search its tries ([{nprobe, recall: the lowest over the graphs}]) and min_recall — as
    `(graph, info)`.
    """
    from spectral_jax import knn_search

    dtype = storage_dtype(dtype)
    same = a is b                                   # a VV graph: the rows are the columns (the IVF reuses their lists)
    a, b = _narrowed(a, dtype), _narrowed(b, dtype)
    if a.shape != b.shape:
        raise ValueError(f"a {a.shape} and b {b.shape} must have the same shape [*S, N, D]")
    grid = _check_grid(a, grid, num_images, "a")
    per = grid[0] * grid[1]
    if not 0 <= k_intra <= per:
        raise InputError(f"k_intra={k_intra}", f"must be in [0, {per}] (tokens per image)", f"pass k_intra ≤ {per}")
    if not 0 <= k_inter <= (num_images - 1) * per:
        raise InputError(f"k_inter={k_inter}", f"must be in [0, {(num_images - 1) * per}] (tokens in other images)",
                         "pass a smaller k_inter")
    if k_intra + k_inter == 0:
        raise InputError("k_intra + k_inter", "must be positive (the graph would have no edges)",
                         "pass e.g. k_intra=10")
    if not -1.0 <= min_cos < 1.0:
        raise InputError(f"min_cos={min_cos}", "must be a cosine in [-1, 1)", "pass e.g. min_cos=0.1")
    if mesh is not None and num_images % int(mesh.shape[axis]):
        d = int(mesh.shape[axis])
        raise InputError(f"num_images={num_images}", f"is not a multiple of the mesh's {d} devices on {axis!r} (each "
                         "device searches whole images)", f"pad the batch to {-(-num_images // d) * d} images "
                         "(valid= False for the padding) or use fewer devices")
    n = a.shape[-2]
    concrete = not any(isinstance(x, jax.core.Tracer) for x in (a, b, valid))
    sr = knn_search.resolve(search, n, concrete, mesh) if k_inter > 0 else knn_search.Search("exact")
    valid = jnp.ones((num_images,), bool) if valid is None else jnp.asarray(valid, bool)
    batch = tuple(a.shape[:-2])
    a2 = a.reshape(-1, *a.shape[-2:])
    b2 = a2 if same else b.reshape(-1, *b.shape[-2:])
    tries = []
    kept = [{} for _ in range(a2.shape[0])]         # faiss: each graph's centroids and lists, kept between tries
    truth = None                                    # the recall sample's exact search, kept between tries
    while True:                     # once, or (a checked search: min_recall) until the sampled recall reaches it
        inter = None
        if sr.kind == "faiss":
            img = np.arange(n) // per
            ok = np.asarray(valid)[img]
            found = [knn_search.faiss_topk(kernels.unit_rows(ai), kernels.unit_rows(bi), img, img, ok, int(k_inter),
                                           sr, same=same, cache=ck) for ai, bi, ck in zip(a2, b2, kept)]
            inter = (jnp.asarray(np.stack([f[0] for f in found])), jnp.asarray(np.stack([f[1] for f in found])))
        checked = sr.kind in ("ivf", "faiss") and sr.min_recall is not None
        want = (info or checked) and sr.kind != "exact"     # the raw cosines leave the program only for the recall
        g, cos = _build_knn(a2, b2, valid, grid, num_images, batch, int(k_intra), int(k_inter), float(min_cos),
                            int(block), mesh, axis, sr, want, inter, same)
        if sr.kind == "exact":
            rec = jnp.ones(batch, jnp.float32)
        elif want and sr.recall_rows == 0:
            rec = jnp.full(batch, jnp.nan, jnp.float32)
        elif want:
            if truth is None:       # the tries share one (`next_try` keeps recall_rows and the seed)
                truth = _recall_truth(a2, b2, valid, per, int(k_inter), sr.recall_rows, sr.seed)
            rec = _recall_of(cos[..., int(k_intra):], truth).reshape(batch)
        if not checked:
            break
        low = float(jnp.min(rec))
        tries.append({"nprobe": knn_search.plan(n, int(k_inter), sr)["nprobe"], "recall": round(low, 6)})
        if low >= sr.min_recall:
            break
        sr = knn_search.next_try(n, int(k_inter), sr)
    if not info:
        return g
    out = dict(search=sr.kind, recall=rec)
    if sr.kind != "exact":
        out.update(knn_search.plan(n, int(k_inter), sr), seed=sr.seed, recall_rows=min(sr.recall_rows, n),
                   probe=sr.probe)
    if tries:
        out.update(tries=tries, min_recall=sr.min_recall)
    return g, out


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _recall_truth(a, b, valid, per: int, k: int, rows: int, seed: int):
    """`knn_search.recall_truth` of every graph `[G, N, D]` (stacked over G: pick `[G, r]`, kth `[G, r, 1]`, want
    `[G, r]`); rows ≥ 1. The exact search of the sampled rows: computed once for all the tries of a checked search."""
    from spectral_jax import knn_search

    img = jnp.arange(a.shape[1], dtype=jnp.int32) // per
    return jax.lax.map(lambda x: knn_search.recall_truth(kernels.unit_rows(x[0]), kernels.unit_rows(x[1]), img, img,
                                                         valid[img], k, rows, seed), (a, b))


@jax.jit
def _recall_of(cos, truth):
    """`knn_search.recall_of` of every graph's inter-image top-k cos `[G, N, k]` against `_recall_truth` → `[G]`."""
    from spectral_jax import knn_search

    return jax.lax.map(lambda x: knn_search.recall_of(x[0], x[1]), (cos, truth))


def _knn_rows(a, b_own, b, row0, valid, per: int, k_intra: int, k_inter: int, min_cos: float, block: int,
              search=None, inter=None, same=False):
    """Edges of the rows `row0 …` (whole images) of every graph: a `[G, r, D]` those rows' features, b_own
    `[G, r, D]` the same images' columns, b `[G, N, D]` all columns → idx, w `[G, r, k_intra + k_inter]` (w = 0: a
    dropped edge or an invalid image's). The intra-image search sees only the own image's columns
    (`kernels.topk_intra`), the inter-image one all columns with the own image masked (`kernels.topk_inter`); one
    graph at a time (`lax.map`: the memory of one search). search: a resolved `knn_search.Search` ("ivf": the
    inter-image search by `knn_search.ivf_topk`); inter: precomputed inter-image (idx, cos) `[G, r, k_inter]` (the
    faiss search) instead of a search here; same: a is b (all rows; the IVF then reuses the columns' lists for the
    rows). Also returns the raw cosines `[G, r, k]` (−inf: no candidate)."""
    from spectral_jax import knn_search

    rows = row0 + jnp.arange(a.shape[1], dtype=jnp.int32)
    col_img = jnp.arange(b.shape[1], dtype=jnp.int32) // per
    row_img = rows // per

    def one(ab):
        ai, oi, bi = (kernels.unit_rows(x) for x in ab[:3])
        bi = ai if same else bi
        i_s, c_s = kernels.topk_intra(ai, oi, per, k_intra)
        if inter is not None:
            i_o, c_o = ab[3], ab[4]
        elif search is not None and search.kind == "ivf":
            i_o, c_o = knn_search.ivf_topk(ai, bi, row_img, col_img, valid[col_img], k_inter, search)
        else:
            i_o, c_o = kernels.topk_inter(ai, bi, row_img, col_img, valid[col_img], k_inter, block)
        return jnp.concatenate([i_s + row0, i_o], axis=1), jnp.concatenate([c_s, c_o], axis=1)

    idx, cos = jax.lax.map(one, (a, b_own, b) + (() if inter is None else tuple(inter)))
    return idx, jnp.where((cos > min_cos) & valid[row_img][None, :, None], cos, 0.0), cos


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15))
def _build_knn(a, b, valid, grid, num_images, batch, k_intra, k_inter, min_cos, block, mesh, axis, search, want_cos,
               inter, same=False):
    kw = dict(per=grid[0] * grid[1], k_intra=k_intra, k_inter=k_inter, min_cos=min_cos, block=block)
    if mesh is None:
        idx, w, cos = _knn_rows(a, b, b, 0, valid, search=search, inter=inter, same=same, **kw)
    else:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        def local(a_loc, b_loc, valid):
            b_all = jax.lax.all_gather(b_loc, axis, axis=1, tiled=True)
            row0 = jax.lax.axis_index(axis) * a_loc.shape[1]
            return _knn_rows(a_loc, b_loc, b_all, row0, valid, **kw)

        idx, w, cos = jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P(None, axis), P()),
                                    out_specs=(P(None, axis), P(None, axis), P(None, axis)))(a, b, valid)
        rep = NamedSharding(mesh, P())
        idx, w = jax.lax.with_sharding_constraint(idx, rep), jax.lax.with_sharding_constraint(w, rep)
    deg = 0.5 * (w.sum(-1) + jax.vmap(lambda i, x: jnp.zeros(i.shape[0], x.dtype).at[i.reshape(-1)].add(
        x.reshape(-1)))(idx, w))
    un = lambda x: x.reshape(*batch, *x.shape[1:])
    return KnnGraph(un(idx), un(w), un(deg), grid, batch, num_images), (cos if want_cos else None)


EDGES = ("cosine", "rbf")      # kNN edge weights: the cosine (the paper's recipe) or an RBF of the distance
SIGMA_PAIRS = 4000              # token pairs whose median distance is the RBF's σ (ncut-pytorch's rule)


def sigma_pairs(valid_rows: Array, seed: int, pairs: int = SIGMA_PAIRS) -> tuple[Array, Array]:
    """Seeded random row pairs (i, j) `[pairs]` int32, both drawn uniformly (with replacement) from the rows where
    valid_rows `[N]` is True (`jax.random.choice` under `jax.random.key(seed)`: the same pairs for the same N, mask
    and seed, on any backend). A pair may have i == j: `median_sigma` leaves it out. Every row invalid: pairs of
    row 0 (σ is then NaN)."""
    valid_rows = jnp.asarray(valid_rows, bool)
    p = valid_rows.astype(jnp.float32)
    p = jnp.where(p.sum() > 0, p / jnp.maximum(p.sum(), 1.0), jnp.zeros_like(p).at[0].set(1.0))
    ij = jax.random.choice(jax.random.key(seed), valid_rows.shape[0], (2, pairs), p=p)
    return ij[0].astype(jnp.int32), ij[1].astype(jnp.int32)


def median_sigma(xi: Array, xj: Array, same: Array | None = None) -> Array:
    """ncut-pytorch's median σ: the median Euclidean distance between the unit-normalised rows xi, xj
    `[*S, pairs, F]` (a pair's two tokens) → `[*S]` float32, pairs marked in same `[pairs]` (i == j) left out.
    Does not sample: `sigma_pairs` gives the pairs."""
    u, v = kernels.unit_rows(jnp.asarray(xi, jnp.float32)), kernels.unit_rows(jnp.asarray(xj, jnp.float32))
    d = jnp.linalg.norm(u - v, axis=-1)
    if same is not None:
        d = jnp.where(same, jnp.nan, d)
    return jnp.nanmedian(d, axis=-1).astype(jnp.float32)


def rbf_edges(g: KnnGraph, sigma: Array) -> KnnGraph:
    """The kNN graph `g` with each kept edge's weight (w ≠ 0, w = the cosine, as `knn` stores it) replaced by
    exp(−d² / (2σ²)), d² = 2 − 2 cos the squared distance of the unit features, and the degrees recomputed; σ
    `[*S]` one per graph (`median_sigma`). The edges themselves (which neighbours, which dropped) do not change.
    A kept edge of cosine exactly 0 is indistinguishable from a dropped one and stays dropped."""
    s = jnp.asarray(sigma, jnp.float32)[..., None, None]
    w = jnp.where(g.w != 0, jnp.exp(-(2.0 - 2.0 * g.w) / (2.0 * s * s)), 0.0).astype(g.w.dtype)
    return dataclasses.replace(g, w=w, deg=edge_degrees(g.idx, w))


@jax.jit
def edge_degrees(idx: Array, w: Array) -> Array:
    """The row sums of ½(A + Aᵀ) `[*S, N]` of a kNN graph's idx, w `[*S, N, k]` (as `knn` computes them)."""
    flat_i, flat_w = idx.reshape(-1, *idx.shape[-2:]), w.reshape(-1, *w.shape[-2:])
    deg = 0.5 * (flat_w.sum(-1) + jax.vmap(lambda i, x: jnp.zeros(i.shape[0], x.dtype).at[i.reshape(-1)].add(
        x.reshape(-1)))(flat_i, flat_w))
    return deg.reshape(w.shape[:-1])


def other_edges(idx, w, xp=jnp):
    """How many edges of a kNN graph's stored idx, w `[*S, N, k]` are kept (w > 0) between two distinct tokens
    (a token's own edge, which knn-vv keeps, not counted): a scalar. xp: the array module — `jnp` (inside a
    jitted step) or `np` (on the host, where a compile per graph shape would cost more than the pass). 0 where every
    neighbour's cosine was at or below min_cos. int64 on the host (a gathered graph's count can pass 2³¹)."""
    own = idx == xp.arange(idx.shape[-2], dtype=idx.dtype)[:, None]
    return xp.sum((w > 0) & ~own, dtype=np.int64 if xp is np else jnp.int32)


def weight_edges(g: KnnGraph, a: Array, edges: str, seed: int, valid_rows: Array | None = None
                 ) -> tuple[KnnGraph, Array | None]:
    """The kNN graph `g` (built by `knn` from features a `[*S, N, F]`) with its edge weights as `edges` says:
    "cosine" returns it as it is (σ None); "rbf" returns `rbf_edges(g, σ)` with σ `[*S]` the median distance of
    `sigma_pairs(valid_rows, seed)` (the same pairs for every graph; valid_rows `[N]` bool, None: all rows) of a's
    rows (`median_sigma`). a may be sharded; nothing is gathered but the sampled rows."""
    if edges not in EDGES:
        raise InputError(f"edges {edges!r}", "is not an edge weighting", f"choose one of {', '.join(EDGES)}")
    if edges == "cosine":
        return g, None
    n = a.shape[-2]
    i, j = sigma_pairs(jnp.ones(n, bool) if valid_rows is None else valid_rows, seed)
    sigma = median_sigma(jnp.take(a, i, axis=-2), jnp.take(a, j, axis=-2), i == j)
    return rbf_edges(g, sigma), sigma


DEGENERATE_TOL = 1e-5   # `degenerate_gaps` below it: P is the identity (or uniform) to float32
DEGENERATE_ROWS = 16    # the rows `degenerate_gaps` reads per graph


def degenerate_gaps(g: "AttentionGraph", rows: int = DEGENERATE_ROWS) -> Array:
    """How far each attention graph in `g` is from the two graphs a solve can say nothing of, `[*S, 2]`, read from
    `rows` evenly spaced rows, each row's softmax formed whole (its logits against every token, the diagonal among
    them: `rows`·N·D work per graph, no N×N):

    - [..., 0] the identity: the most weight a row puts on tokens other than its own, 1 − P_ii. 0 when the rows put
      all their weight on themselves (P = I to float32: every vector is an eigenvector — vv with 1/τ too large for
      the features' cosines). vv on 256 random 32-d features: 0 at τ = 1e-3, 2e-3–3e-2 at 1e-2, 0.98 at 0.1.
    - [..., 1] the uniform graph: the largest N·(max_j P_ij − min_j P_ij) of the rows. 0 when every row is 1/N to
      float32 (P = 11ᵀ/N: every vector orthogonal to the constant is an eigenvector, at 0 — vv with 1/τ too small
      to tell the cosines apart). The same features: 0 at τ = 1e8, 3e-7–4e-7 at 1e6, 0.03–0.04 at 10, 5–14 at 0.1.

    NaN where the softmax is. Says nothing of structure beyond that."""

    def one(g1, _):
        n = g1.q.shape[0]
        idx = jnp.asarray(np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(np.int32)))
        p = jax.nn.softmax(kernels.logits(g1.q[idx], g1.k, g1.scale), axis=-1)         # [rows, N]
        off = jnp.max(1.0 - p[jnp.arange(idx.shape[0]), idx])
        flat = jnp.max(n * (jnp.max(p, axis=-1) - jnp.min(p, axis=-1)))
        return jnp.stack([off, flat])

    return g._map(one, None)


def dense(p: Array, grid: tuple[int, int], num_images: int = 1) -> DenseGraph:
    """Wrap an explicit row-stochastic P `[*S, N, N]` as a graph (N = num_images·h·w). Checks the shape (square,
    the grid's N) only: rows that do not sum to 1 are taken as they are (the solvers symmetrise whatever P is)."""
    p = jnp.asarray(p)
    if p.ndim < 2 or p.shape[-1] != p.shape[-2]:
        raise InputError(f"P {tuple(p.shape)}", "is not square in its last two axes ([*S, N, N])",
                         "pass one N × N transition matrix per graph")
    grid = _check_grid(p, grid, num_images, "P")
    return DenseGraph(p, grid, tuple(p.shape[:-2]), num_images)


KNN_KINDS = ("knn-qk", "knn-vv")


def group_layers(taps) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    """Layers that can share one graph group — the same grid and the same q/k/v shapes — as
    [(grid, (layer, ...)), ...] in layer order. `taps` may hold arrays or `jax.ShapeDtypeStruct`s (`eval_shape`)."""
    groups: dict[tuple, list] = {}
    for i in sorted(taps.layers):
        t = taps.layers[i]
        groups.setdefault((tuple(t.grid), t.q.shape[1:], t.v.shape[1:]), []).append(i)
    return [(key[0], tuple(ls)) for key, ls in groups.items()]


def merge_heads(x: Array) -> Array:
    """`[B, H, N, D]` → `[B·N, H·D]`: every image's tokens as nodes (image-major), heads concatenated."""
    x = jnp.asarray(x)
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0] * x.shape[2], -1)


def knn_inputs(layer_taps, kind: str, steps: int | None = None) -> tuple[Array, Array]:
    """(a, b) of the kNN graph `kind` over `LayerTap`s that share a grid: q vs k for knn-qk, v vs v for knn-vv.

    steps None: heads concatenated, `[L, B·N, H'·D]` (H' the heads axis as tapped — for diffusion taps the T·H
    graphs of every timestep; `split_timesteps` cuts these features into the timesteps' own, exactly). steps T
    (the taps' timesteps, T divides the heads axis, timestep-major as `Taps.timesteps` says): one graph's inputs per
    (layer, timestep), that timestep's H heads concatenated, `[L, T, B·N, H·D]`."""
    if kind == "knn-qk":
        a = jnp.stack([merge_heads(t.q) for t in layer_taps])
        b = jnp.stack([merge_heads(t.k) for t in layer_taps])
    else:
        a = b = jnp.stack([merge_heads(t.v) for t in layer_taps])
    if steps is None:
        return a, b
    split = split_timesteps(a, steps)
    return split, split if b is a else split_timesteps(b, steps)


def split_timesteps(x: Array, steps: int) -> Array:
    """Merged features `[L, M, T·F]` (`knn_inputs` with steps None: the T·H heads of diffusion taps concatenated,
    timestep-major) → `[L, T, M, F]`, each timestep's heads (F = H·D) on their own; numpy in, numpy out (a host
    copy), jax likewise. T must divide the feature width (else ValueError)."""
    steps = int(steps)
    l, m, f = x.shape
    if steps < 1 or f % steps:
        raise ValueError(f"{steps} timesteps do not divide the merged feature width {f}")
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.swapaxes(xp.reshape(x, (l, m, steps, f // steps)), 1, 2)


def timestep_count(taps) -> int | None:
    """T of diffusion taps (`Taps.timesteps`), None for taps without timesteps (a ViT's: one graph per layer)."""
    return len(taps.timesteps) if getattr(taps, "timesteps", ()) else None


def clamp_k(k_intra: int, k_inter: int, grid: tuple[int, int], num_images: int) -> tuple[int, int]:
    """(k_intra, k_inter) capped by the tokens available: an image's h·w, and the other images'
    (num_images − 1)·h·w (so one image gets no inter-image edges)."""
    per = int(grid[0]) * int(grid[1])
    return min(int(k_intra), per), min(int(k_inter), (int(num_images) - 1) * per)


def from_taps(taps, kind: str, *, image: int | None = 0, tau: float = 0.1, k_intra: int = 50,
              k_inter: int = 50, min_cos: float = 0.1, block: int = DEFAULT_BLOCK,
              dtype: str = "float32") -> list[Graph]:
    """Graph groups from `spectral_jax.taps.Taps`: layers whose q/k/v share a grid and shape are stacked
    (`group_layers`).

    qk: attention(q, k) `[L, H, N, D]` per group, for image `image`; vv: value(v, tau) likewise;
    knn-qk / knn-vv: one kNN graph per layer over all B images' tokens (`knn_inputs`: `[L, B·N, H·D]`),
    `k_intra` neighbours within the image and `k_inter` in other images, each capped by the tokens available
    (`clamp_k`); for diffusion taps (`taps.timesteps`: T timesteps folded into the heads axis) one kNN graph per
    (layer, timestep), that timestep's H heads concatenated, a group of batch shape `[L, T]`. dtype: what the graphs store q/k, unit v and the kNN features in — "float32" (default, also for
    bfloat16 taps of a bfloat16 forward) or "bfloat16" (half the memory; logits, cosines, softmax and P z stay
    float32, see the module docstring).
    """
    if kind not in GRAPH_KINDS:
        raise InputError(f"graph {kind!r}", "unknown graph kind", f"choose one of {', '.join(GRAPH_KINDS)}")
    dtype = storage_dtype(dtype, "graph dtype")
    taps = taps.patches()
    out = []
    for grid, layers in group_layers(taps):
        ts = [taps.layers[i] for i in layers]
        if kind in ("qk", "vv"):
            if image is None or not 0 <= image < ts[0].q.shape[0]:
                raise ValueError(f"image={image} out of range for a batch of {ts[0].q.shape[0]}")
            if kind == "qk":
                out.append(attention(jnp.stack([t.q[image] for t in ts]), jnp.stack([t.k[image] for t in ts]),
                                     grid, block=block, dtype=dtype))
            else:
                out.append(value(jnp.stack([t.v[image] for t in ts]), grid, tau=tau, block=block, dtype=dtype))
            continue
        nimg = ts[0].q.shape[0]
        ki, ko = clamp_k(k_intra, k_inter, grid, nimg)
        out.append(knn(*knn_inputs(ts, kind, timestep_count(taps)), grid, nimg, k_intra=ki, k_inter=ko,
                       min_cos=min_cos, block=block, dtype=dtype))
    return out
