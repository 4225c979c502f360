"""The sparse operator of kNN graph groups on one grid: A = Σ_l w_l sym(P_l), coalesced once: a scipy CSR matrix
(`knn_csr`, what ARPACK multiplies on the CPU) or a sliced-ELL `EllMatrix` applied by gathers (`knn_operator`, JAX).

For a kNN graph (`graphs.KnnGraph`: A_l stored as `[N, k]` neighbour indices and weights, S_l = ½(A_l + A_lᵀ),
P_l = D_l⁻¹ S_l) every stored edge i→j of weight a contributes ¼ a (1/d_i + 1/d_j) to sym(P_l) at (i, j) and at
(j, i). Summing those over the layers and both directions gives one symmetric sparse matrix with at most 2·L·N·k
entries (far fewer where the layers share neighbours). It is coalesced on the host (scipy) and stored *sliced
ELL*: each row's entries cut into pieces of a common width W (chosen to minimise padding), so a product is W
gathers of `[R, K]` plus one sorted segment-sum of the pieces — no scatter over the entries, O(nnz·K) work and
O(R·K) extra memory; faster than applying the L graphs' `sym_matvec` separately (four gather/scatter passes over
L·N·k edges each; benchmarks/results/history.md).

Shape legend
    N  nodes    K  vectors    R  row pieces (≥ rows with an entry)    W  piece width    L  graphs of a group
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.graphs import KnnGraph


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EllMatrix:
    """A sparse N×N matrix in sliced ELL: piece r holds entries `vals[r]` at columns `cols[r]` of row `owner[r]`
    (cols `[R, W]` int32, vals `[R, W]` float32 with 0 padding, owner `[R]` int32 ascending)."""

    cols: jax.Array
    vals: jax.Array
    owner: jax.Array
    num_nodes: int = dataclasses.field(metadata=dict(static=True))

    def matvec(self, z: jax.Array) -> jax.Array:
        """M z: z `[N, K]` → `[N, K]`."""
        z = jnp.asarray(z)

        def add(acc, slot):
            c, v = slot
            return acc + v[:, None] * z[c], None

        pieces = jax.lax.scan(add, jnp.zeros((self.cols.shape[0], z.shape[1]), z.dtype),
                              (self.cols.T, self.vals.T))[0]
        return jax.ops.segment_sum(pieces, self.owner, self.num_nodes, indices_are_sorted=True)

    def dense(self) -> np.ndarray:
        """M as a dense numpy array `[N, N]` (tests)."""
        out = np.zeros((self.num_nodes, self.num_nodes), np.float64)
        rows = np.broadcast_to(np.asarray(self.owner)[:, None], self.cols.shape)
        np.add.at(out, (rows, np.asarray(self.cols)), np.asarray(self.vals, np.float64))
        return out

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(np.asarray(self.vals)))


def sym_coo(graph: KnnGraph, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, vals) `[E]` of Σ_l w_l sym(P_l) over the graphs of a kNN group (batch dims S flattened),
    before coalescing: each stored edge once as (i, j); the matrix is this plus its transpose. weights: `[*S]`."""
    idx = np.asarray(graph.idx).reshape(-1, *graph.idx.shape[-2:])          # [L, N, k]
    w = np.asarray(graph.w, np.float64).reshape(idx.shape)
    deg = np.asarray(graph.deg, np.float64).reshape(idx.shape[:2])
    lw = np.asarray(weights, np.float64).reshape(-1)
    inv = np.where(deg > 0, 1.0 / np.where(deg > 0, deg, 1.0), 0.0)
    layer = np.arange(idx.shape[0])[:, None, None]
    rows = np.broadcast_to(np.arange(idx.shape[1], dtype=np.int32)[None, :, None], idx.shape)
    vals = 0.25 * lw[:, None, None] * w * (inv[:, :, None] + inv[layer, idx])
    keep = vals != 0
    return rows[keep], idx[keep], vals[keep]


def csr_from_coo(rows, cols, vals, n: int, dtype=np.float64):
    """M + Mᵀ (M given by COO triplets, duplicates summed) as a coalesced scipy CSR matrix of `dtype`."""
    import scipy.sparse as sp

    m = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    m = (m + m.T).tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    return m.astype(dtype, copy=False)


def ell_from_csr(m) -> EllMatrix:
    """A square scipy CSR matrix (coalesced) as an `EllMatrix`, float32."""
    n = m.shape[0]
    lengths = np.diff(m.indptr)
    width = _best_width(lengths)
    pieces = -(-lengths // width)                         # row pieces per row (0 for an empty row)
    owner = np.repeat(np.arange(n, dtype=np.int32), pieces)
    first = np.repeat(m.indptr[:-1], pieces) + width * (np.arange(len(owner)) - np.repeat(
        np.cumsum(pieces) - pieces, pieces))               # offset of each piece's first entry
    pos = first[:, None] + np.arange(width)[None, :]
    ok = pos < np.repeat(m.indptr[1:], pieces)[:, None]
    pos = np.where(ok, pos, 0)
    cols_ = np.where(ok, m.indices[pos] if m.nnz else 0, 0).astype(np.int32)
    vals_ = np.where(ok, m.data[pos] if m.nnz else 0.0, 0.0).astype(np.float32)
    if not len(owner):                                    # no entry at all: one empty piece keeps shapes valid
        owner, cols_, vals_ = np.zeros(1, np.int32), np.zeros((1, width), np.int32), np.zeros((1, width), np.float32)
    return EllMatrix(jnp.asarray(cols_), jnp.asarray(vals_), jnp.asarray(owner), int(n))


def _best_width(lengths: np.ndarray) -> int:
    """The piece width W minimising the stored slots Σ_i ⌈r_i / W⌉·W plus a per-piece cost (the segment-sum row)."""
    lengths = lengths[lengths > 0]
    if not len(lengths):
        return 1
    cands = np.unique(np.clip(np.round(np.geomspace(1, lengths.max(), 48)).astype(np.int64), 1, None))
    cost = [(-(-lengths // c)).sum() * (c + 4) for c in cands]
    return int(cands[int(np.argmin(cost))])


def knn_csr(graphs, weights, dtype=np.float32):
    """Σ_g Σ_l w_{g,l} sym(P_{g,l}) of kNN graph groups that share one grid, as one coalesced scipy CSR matrix
    (summed in float64, stored as `dtype`). weights: per group, `[*S]` (normalised by the caller)."""
    parts = [sym_coo(g, w) for g, w in zip(graphs, weights)]
    n = graphs[0].num_nodes
    coo = [np.concatenate([p[i] for p in parts]) for i in range(3)]
    del parts
    return csr_from_coo(*coo, n, dtype)


def knn_operator(graphs, weights) -> EllMatrix:
    """`knn_csr` as one `EllMatrix` (for the device's LOBPCG)."""
    return ell_from_csr(knn_csr(graphs, weights, np.float64))


__all__ = ["EllMatrix", "csr_from_coo", "ell_from_csr", "knn_csr", "knn_operator", "sym_coo"]
