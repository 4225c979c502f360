"""Blocked kernels behind the matrix-free graphs: softmax-attention products and top-k neighbour search.

Nothing here forms an N×M matrix: work proceeds in [block_q, block_k] tiles, so memory is O(block² + N·K).

Shape legend
    N  query rows (graph nodes)     M  key columns (= N for a graph)     D  feature dim     K  vectors (eigvecs)
    bq, bk  tile sizes              nq, nk  number of row / column tiles
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _tiles(x: Array, b: int, fill=0) -> Array:
    """Pad the leading axis of `x` with `fill` to a multiple of `b` and split it: `[n, ...]` → `[ceil(n/b), b, ...]`."""
    n = x.shape[0]
    nb = -(-n // b)
    x = jnp.pad(x, [(0, nb * b - n)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(nb, b, *x.shape[1:])


def _valid(n: int, b: int) -> Array:
    """`[ceil(n/b), b]` mask of real (non-padding) entries."""
    return _tiles(jnp.ones((n,), bool), b)


def softmax_matmul(q: Array, k: Array, z: Array, scale: float, block: int) -> tuple[Array, Array]:
    """P @ z and the row log-sum-exp, with P = softmax(scale · q kᵀ) row-wise, by an online softmax.

    q `[N, D]`, k `[M, D]`, z `[M, K]` → (`[N, K]`, lse `[N]`). Memory O(block² + N·K).
    """
    n, m = q.shape[0], k.shape[0]
    bq, bk = min(block, n), min(block, m)
    qt = _tiles(q * scale, bq)                      # [nq, bq, D]
    kt, zt, vt = _tiles(k, bk), _tiles(z, bk), _valid(m, bk)   # [nk, bk, D], [nk, bk, K], [nk, bk]

    def row_tile(qi):                               # qi [bq, D]
        def step(carry, inp):
            mx, s, acc = carry                      # [bq], [bq], [bq, K]
            kj, zj, vj = inp
            logits = jnp.where(vj[None, :], qi @ kj.T, -jnp.inf)    # [bq, bk]
            new = jnp.maximum(mx, logits.max(axis=1))
            corr = jnp.exp(mx - new)
            p = jnp.exp(logits - new[:, None])
            return (new, s * corr + p.sum(axis=1), acc * corr[:, None] + p @ zj), None

        init = (jnp.full((bq,), -jnp.inf, q.dtype), jnp.zeros((bq,), q.dtype), jnp.zeros((bq, z.shape[1]), z.dtype))
        (mx, s, acc), _ = lax.scan(step, init, (kt, zt, vt))
        return acc / s[:, None], mx + jnp.log(s)

    out, lse = lax.map(row_tile, qt)                # [nq, bq, K], [nq, bq]
    return out.reshape(-1, z.shape[1])[:n], lse.reshape(-1)[:n]


def softmax_apply(q: Array, k: Array, lse: Array, z: Array, scale: float, block: int, transpose: bool) -> Array:
    """P @ z (`transpose=False`, z `[M, K]` → `[N, K]`) or Pᵀ @ z (z `[N, K]` → `[M, K]`) given the row lse.

    P_ij = exp(scale · q_i·k_j − lse_i). The outer loop runs over output tiles, the inner scan over the summed
    axis, so memory is O(block² + N·K).
    """
    n, m = q.shape[0], k.shape[0]
    bq, bk = min(block, n), min(block, m)
    qt, lt = _tiles(q * scale, bq), _tiles(lse, bq)     # [nq, bq, D], [nq, bq]
    kt = _tiles(k, bk)                                  # [nk, bk, D]
    if not transpose:
        zt, vt = _tiles(z, bk), _valid(m, bk)           # summed over key tiles

        def out_tile(inp):
            qi, li = inp

            def step(acc, kin):
                kj, zj, vj = kin
                p = jnp.where(vj[None, :], jnp.exp(qi @ kj.T - li[:, None]), 0.0)
                return acc + p @ zj, None

            acc, _ = lax.scan(step, jnp.zeros((bq, z.shape[1]), z.dtype), (kt, zt, vt))
            return acc

        out = lax.map(out_tile, (qt, lt))
        return out.reshape(-1, z.shape[1])[:n]

    zt, vt = _tiles(z, bq), _valid(n, bq)               # summed over query tiles

    def out_tile_t(kj):
        def step(acc, qin):
            qi, li, zi, vi = qin
            p = jnp.where(vi[:, None], jnp.exp(qi @ kj.T - li[:, None]), 0.0)   # [bq, bk]
            return acc + p.T @ zi, None

        acc, _ = lax.scan(step, jnp.zeros((bk, z.shape[1]), z.dtype), (qt, lt, zt, vt))
        return acc

    out = lax.map(out_tile_t, kt)
    return out.reshape(-1, z.shape[1])[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention_matmul(q: Array, k: Array, z: Array, scale: float, block: int) -> Array:
    """softmax(scale · q kᵀ) @ z, blockwise; differentiable in z (gradient Pᵀ g, blockwise, from the saved lse).

    q and k are treated as constants (their cotangent is zero): graphs are data, not parameters.
    """
    return softmax_matmul(q, k, z, scale, block)[0]


def _attention_matmul_fwd(q, k, z, scale, block):
    out, lse = softmax_matmul(q, k, z, scale, block)
    return out, (q, k, lse)


def _attention_matmul_bwd(scale, block, res, g):
    q, k, lse = res
    return jnp.zeros_like(q), jnp.zeros_like(k), softmax_apply(q, k, lse, g, scale, block, transpose=True)


attention_matmul.defvjp(_attention_matmul_fwd, _attention_matmul_bwd)


def row_lse(q: Array, k: Array, scale: float, block: int) -> Array:
    """Row log-sum-exp of scale · q kᵀ, `[N]`, blockwise."""
    return softmax_matmul(q, k, jnp.zeros((k.shape[0], 1), q.dtype), scale, block)[1]


def topk_rows(a: Array, b: Array, row_img: Array, col_img: Array, col_ok: Array, k_same: int, k_other: int,
              block: int) -> tuple[Array, Array, Array, Array]:
    """Top-k cosine neighbours of the rows of `a` among the rows of `b`, split by image.

    a `[R, F]`, b `[C, F]`, row_img `[R]`, col_img `[C]` int (image of each row / column), col_ok `[C]` bool
    (columns that may be neighbours). Returns (idx_same `[R, k_same]`, cos_same, idx_other `[R, k_other]`,
    cos_other), column indices into b; slots without a candidate have cos = −inf. Scanned over `block`-sized
    column tiles with a running top-k merge (memory O(block² + R·k)), row tiles mapped.
    """
    r, c = a.shape[0], b.shape[0]
    unit = lambda x: (x / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)
                      ).astype(x.dtype)     # bfloat16 features stay bfloat16; norms and cosines are float32
    a, b = unit(a), unit(b)
    bq, bk = min(block, r), min(block, c)
    at, gq = _tiles(a, bq, 0.0), _tiles(row_img, bq, -1)
    bt, gk = _tiles(b, bk, 0.0), _tiles(col_img, bk, -2)
    okt, cols = _tiles(col_ok, bk, False), _tiles(jnp.arange(c, dtype=jnp.int32), bk, 0)

    def merge(vals, idx, new_vals, new_idx, kk):
        if kk == 0:
            return vals, idx
        top, pos = lax.top_k(jnp.concatenate([vals, new_vals], axis=1), kk)
        return top, jnp.take_along_axis(jnp.concatenate([idx, new_idx], axis=1), pos, axis=1)

    def row_tile(inp):
        ai, gi = inp

        def step(carry, kin):
            vs, is_, vo, io = carry
            bj, gj, okj, cj = kin
            cos = jnp.dot(ai, bj.T, preferred_element_type=jnp.float32)       # [bq, bk]
            same = (gi[:, None] == gj[None, :]) & okj[None, :]
            other = (gi[:, None] != gj[None, :]) & okj[None, :]
            cj = jnp.broadcast_to(cj[None, :], cos.shape)
            vs, is_ = merge(vs, is_, jnp.where(same, cos, -jnp.inf), cj, k_same)
            vo, io = merge(vo, io, jnp.where(other, cos, -jnp.inf), cj, k_other)
            return (vs, is_, vo, io), None

        # built from ai so that, under shard_map, the carry varies over the mesh axis as the tile does
        neg, zero = jnp.full_like(ai[:, :1], -jnp.inf, jnp.float32), jnp.zeros_like(ai[:, :1], jnp.int32)
        init = (jnp.broadcast_to(neg, (bq, k_same)), jnp.broadcast_to(zero, (bq, k_same)),
                jnp.broadcast_to(neg, (bq, k_other)), jnp.broadcast_to(zero, (bq, k_other)))
        return lax.scan(step, init, (bt, gk, okt, cols))[0]

    vs, is_, vo, io = lax.map(row_tile, (at, gq))
    flat = lambda x: x.reshape(x.shape[0] * x.shape[1], x.shape[2])[:r]     # (k may be 0: no -1 here)
    return flat(is_), flat(vs), flat(io), flat(vo)
