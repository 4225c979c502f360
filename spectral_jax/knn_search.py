"""Approximate top-k cosine search for the kNN graphs: an inverted-file (IVF) index in JAX, or faiss on the CPU.

`graphs.knn` searches every row's neighbours among the tokens of *other* images (the inter-image part, the one that
grows with the dataset) either exactly (`kernels.topk_inter`, O(R·C)) or with one of the approximate searches here;
the intra-image part is small and always exact.

IVF (`ivf_topk`, JAX: jitted, fixed shapes, CPU and accelerators):
  1. coarse centroids: spherical k-means (`kmeans`) of a seeded sample of the columns, `iters` Lloyd steps;
  2. every column goes to its nearest centroid's list; a list longer than `cap` is split into several *cells* of
     ≤ cap columns that share its centroid (so every cell has the same fixed capacity, padded with −1);
  3. probe="list": the rows are grouped the same way (a is b: the rows' lists are the columns' own) — every row
     joins the lists of its `row_lists` nearest centroids (default 1), cut into row cells of ≤ cap rows — and every
     row cell probes the `nprobe` cells nearest its list's centroid: exact re-ranking as one [cap, D]·[D, nprobe·cap]
     product and one top-k per row cell (`top_k_grouped`: by the maxima of groups of 8 first) (memory O(cells·cap·k)
     for the per-cell results, O(cap·nprobe·cap) per cell);
     probe="row" (default): every row probes the `nprobe` cells whose centroids are nearest to the row itself; exact
     re-ranking cell-major: the (row, cell) pairs are grouped by cell into work items of ≤ `qc` rows, each one
     [qc, D]·[D, cap] product and one `top_k`; the per-pair candidates are merged per row with one more `top_k`.
     Rows go in batches of a fixed size (memory O(batch·nprobe·k + cells·cap)). At the same nprobe it finds more
     (each row's own nearest cells, not its list's) but costs more per candidate (small products, gathers,
     scatters); "list" pays off where lists are long and follow the data's clusters (large C), and misses rows near
     list borders where lists are short (small C).
  Masks as in the exact search: a column of the row's own group (image) or a column with `col_ok` False is never a
  neighbour. It does not promise the exact result: a neighbour in an unprobed cell is missed. Steps 1–2 are
  `ivf_index` (an `Index`); the sharded path builds one per device over its own columns and passes them round the
  mesh, probing "list" (`distributed.knn_tiled`'s search).
faiss (`faiss_topk`, optional `faiss-cpu`, host only — not under `jit`): `IndexIVFFlat` with inner product on the
  same nlist / nprobe, trained on the same seeded sample size; the own group is left out by over-fetching (small
  groups) or by an ID selector per group (`FAISS_OVERFETCH`); the coarse quantizer runs once per row (and each
  column's list is its row's nearest when the rows are the columns).

Checked search (`Search.min_recall`, ivf or faiss; "auto" above `AUTO_MIN_COLUMNS` columns, `auto_search`):
`graphs.knn` measures the recall after the search and, while it is short, searches again with twice the cells or
lists (`next_try`); once a try would probe 1/`AUTO_MAX_SHARE`[kind] of the columns per row it runs the exact
search instead. Each try is a fresh search (the IVF: its own compile; faiss: the first try's centroids and lists
reused, `faiss_topk`'s cache); the tries are reported.

Recall (`recall`): on a seeded sample of rows, the share of the exact top-k found by the approximate search
(tie-robust: an approximate neighbour counts when its cosine reaches the exact k-th cosine), computed with the exact
kernel on those rows only.

Shape legend
    R  query rows    C  columns (candidates)    D  feature dim    k  neighbours per row
    L  cells (lists split at `cap`)    P  nprobe    B  rows per batch    W  work items per batch    qc  rows per item
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spectral_jax import kernels
from spectral_jax.errors import InputError, is_integer
from spectral_jax.kernels import top_k_grouped

Array = Any

KINDS = ("auto", "exact", "ivf", "faiss")
PROBES = ("list", "row")     # IVF probing: per row cell (rows grouped by list) or per row
AUTO_MIN_RECALL = 0.95       # "auto"'s checked search: the sampled recall it must reach (else more probes, then exact)
AUTO_MIN_COLUMNS = 1 << 16   # "auto": the exact search below this many columns (the IVF's fixed costs do not pay)
AUTO_CELL = 64               # "auto": columns per coarse list ≈ 2·AUTO_CELL (cells of ≤ AUTO_CELL, rounded to 8)
# "auto" without faiss: cells probed per row cell at its first try — 256, well above what the 0.95 floor needs on
# the real inputs measured (benchmarks/results/dataset_search.md: at 64 a dataset run's raw 384-d tokens reached
# 0.89, then searched exactly; at 128 0.947–0.957, its 20-eigenvector embedding moved; at 256 0.977–0.984)
AUTO_NPROBE = 256
AUTO_FAISS_NPROBE = 24       # "auto" with faiss: lists per row at its first try (benchmarks/results/dataset_search.md)
# the checked search: exact instead once a try would probe 1/AUTO_MAX_SHARE[kind] of the columns per row — where a
# try costs about a third of the exact search at most, at the cost per (row, candidate) pair measured against the
# exact kernel's (benchmarks/results/knn_floor.md): the JAX list scan ≈ 2–3×, faiss's IVF scan ≈ 5–10×
AUTO_MAX_SHARE = {"ivf": 8, "faiss": 32}
AUTO_MAX_NLIST = 4096        # "auto": at most this many lists (k-means costs ∝ nlist², the assignment ∝ C·nlist)
PAIR_BUDGET = 1 << 23        # (row, cell, neighbour) candidates held per row batch: B·P·k (64 MiB of float32)
FAISS_OVERFETCH = 128        # faiss: groups up to this size are over-fetched, larger ones left out by an ID selector
FAISS_QUANT_ROWS = 65536     # faiss: rows per call of the coarse quantizer (and of an over-fetching search)
RECALL_ROWS = 1000           # rows sampled for the recall estimate
NEAREST_BLOCK = 1024         # rows per tile of the nearest-centroid assignment (`_best` with k = 1)
SAMPLE_PER_LIST = 32         # k-means sample: columns per coarse list
RECALL_STREAM = 0x52454331   # folded into the seed's key for the recall sample (independent of the k-means sample)


@dataclasses.dataclass(frozen=True)
class Search:
    """How `graphs.knn` searches the inter-image neighbours.

    kind: "exact" (blockwise brute force), "ivf" (this module, JAX), "faiss" (faiss IVF on the CPU, needs
    `faiss-cpu`), "auto" (`resolve`: exact below `AUTO_MIN_COLUMNS` columns, under `jit` or over a mesh; above it a
    *checked* approximate search, `auto_search` — faiss where it is installed and JAX runs on the CPU, else the IVF
    here; lists of ≈ 2·`AUTO_CELL` columns (at most `AUTO_MAX_NLIST` lists), `AUTO_NPROBE` cells (ivf, probe
    "list") or `AUTO_FAISS_NPROBE` lists (faiss) — whose recall on the seeded sample must reach `AUTO_MIN_RECALL`:
    short of it the search runs again with twice the cells, and once a try would probe 1/`AUTO_MAX_SHARE`[kind] of
    the columns the exact search runs instead; benchmarks/results/peers.md).
    nlist: coarse lists (default ≈ √C, a power of two); nprobe: cells probed per row cell (probe "list") or per row
    (probe "row") (default `default_nprobe`); seed: the k-means sample and initial centroids and the recall sample;
    iters: k-means steps (5: on the horse tokens at 10⁵ the recall of 10 steps, 0.957 against 0.956, at half the
    k-means time); recall_rows: rows sampled for the recall estimate (0: none); probe: "list" (rows grouped by list,
    one product per row cell) or "row" (per-row probing), ivf only; row_lists: lists each row joins with probe "list"
    (more: fewer misses at list borders, proportionally more work); min_recall: ivf and faiss — check the sampled
    recall (of every graph) after the search and search again with twice nprobe until it reaches this, then exact
    (`graphs.knn`; None: run once, as asked; needs recall_rows > 0 and concrete inputs).
    """

    kind: str = "auto"
    nlist: int | None = None
    nprobe: int | None = None
    seed: int = 0
    iters: int = 5
    recall_rows: int = RECALL_ROWS
    probe: str = "row"
    row_lists: int = 1
    min_recall: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"search={self.kind!r}", "is not a kNN search", f"choose one of {', '.join(KINDS)}")
        if self.probe not in PROBES:
            raise InputError(f"probe={self.probe!r}", "is not an IVF probing", f"choose one of {', '.join(PROBES)}")
        if not (is_integer(self.row_lists) and self.row_lists >= 1):
            raise InputError(f"row_lists={self.row_lists!r}", "must be an integer ≥ 1", "pass e.g. row_lists=1")
        for name, lo in (("nlist", 1), ("nprobe", 1)):
            v = getattr(self, name)
            if v is not None and not (is_integer(v) and v >= lo):
                raise InputError(f"{name}={v!r}", f"must be an integer ≥ {lo}", f"pass e.g. {name}=64 or None")
        if self.min_recall is not None and not (isinstance(self.min_recall, (int, float))
                                                 and 0.0 < self.min_recall <= 1.0):
            raise InputError(f"min_recall={self.min_recall!r}", "must be a recall in (0, 1] or None",
                             "pass e.g. min_recall=0.95")
        for name in ("seed", "iters", "recall_rows"):
            v = getattr(self, name)
            if not (is_integer(v) and v >= 0):
                raise InputError(f"{name}={v!r}", "must be a non-negative integer", f"pass e.g. {name}=0")


def as_search(search) -> Search:
    """A `Search` from a kind name or a `Search` (anything else: `InputError`)."""
    if isinstance(search, Search):
        return search
    if isinstance(search, str):
        return Search(search)
    raise InputError(f"search={search!r}", "is not a kNN search", f"pass one of {', '.join(KINDS)} or a Search")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(search, num_nodes: int, concrete: bool, mesh) -> Search:
    """The `Search` with `kind` made concrete ("exact", "ivf" or "faiss") for a graph of `num_nodes` nodes; `concrete`:
    the inputs are arrays, not tracers (faiss, and the checked IVF's second tries, cannot run under `jit`).
    "auto": `auto_search` when the columns reach `AUTO_MIN_COLUMNS` on concrete inputs without a mesh, else exact.
    InputError for a choice that cannot run."""
    s = as_search(search)
    kind = s.kind
    if kind == "auto":
        if num_nodes >= AUTO_MIN_COLUMNS and concrete and mesh is None and s.recall_rows > 0:
            return auto_search(num_nodes, s)
        kind = "exact"
    if s.min_recall is not None and kind in ("ivf", "faiss") and not (concrete and s.recall_rows > 0):
        raise InputError(f"min_recall={s.min_recall}", "needs concrete inputs and recall_rows > 0 (the recall is "
                         "checked between tries)", "call graphs.knn outside jit, or pass min_recall=None")
    if kind != "exact" and mesh is not None:
        raise InputError(f"search={kind!r}", "does not run sharded over a mesh",
                         "pass search='exact' with a mesh, or mesh=None")
    if kind == "faiss":
        if not faiss_available():
            raise InputError("search='faiss'", "needs faiss, which is not installed",
                             "pip install faiss-cpu (or pass search='ivf')")
        if not concrete:
            raise InputError("search='faiss'", "cannot run under jit (faiss runs on the host)",
                             "call graphs.knn outside jit, or pass search='ivf'")
    return dataclasses.replace(s, kind=kind)


def auto_search(c: int, s: Search = Search(), kind: str | None = None) -> Search:
    """"auto"'s checked approximate search over C columns (`Search` says what it does); s's seed, iters and
    recall_rows kept. kind: "ivf" (probe "list", `AUTO_NPROBE` cells) or "faiss" (`AUTO_FAISS_NPROBE` lists);
    None: faiss where it is installed and JAX runs on the CPU (faster there on the real features measured,
    benchmarks/results/peers.md), else ivf."""
    if kind is None:
        kind = "faiss" if faiss_available() and jax.default_backend() == "cpu" else "ivf"
    nlist = min(AUTO_MAX_NLIST, max(1, 2 ** round(math.log2(max(1.0, c / (2 * AUTO_CELL))))))
    nprobe = AUTO_FAISS_NPROBE if kind == "faiss" else AUTO_NPROBE
    return dataclasses.replace(s, kind=kind, probe="list", nlist=nlist, nprobe=nprobe, row_lists=1,
                               min_recall=s.min_recall or AUTO_MIN_RECALL)


def next_try(c: int, k: int, s: Search) -> Search:
    """The checked search's next try after a recall short of `s.min_recall`: twice the cells (ivf) or lists (faiss)
    probed, or the exact search once that would probe 1/`AUTO_MAX_SHARE`[s.kind] of the C columns per row (or all
    of them)."""
    pl = plan(c, k, s)
    p = 2 * pl["nprobe"]
    if s.kind == "faiss":                       # a faiss list holds C / nlist columns
        done = p * AUTO_MAX_SHARE["faiss"] > pl["nlist"] or p > pl["nlist"]
    else:
        done = p * pl["cap"] * AUTO_MAX_SHARE["ivf"] > c or p > pl["cells"]
    return dataclasses.replace(s, kind="exact") if done else dataclasses.replace(s, nprobe=p)


def last_try(c: int, k: int, s: Search) -> Search:
    """The last approximate try a checked search `s` over C columns may make before `next_try` turns exact (`s`
    itself when its first retry would be exact): the one that probes the most (its memory, `faiss_topk`'s probes)."""
    while (nxt := next_try(c, k, s)).kind != "exact":
        s = nxt
    return s


def default_nlist(c: int) -> int:
    """Coarse lists for C columns: the power of two nearest √C (≥ 1)."""
    return max(1, 2 ** round(math.log2(max(1.0, math.sqrt(c)))))


def default_nprobe(nlist: int) -> int:
    """Cells probed per row: nlist / 4 (≥ 8) — about an eighth of the columns (a cell holds half a mean list)."""
    return max(8, nlist // 4)


def plan(c: int, k: int, search: Search) -> dict:
    """The static sizes of an IVF search over C columns: nlist, cap (cell capacity), cells L, nprobe, sample."""
    nlist = min(c, search.nlist or default_nlist(c))
    half = -(-c // (2 * nlist))
    cap = max(8, -(-half // 8) * 8)                         # half the mean list length, rounded up to a multiple of 8
    cells = nlist + c // cap
    nprobe = min(cells, search.nprobe or default_nprobe(nlist))
    return dict(nlist=nlist, cap=cap, cells=cells, nprobe=nprobe, sample=min(c, SAMPLE_PER_LIST * nlist))


# ------------------------------------------------------------------------------------------------- k-means


def _best(x: Array, c: Array, k: int, ok: Array | None = None, block: int = 4096) -> tuple[Array, Array]:
    """Top-k centroids of every row: x `[R, D]`, c `[L, D]`, ok `[L]` bool (False: never chosen, score −inf) →
    (score `[R, k]` float32, index `[R, k]` int32), rows in tiles of `block`. k = 1 (every assignment to lists): the
    row's max and the lowest index attaining it, in tiles of ≤ `NEAREST_BLOCK` rows — `lax.top_k`'s own answer
    (in its order, ±0.0 and NaN included; ties to the lower index) at about a third of its CPU cost."""
    r = x.shape[0]
    bq = min(block, NEAREST_BLOCK if k == 1 else block, r)
    xt = kernels._tiles(x, bq, 0.0)
    iota = jnp.arange(c.shape[0], dtype=jnp.int32)

    def tile(xi):
        cos = jnp.dot(xi, c.T, preferred_element_type=jnp.float32)
        if ok is not None:
            cos = jnp.where(ok[None, :], cos, -jnp.inf)
        if k == 1:                                                # on top_k's total order (±0.0, NaN): rank keys
            key = kernels._rank_key(cos)
            top = jnp.max(key, axis=1, keepdims=True)
            i = jnp.min(jnp.where(key == top, iota[None, :], c.shape[0] - 1), axis=1, keepdims=True)
            return jnp.take_along_axis(cos, i, axis=1), i
        s, i = lax.top_k(cos, k)
        return s, i.astype(jnp.int32)

    s, i = lax.map(tile, xt)
    return s.reshape(-1, k)[:r], i.reshape(-1, k)[:r]


def kmeans(x: Array, nlist: int, sample: int, iters: int, key) -> Array:
    """Spherical k-means of a seeded sample of the unit rows x `[C, D]` → centroids `[nlist, D]` float32 unit rows.

    The sample is `sample` distinct rows drawn with `key`; the first `nlist` of them start the centroids; each step
    assigns the sample to the nearest centroid by cosine and renormalises the sums (an empty list keeps its centroid).
    """
    pick = jax.random.choice(key, x.shape[0], (sample,), replace=False)
    s = x[pick].astype(jnp.float32)

    def step(c, _):
        a = _best(s, c, 1)[1][:, 0]
        tot = jax.ops.segment_sum(s, a, nlist)
        n = jnp.linalg.norm(tot, axis=1, keepdims=True)
        return jnp.where(n > 0, tot / jnp.maximum(n, 1e-12), c), None

    return lax.scan(step, s[:nlist], None, length=iters)[0]


# ----------------------------------------------------------------------------------------------------- IVF


def _cells_of(lst: Array, nlist: int, cap: int, cells: int) -> tuple[Array, Array, Array, Array]:
    """Inverted lists split into cells of ≤ cap entries, from the list of every entry, lst `[C]` int32 in [0, nlist):
    (order `[C]` int32 the entries sorted by list — every cell is a contiguous run of it —, start `[L + 1]`, size
    `[L + 1]` int32 each cell's run (the last cell an empty sentinel), cell_list `[L]` int32 the list of each cell,
    −1 for an unused cell)."""
    size = jnp.bincount(lst, length=nlist)
    per_list = -(-size // cap)                                     # cells of each list
    ends = jnp.cumsum(per_list)
    used = ends[-1]
    j = jnp.arange(cells, dtype=jnp.int32)
    cell_list = jnp.searchsorted(ends, j, side="right").astype(jnp.int32)       # list of cell j (j < used)
    li = jnp.minimum(cell_list, nlist - 1)
    part = j - (ends - per_list)[li]                                # j is the part-th cell of its list
    start = (jnp.cumsum(size) - size)[li] + part * cap
    cnt = jnp.clip(size[li] - part * cap, 0, cap)
    live = j < used
    start = jnp.concatenate([jnp.where(live, start, 0), jnp.zeros((1,), start.dtype)]).astype(jnp.int32)
    cnt = jnp.concatenate([jnp.where(live, cnt, 0), jnp.zeros((1,), cnt.dtype)]).astype(jnp.int32)
    order = jnp.argsort(lst, stable=True).astype(jnp.int32)
    return order, start, cnt, jnp.where(live, cell_list, -1)


def _batch(a, grp, probe, bs, ids, start, cnt, col_grp, col_ok, k: int, cap: int, qc: int, items: int):
    """Top-k of the B rows of one batch among their probed cells: a `[B, D]`, grp `[B]`, probe `[B, P]` cell ids;
    bs `[C + cap, D]` the columns in list order (zero-padded), ids `[C + cap]` their column ids (−1 padding),
    start/cnt `[L + 1]` the cells' runs (`_cells_of`) → (cos `[B, k]`, idx `[B, k]`)."""
    bsz, p = probe.shape
    cells = start.shape[0]
    pair_cell = probe.reshape(-1)
    o = jnp.argsort(pair_cell, stable=True).astype(jnp.int32)       # (row, probe) pairs grouped by cell
    sc = pair_cell[o]
    n_pairs = jnp.bincount(pair_cell, length=cells)
    per_cell = -(-n_pairs // qc)
    item0 = jnp.cumsum(per_cell) - per_cell
    rank = jnp.arange(bsz * p, dtype=jnp.int32) - (jnp.cumsum(n_pairs) - n_pairs)[sc]
    item = item0[sc] + rank // qc
    item_pair = jnp.full((items, qc), -1, jnp.int32).at[item, rank % qc].set(o)
    item_cell = jnp.clip(jnp.searchsorted(jnp.cumsum(per_cell), jnp.arange(items), side="right"), 0, cells - 1)
    slot = jnp.arange(cap, dtype=jnp.int32)

    def work(inp):
        pairs, cell = inp
        rows = jnp.where(pairs >= 0, pairs // p, 0)
        s0 = start[cell]
        x = lax.dynamic_slice_in_dim(bs, s0, cap)                     # [cap, D] the cell's columns
        cols = lax.dynamic_slice_in_dim(ids, s0, cap)
        safe = jnp.maximum(cols, 0)
        cos = jnp.dot(a[rows], x.T, preferred_element_type=jnp.float32)  # [qc, cap]
        ok = ((slot < cnt[cell]) & col_ok[safe])[None, :] & (grp[rows][:, None] != col_grp[safe][None, :])
        top, pos = lax.top_k(jnp.where(ok, cos, -jnp.inf), min(k, cap))
        return top, jnp.take(cols, pos)

    top, idx = lax.map(work, (item_pair, item_cell.astype(jnp.int32)), batch_size=8)   # [W, qc, k']
    kk = top.shape[-1]
    dest = jnp.where(item_pair >= 0, item_pair, bsz * p).reshape(-1)
    vals = jnp.full((bsz * p, kk), -jnp.inf, jnp.float32).at[dest].set(top.reshape(-1, kk), mode="drop")
    out = jnp.full((bsz * p, kk), -1, jnp.int32).at[dest].set(idx.reshape(-1, kk), mode="drop")
    vals, out = vals.reshape(bsz, p * kk), out.reshape(bsz, p * kk)
    if p * kk < k:
        vals = jnp.pad(vals, ((0, 0), (0, k - p * kk)), constant_values=-jnp.inf)
        out = jnp.pad(out, ((0, 0), (0, k - p * kk)), constant_values=-1)
    best, where = lax.top_k(vals, k)
    return best, jnp.take_along_axis(out, where, axis=1)


def _list_scan(a, row_grp, cent, bs, ids, start, cnt, cell_list, col_grp, col_ok, k: int, cap: int, p: int,
               m: int, lst=None):
    """Top-k of every row among the cells nearest the centroids of its `m` nearest lists, row-cell-major: every row
    joins the lists of its m nearest centroids, each list's rows are cut into row cells of ≤ cap rows (`_cells_of`),
    and every row cell is one [cap, D]·[D, p·cap] product and one `top_k` against the columns of the p cells nearest
    its list's centroid; a row's m results are merged (duplicates dropped). a `[R, D]`; cent `[nlist, D]`; bs, ids,
    start, cnt, cell_list the column cells as in `_batch`; lst `[R]` the rows' nearest lists where already known (the
    rows are the columns, m = 1), else None → (cos `[R, k]`, idx `[R, k]`)."""
    r = a.shape[0]
    nlist = cent.shape[0]
    m = min(m, nlist)
    cells = start.shape[0] - 1
    rcells = nlist + (r * m) // cap
    if lst is None:
        lst = _best(a, cent.astype(a.dtype), m)[1].reshape(-1)          # [R·m] entry e = row e // m
    rorder, rstart, rcnt, rlist = _cells_of(lst, nlist, cap, rcells)
    ent = jnp.pad(rorder, (0, cap), constant_values=-1)                 # entries in row-cell order
    cent_cell = jnp.where((cell_list >= 0)[:, None], cent[jnp.maximum(cell_list, 0)], 0.0).astype(a.dtype)
    cent_row = cent[jnp.maximum(rlist, 0)].astype(a.dtype)
    s, probe = _best(cent_row, cent_cell, p, cell_list >= 0)
    probe = jnp.where(jnp.isfinite(s), probe, cells)                   # nothing left to probe: the empty sentinel
    slot = jnp.arange(cap, dtype=jnp.int32)
    kk = min(k, p * cap)

    def scan(j, pr):
        e = lax.dynamic_slice_in_dim(ent, rstart[j], cap)
        rid = jnp.maximum(e, 0) // m
        x = a[rid]                                                      # [cap, D] the row cell's rows
        y = jax.vmap(lambda s0: lax.dynamic_slice_in_dim(bs, s0, cap))(start[pr]).reshape(-1, bs.shape[1])
        cols = jax.vmap(lambda s0: lax.dynamic_slice_in_dim(ids, s0, cap))(start[pr]).reshape(-1)
        live = (slot[None, :] < cnt[pr][:, None]).reshape(-1)
        safe = jnp.maximum(cols, 0)
        cos = jnp.dot(x, y.T, preferred_element_type=jnp.float32)      # [cap, p·cap]
        ok = (live & col_ok[safe])[None, :] & (row_grp[rid][:, None] != col_grp[safe][None, :])
        top, pos = top_k_grouped(jnp.where(ok, cos, -jnp.inf), kk)
        return top, jnp.take(cols, pos), jnp.where(slot < rcnt[j], e, r * m)

    def work(inp):                                                      # an unused row cell costs nothing
        j, pr = inp
        none = (jnp.full((cap, kk), -jnp.inf, jnp.float32), jnp.zeros((cap, kk), jnp.int32),
                jnp.full((cap,), r * m, jnp.int32))
        return lax.cond(rcnt[j] > 0, scan, lambda j, pr: none, j, pr)

    top, idx, dest = lax.map(work, (jnp.arange(rcells, dtype=jnp.int32), probe))      # [rcells, cap, k']
    dest = dest.reshape(-1)
    vals = jnp.full((r * m, kk), -jnp.inf, jnp.float32).at[dest].set(top.reshape(-1, kk), mode="drop")
    out = jnp.full((r * m, kk), -1, jnp.int32).at[dest].set(idx.reshape(-1, kk), mode="drop")
    vals, out = vals.reshape(r, m * kk), out.reshape(r, m * kk)
    if m > 1:                                                           # a column found from two lists counts once
        o = jnp.argsort(out, axis=1)
        so, sv = jnp.take_along_axis(out, o, axis=1), jnp.take_along_axis(vals, o, axis=1)
        dup = jnp.concatenate([jnp.zeros((r, 1), bool), so[:, 1:] == so[:, :-1]], axis=1)
        vals, out = jnp.where(dup, -jnp.inf, sv), so
    if m * kk < k:
        vals = jnp.pad(vals, ((0, 0), (0, k - m * kk)), constant_values=-jnp.inf)
        out = jnp.pad(out, ((0, 0), (0, k - m * kk)), constant_values=-1)
    best, where = lax.top_k(vals, k)
    return best, jnp.take_along_axis(out, where, axis=1)


class Index(NamedTuple):
    """An IVF index over C columns (`ivf_index`): cent `[nlist, D]` float32 unit centroids; bs `[C + cap, D]` the
    columns in list order, zero-padded; ids `[C + cap]` int32 their column ids (plus the index's offset; −1 for the
    padding); start, cnt `[L + 1]` int32 each cell's run of bs (`_cells_of`); cell_list `[L]` int32 each cell's
    list (−1: unused)."""

    cent: Array
    bs: Array
    ids: Array
    start: Array
    cnt: Array
    cell_list: Array


def ivf_index(b: Array, pl: dict, iters: int, key, offset=0) -> tuple[Index, Array]:
    """The IVF index of the unit rows b `[C, D]` with `plan`'s sizes pl: spherical k-means (`kmeans`, `iters`
    steps, sample and initial centroids drawn with `key`), every column in its nearest centroid's list, the lists
    cut into cells of ≤ pl["cap"]; column ids counted from `offset` (a shard's first column). Returns (the `Index`,
    every column's list `[C]` int32). Jittable."""
    cap = pl["cap"]
    cent = kmeans(b, pl["nlist"], pl["sample"], iters, key)
    lst = _best(b, cent.astype(b.dtype), 1)[1][:, 0]                   # every column's list
    order, start, cnt, cell_list = _cells_of(lst, pl["nlist"], cap, pl["cells"])
    bs = jnp.pad(b[order], ((0, cap), (0, 0)))
    ids = jnp.pad(order + offset, (0, cap), constant_values=-1)
    return Index(cent, bs, ids, start, cnt, cell_list), lst


def ivf_topk(a: Array, b: Array, row_grp: Array, col_grp: Array, col_ok: Array, k: int,
             search: Search = Search("ivf")) -> tuple[Array, Array]:
    """Approximate top-k cosine neighbours of the rows of `a` among the columns of `b` of other groups (IVF, JAX).

    a `[R, D]`, b `[C, D]` unit rows; row_grp `[R]`, col_grp `[C]` int (a column of the row's own group is never a
    neighbour); col_ok `[C]` bool (columns that may be neighbours). Returns (idx `[R, k]` int32 column indices,
    cos `[R, k]` float32), largest first; a slot without a candidate has cos = −inf and idx 0. Jittable (sizes are
    static: `plan`); deterministic for a given `search.seed`. When a is b (one array: a VV graph), probe "list" takes
    the rows' lists from the columns' assignment instead of assigning them again. Memory: one list-ordered copy of b
    plus, probe "list", O(R·row_lists·k) per-cell results and one [cap, nprobe·cap] block at a time; probe "row",
    O(`PAIR_BUDGET`) per row batch.
    """
    r, c = a.shape[0], b.shape[0]
    if k == 0:
        return jnp.zeros((r, 0), jnp.int32), jnp.zeros((r, 0), jnp.float32)
    pl = plan(c, k, search)
    cap, p = pl["cap"], pl["nprobe"]
    (cent, bs, ids, start, cnt, cell_list), lst = ivf_index(b, pl, search.iters, jax.random.PRNGKey(search.seed))
    if search.probe == "list":
        cos, idx = _list_scan(a, row_grp, cent, bs, ids, start, cnt, cell_list, col_grp, col_ok, k, cap, p,
                              search.row_lists, lst if a is b and search.row_lists == 1 else None)
        return jnp.where(jnp.isfinite(cos), idx, 0), cos
    bsz = int(min(r, max(256, PAIR_BUDGET // (p * k))))
    qc = int(min(256, max(8, 2 ** int(math.log2(max(1.0, bsz * p / pl["cells"] / 4))))))
    items = pl["cells"] + 1 + bsz * p // qc
    cent_cell = jnp.where((cell_list >= 0)[:, None], cent[jnp.maximum(cell_list, 0)], 0.0).astype(a.dtype)

    def batch(inp):
        ai, gi = inp
        s, probe = _best(ai, cent_cell, p, cell_list >= 0)
        probe = jnp.where(jnp.isfinite(s), probe, pl["cells"])        # nothing left to probe: the empty sentinel
        return _batch(ai, gi, probe, bs, ids, start, cnt, col_grp, col_ok, k, cap, qc, items)

    at, gt = kernels._tiles(a, bsz, 0.0), kernels._tiles(row_grp, bsz, -1)
    cos, idx = lax.map(batch, (at, gt))
    cos, idx = cos.reshape(-1, k)[:r], idx.reshape(-1, k)[:r]
    return jnp.where(jnp.isfinite(cos), idx, 0), cos


ivf_topk_jit = jax.jit(ivf_topk, static_argnums=(5, 6))


# --------------------------------------------------------------------------------------------------- faiss


def faiss_topk(a, b, row_grp, col_grp, col_ok, k: int, search: Search = Search("faiss"), *, same: bool = False,
               cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The same contract as `ivf_topk` with faiss's `IndexIVFFlat` (inner product) on the host (numpy in and out;
    not under `jit`). Columns with col_ok False are not indexed. Groups of at most `FAISS_OVERFETCH` columns: one
    search of k + the largest group's size per row, the own group's dropped; larger groups: the rows are searched
    one group at a time, each with an ID selector that leaves out its own group's columns (a range when they are
    contiguous), so a row fetches k candidates, not k + its group's size. Trained on `plan`'s seeded sample;
    faiss's k-means seed is `search.seed`.

    The coarse quantizer runs once per row and once per column: the rows' nprobe nearest lists are searched for
    first, `FAISS_QUANT_ROWS` rows at a time (held for all rows as int32: R·nprobe·4 bytes; their cosines are not
    kept — an `IndexIVFFlat` scan does not read them) and the index is searched with them (`search_preassigned`);
    same (the rows are the columns, a VV graph): each column's list is its row's nearest, not searched for again.
    cache (a dict, kept by the caller between a checked search's tries on the same a, b): the centroids and the
    columns' lists are kept in it and reused while nlist, the sample, the seed and the k-means steps are the same —
    a retry with more lists probed searches the rows' lists again and rebuilds the index from them (no k-means, no
    assignment). The result is the same with or without either."""
    import faiss

    a = np.ascontiguousarray(np.asarray(a, np.float32))
    b = np.asarray(b, np.float32)
    row_grp, col_grp, col_ok = np.asarray(row_grp), np.asarray(col_grp), np.asarray(col_ok, bool)
    r, c, d = a.shape[0], b.shape[0], a.shape[1]
    if k == 0:
        return np.zeros((r, 0), np.int32), np.zeros((r, 0), np.float32)
    pl = plan(c, k, search)
    nlist, nprobe = pl["nlist"], min(pl["nlist"], pl["nprobe"])
    keep = np.flatnonzero(col_ok)
    key = (c, d, nlist, pl["sample"], int(search.seed), max(1, int(search.iters)))
    cache = {} if cache is None else cache
    if cache.get("key") != key:
        cache.clear()
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(search.seed)
        index.cp.niter = key[-1]
        index.cp.max_points_per_centroid = max(1, pl["sample"] // nlist)
        index.cp.min_points_per_centroid = min(index.cp.min_points_per_centroid, index.cp.max_points_per_centroid)
        rng = np.random.default_rng(search.seed)
        index.train(np.ascontiguousarray(b[rng.choice(c, pl["sample"], replace=False)]))
        cache.update(key=key, centroids=quant.reconstruct_n(0, nlist))
    quant = faiss.IndexFlatIP(d)
    quant.add(cache["centroids"])
    probe = np.empty((r, nprobe), np.int32)                 # [R, P] each row's nearest lists
    for i in range(0, r, FAISS_QUANT_ROWS):
        probe[i:i + FAISS_QUANT_ROWS] = quant.search(a[i:i + FAISS_QUANT_ROWS], nprobe)[1]
    if "lists" not in cache:                                # each indexed column's list [C'] int64
        cache["lists"] = np.ascontiguousarray(probe[keep, 0] if same else quant.assign(
            np.ascontiguousarray(b[keep]), 1).ravel(), np.int64)

    def preassigned(x, lists, kk, params=None):
        """faiss's search of the rows x `[n, D]` in their lists `[n, P]` (int32), `FAISS_QUANT_ROWS` rows a call:
        (cos, ids) `[n, kk]`. The coarse cosines it takes are zeros: IndexIVFFlat's inner-product scan does not
        read them."""
        dd, ii = np.empty((len(x), kk), np.float32), np.empty((len(x), kk), np.int64)
        for i in range(0, len(x), FAISS_QUANT_ROWS):
            xs = np.ascontiguousarray(x[i:i + FAISS_QUANT_ROWS])
            lq = np.ascontiguousarray(lists[i:i + FAISS_QUANT_ROWS], np.int64)
            lc, ds, is_ = np.zeros(lq.shape, np.float32), dd[i:i + FAISS_QUANT_ROWS], ii[i:i + FAISS_QUANT_ROWS]
            # faiss's Python search_preassigned takes no params (the ID selector): its C++ method (`_c`) does
            index.search_preassigned_c(len(xs), faiss.swig_ptr(xs), kk, faiss.swig_ptr(lq), faiss.swig_ptr(lc),
                                       faiss.swig_ptr(ds), faiss.swig_ptr(is_), False, params)
        return dd, ii

    index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    cols, ids, lists = np.ascontiguousarray(b[keep]), keep.astype(np.int64), cache["lists"]
    index.add_core(len(keep), faiss.swig_ptr(cols), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    index.nprobe = nprobe
    index.parallel_mode = 3     # threads over the rows inside search_preassigned (faiss's default 0 runs it on one)
    over = int(np.bincount(col_grp - col_grp.min()).max()) if c else 0
    if over <= FAISS_OVERFETCH:                 # small groups: one search of k + over, the own group's dropped
        cos, ids = preassigned(a, probe, min(k + over, keep.size) or 1)
        bad = (ids < 0) | (col_grp[np.maximum(ids, 0)] == row_grp[:, None])
        cos = np.where(bad, -np.inf, cos).astype(np.float32)
        order = np.argsort(-cos, axis=1, kind="stable")[:, :k]
        cos, ids = np.take_along_axis(cos, order, axis=1), np.take_along_axis(ids, order, axis=1)
        if cos.shape[1] < k:
            cos = np.pad(cos, ((0, 0), (0, k - cos.shape[1])), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=0)
        return np.where(np.isfinite(cos), ids, 0).astype(np.int32), cos
    cos = np.full((r, k), -np.inf, np.float32)
    ids = np.full((r, k), -1, np.int64)
    corder = np.argsort(col_grp, kind="stable")
    cg = col_grp[corder]
    rorder = np.argsort(row_grp, kind="stable")
    for rows in np.split(rorder, np.flatnonzero(np.diff(row_grp[rorder])) + 1):
        lo, hi = np.searchsorted(cg, row_grp[rows[0]], "left"), np.searchsorted(cg, row_grp[rows[0]], "right")
        own = corder[lo:hi]
        if own.size and own[-1] - own[0] + 1 == own.size and (np.diff(own) == 1).all():
            inner = faiss.IDSelectorRange(int(own[0]), int(own[-1]) + 1)
        else:
            inner = faiss.IDSelectorBatch(own.astype(np.int64))
        sel = faiss.IDSelectorNot(inner)        # held here: faiss's objects point at each other, not own them
        params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        cos[rows], ids[rows] = preassigned(np.ascontiguousarray(a[rows]), probe[rows], k, params)
    cos = np.where(ids < 0, -np.inf, cos).astype(np.float32)
    return np.where(np.isfinite(cos), ids, 0).astype(np.int32), cos


# -------------------------------------------------------------------------------------------------- recall


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def recall_truth(a, b, row_grp, col_grp, col_ok, k: int, rows: int, seed: int) -> tuple[Array, Array, Array]:
    """What `recall` compares an approximate search with, on `rows` rows sampled with `seed` (all rows if fewer):
    (pick `[r]` the sampled rows, kth `[r, 1]` their exact k-th inter-group cosine (inf where a row has no finite
    one), want `[r]` their count of finite exact neighbours ≤ k) — the exact kernel on those rows only. It depends
    on the features, not on the search: a checked search's tries share one (`recall_of`)."""
    r = a.shape[0]
    rows = min(rows, r)
    # its own stream: PRNGKey(seed) itself draws the k-means sample, whose first rows seed the centroids — rows near
    # a centroid, whose neighbours share its list, would make the estimate far too high
    pick = jax.random.choice(jax.random.fold_in(jax.random.PRNGKey(seed), RECALL_STREAM), r, (rows,), replace=False)
    _, ex = kernels.topk_inter(a[pick], b, row_grp[pick], col_grp, col_ok, k, 512)
    fin = jnp.isfinite(ex)
    return pick, jnp.min(jnp.where(fin, ex, jnp.inf), axis=1, keepdims=True), jnp.sum(fin, axis=1)


@jax.jit
def recall_of(approx_cos, truth) -> Array:
    """Recall of an approximate top-k, approx_cos `[R, k]`, against `recall_truth`'s sample: the share of the exact
    top-k (finite cosines only) matched — an approximate neighbour counts when its cosine reaches the exact k-th
    cosine (ties between equal cosines cannot lower it). A float32 scalar in [0, 1] (1 when no sampled row has a
    candidate)."""
    pick, kth, want = truth
    tot = jnp.sum(want)
    return jnp.where(tot > 0, jnp.sum(hits(approx_cos[pick], kth, want)) / jnp.maximum(tot, 1),
                     1.0).astype(jnp.float32)


def hits(approx_cos, kth, want) -> Array:
    """Per sampled row, the exact neighbours an approximate top-k found: its finite cosines `[r, k]` that reach the
    exact k-th kth `[r, 1]` (less 1e-6: ties cannot lower it), at most want `[r]` (the row's finite exact
    neighbours) → `[r]` int32. `recall_of`'s count, and the ring IVF's (`distributed._ivf_recall`)."""
    got = jnp.sum(jnp.isfinite(approx_cos) & (approx_cos >= kth - 1e-6), axis=1)
    return jnp.minimum(got, want)


def recall(a, b, row_grp, col_grp, col_ok, approx_cos, k: int, rows: int, seed: int) -> Array:
    """Recall of an approximate top-k on `rows` rows sampled with `seed` (all rows if fewer): `recall_of` against
    `recall_truth`. a, b, groups, col_ok as in `ivf_topk`; approx_cos `[R, k]`. Returns a float32 scalar in
    [0, 1] (1 when no sampled row has a candidate)."""
    return recall_of(approx_cos, recall_truth(a, b, row_grp, col_grp, col_ok, k, rows, seed))
