"""Blocked kernels behind the matrix-free graphs: softmax-attention products and top-k neighbour search.

Nothing here forms an N×M matrix: work proceeds in [block_q, block_k] tiles, so memory is O(block² + N·K); the
neighbour search in [block, chunk] tiles with chunk ≫ block (one top-k per tile, merged only between chunks; wide
rows by group maxima first, `top_k_grouped`: `lax.top_k`'s answer at a fraction of its CPU cost).

Precision: q, k, a, b may be stored in bfloat16 (half the memory and bandwidth; tensor-core products on an
accelerator); every product is accumulated and returned in float32 (`preferred_element_type`), the scale is applied
to the float32 logits (never to a bfloat16 operand), and exp / the row max / the log-sum-exp / the accumulators over
z are float32 whatever the input dtype. Outputs are float32 (P·z, lse, cosines).

Shape legend
    N  query rows (graph nodes)     M  key columns (= N for a graph)     D, F  feature dim     K  vectors (eigvecs)
    bq, bk  tile sizes              nq, nk  number of row / column tiles
    R, C  rows / columns of a neighbour search      n  images    per  tokens per image    k  neighbours per row
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


def logits(qi: Array, kj: Array, scale: float) -> Array:
    """scale · qi kjᵀ `[bq, bk]` float32: the product accumulated in float32 whatever the dtype of qi `[bq, D]`,
    kj `[bk, D]` (bfloat16 storage: the result equals the float32 product of the stored values), then scaled."""
    return scale * jnp.dot(qi, kj.T, preferred_element_type=jnp.float32)


def _f32(x: Array) -> Array:
    return x.astype(jnp.float32)


def softmax_matmul(q: Array, k: Array, z: Array, scale: float, block: int) -> tuple[Array, Array]:
    """P @ z and the row log-sum-exp, with P = softmax(scale · q kᵀ) row-wise, by an online softmax.

    q `[N, D]`, k `[M, D]` (float32 or bfloat16), z `[M, K]` → (`[N, K]`, lse `[N]`), both float32 (logits, max,
    sum and accumulator in float32). Memory O(block² + N·K).
    """
    n, m = q.shape[0], k.shape[0]
    bq, bk = min(block, n), min(block, m)
    qt = _tiles(q, bq)                              # [nq, bq, D]
    kt, zt, vt = _tiles(k, bk), _tiles(_f32(z), bk), _valid(m, bk)   # [nk, bk, D], [nk, bk, K], [nk, bk]

    def row_tile(qi):                               # qi [bq, D]
        def step(carry, inp):
            mx, s, acc = carry                      # [bq], [bq], [bq, K]
            kj, zj, vj = inp
            lg = jnp.where(vj[None, :], logits(qi, kj, scale), -jnp.inf)    # [bq, bk]
            new = jnp.maximum(mx, lg.max(axis=1))
            corr = jnp.exp(mx - new)
            p = jnp.exp(lg - new[:, None])
            return (new, s * corr + p.sum(axis=1), acc * corr[:, None] + p @ zj), None

        f32 = jnp.float32
        init = (jnp.full((bq,), -jnp.inf, f32), jnp.zeros((bq,), f32), jnp.zeros((bq, z.shape[1]), f32))
        (mx, s, acc), _ = lax.scan(step, init, (kt, zt, vt))
        return acc / s[:, None], mx + jnp.log(s)

    out, lse = lax.map(row_tile, qt)                # [nq, bq, K], [nq, bq]
    return out.reshape(-1, z.shape[1])[:n], lse.reshape(-1)[:n]


def softmax_apply(q: Array, k: Array, lse: Array, z: Array, scale: float, block: int, transpose: bool) -> Array:
    """P @ z (`transpose=False`, z `[M, K]` → `[N, K]`) or Pᵀ @ z (z `[N, K]` → `[M, K]`) given the row lse.

    P_ij = exp(scale · q_i·k_j − lse_i), in float32 (q, k float32 or bfloat16; the result float32). The outer loop
    runs over output tiles, the inner scan over the summed axis, so memory is O(block² + N·K).
    """
    n, m = q.shape[0], k.shape[0]
    bq, bk = min(block, n), min(block, m)
    qt, lt = _tiles(q, bq), _tiles(_f32(lse), bq)       # [nq, bq, D], [nq, bq]
    kt = _tiles(k, bk)                                  # [nk, bk, D]
    if not transpose:
        zt, vt = _tiles(_f32(z), bk), _valid(m, bk)     # summed over key tiles

        def out_tile(inp):
            qi, li = inp

            def step(acc, kin):
                kj, zj, vj = kin
                p = jnp.where(vj[None, :], jnp.exp(logits(qi, kj, scale) - li[:, None]), 0.0)
                return acc + p @ zj, None

            acc, _ = lax.scan(step, jnp.zeros((bq, z.shape[1]), jnp.float32), (kt, zt, vt))
            return acc

        out = lax.map(out_tile, (qt, lt))
        return out.reshape(-1, z.shape[1])[:n]

    zt, vt = _tiles(_f32(z), bq), _valid(n, bq)         # summed over query tiles

    def out_tile_t(kj):
        def step(acc, qin):
            qi, li, zi, vi = qin
            p = jnp.where(vi[:, None], jnp.exp(logits(qi, kj, scale) - li[:, None]), 0.0)   # [bq, bk]
            return acc + p.T @ zi, None

        acc, _ = lax.scan(step, jnp.zeros((bk, z.shape[1]), jnp.float32), (qt, lt, zt, vt))
        return acc

    out = lax.map(out_tile_t, kt)
    return out.reshape(-1, z.shape[1])[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention_matmul(q: Array, k: Array, z: Array, scale: float, block: int) -> Array:
    """softmax(scale · q kᵀ) @ z `[N, K]` float32, blockwise; differentiable in z (gradient Pᵀ g, blockwise, from the
    saved lse, in z's dtype).

    q and k are treated as constants (their cotangent is zero): graphs are data, not parameters.
    """
    return softmax_matmul(q, k, z, scale, block)[0]


def _attention_matmul_fwd(q, k, z, scale, block):
    out, lse = softmax_matmul(q, k, z, scale, block)
    return out, (q, k, lse, jnp.zeros((), z.dtype))


def _attention_matmul_bwd(scale, block, res, g):
    q, k, lse, z0 = res                 # z0: a scalar of z's dtype (its cotangent must have that dtype)
    gz = softmax_apply(q, k, lse, g, scale, block, transpose=True).astype(z0.dtype)
    return jnp.zeros_like(q), jnp.zeros_like(k), gz


attention_matmul.defvjp(_attention_matmul_fwd, _attention_matmul_bwd)


def row_lse(q: Array, k: Array, scale: float, block: int) -> Array:
    """Row log-sum-exp of scale · q kᵀ, `[N]` float32, blockwise."""
    return softmax_matmul(q, k, jnp.zeros((k.shape[0], 1), jnp.float32), scale, block)[1]


def unit_rows(x: Array) -> Array:
    """Rows of `x` `[N, F]` scaled to unit length; norms in float32, the result in x's dtype (bfloat16 stays)."""
    return (x / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True), 1e-12)).astype(x.dtype)


INTRA_BUDGET = 1 << 22      # cosines per intra-image chunk (images · per²): 16 MiB of float32
INTER_BUDGET = 1 << 24      # cosines per inter-image tile (block · column chunk): 64 MiB of float32


def _flip(bits: Array) -> Array:
    """The int32 bits of float32 numbers ↔ their rank keys (`_rank_key`): the magnitude bits of negative numbers
    inverted. Its own inverse."""
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _rank_key(x: Array) -> Array:
    """int32 keys of float32 x that order as `lax.top_k` orders the floats (a total order: −0.0 below 0.0, NaN
    above +inf), so a max of keys is the entry top_k would take first and ties stay ties; `_rank_float` undoes it."""
    return _flip(lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32))


def _rank_float(key: Array) -> Array:
    """The float32 numbers of rank keys (`_rank_key`'s inverse, bit for bit)."""
    return lax.bitcast_convert_type(_flip(key), jnp.float32)


def top_k_grouped(x: Array, k: int, g: int = 8) -> tuple[Array, Array]:
    """`lax.top_k(x, k)` over the last axis of x `[..., W]`, by way of groups of g: the same values and indices
    (ties to the lower index), at a fraction of the cost for wide rows — XLA's CPU `top_k` costs several times a max
    per entry. The k groups with the largest maxima hold the k largest entries (among ties, the lowest-index ones:
    an excluded group tied at the k-th value lies after every included group that holds that value as its max), so
    one `top_k` over the W / g group maxima (taken on `_rank_key`s, top_k's own order, and turned back into floats:
    XLA's CPU `top_k` of int32 is many times slower), the k groups put back in index order, and one `top_k` over
    their k·g entries give top_k's answer. Plain `top_k` when g does not divide W or there are fewer than k groups.
    Returns (values `[..., k]`, indices `[..., k]` int32)."""
    w = x.shape[-1]
    if g <= 1 or w % g or w // g < k:
        v, i = lax.top_k(x, k)
        return v, i.astype(jnp.int32)
    xg = x.reshape(*x.shape[:-1], w // g, g)
    best = _rank_float(jnp.max(_rank_key(xg), axis=-1))
    _, gi = lax.top_k(best, k)                      # [..., k] the k best groups (of floats: top_k's fast path)
    gi = jnp.sort(gi, axis=-1)                      # their entries in index order
    cand = jnp.take_along_axis(xg, gi[..., None], axis=-2).reshape(*x.shape[:-1], k * g)
    v, p = lax.top_k(cand, k)
    return v, (jnp.take_along_axis(gi, p // g, axis=-1) * g + p % g).astype(jnp.int32)


def topk_intra(a: Array, b: Array, per: int, k: int) -> tuple[Array, Array]:
    """Top-k cosine neighbours of every row of `a` among the columns of its own image only.

    a, b `[n·per, F]` unit rows, image-major, the same n images (row i's image is i // per, and so is column j's).
    Returns (idx `[n·per, k]` int32 column indices into b, cos `[n·per, k]` float32), largest first, ties to the
    lower column. One [per, per] block per image (never N×N), images mapped in chunks of ≤ `INTRA_BUDGET` cosines.
    """
    n, f = a.shape[0] // per, a.shape[1]
    if k == 0:
        return jnp.zeros((a.shape[0], 0), jnp.int32), jnp.zeros((a.shape[0], 0), jnp.float32)

    def one(ab):
        ai, bi = ab                                                     # [per, F] each
        cos, pos = lax.top_k(jnp.dot(ai, bi.T, preferred_element_type=jnp.float32), k)
        return pos.astype(jnp.int32), cos

    pos, cos = lax.map(one, (a.reshape(n, per, f), b.reshape(n, per, f)),
                       batch_size=max(1, min(n, INTRA_BUDGET // (per * per))))
    first = (jnp.arange(n, dtype=jnp.int32) * per)[:, None, None]
    return (pos + first).reshape(n * per, k), cos.reshape(n * per, k)


def topk_inter(a: Array, b: Array, row_img: Array, col_img: Array, col_ok: Array, k: int,
               block: int) -> tuple[Array, Array]:
    """Top-k cosine neighbours of the rows of `a` among the columns of `b` of *other* images.

    a `[R, F]`, b `[C, F]` unit rows; row_img `[R]`, col_img `[C]` int (image of each row / column), col_ok `[C]`
    bool (columns that may be neighbours). Returns (idx `[R, k]` int32 column indices into b, cos `[R, k]`
    float32), largest first, ties to the lower column; slots without a candidate have cos = −inf.
    Rows in tiles of `block`, columns in wide chunks of ≤ `INTER_BUDGET` // block (one chunk up to that many
    columns): per tile one matmul and one top-k per chunk (`top_k_grouped`), merged between chunks only. Memory
    O(block·chunk + R·k).
    """
    r, c = a.shape[0], b.shape[0]
    if k == 0:
        return jnp.zeros((r, 0), jnp.int32), jnp.zeros((r, 0), jnp.float32)
    bq = min(block, r)
    width = min(c, max(k, INTER_BUDGET // bq))
    nc = -(-c // width)
    width = max(min(k, c), -(-c // nc))                         # even chunks (less padding), never narrower than k
    at, gq = _tiles(a, bq, 0.0), _tiles(row_img, bq, -1)         # [nq, bq, F], [nq, bq]
    bt, gk = _tiles(b, width, 0.0), _tiles(col_img, width, -2)   # [nc, width, F], [nc, width]
    okt = _tiles(col_ok, width, False)
    first = jnp.arange(nc, dtype=jnp.int32) * width              # [nc]

    def row_tile(inp):
        ai, gi = inp

        def chunk(carry, kin):
            vals, idx = carry
            bj, gj, okj, cj = kin
            cos = jnp.dot(ai, bj.T, preferred_element_type=jnp.float32)              # [bq, width]
            cos = jnp.where((gi[:, None] != gj[None, :]) & okj[None, :], cos, -jnp.inf)
            top, pos = top_k_grouped(cos, k)
            if nc == 1:
                return (top, pos.astype(jnp.int32)), None
            both, where = lax.top_k(jnp.concatenate([vals, top], axis=1), k)         # earlier chunks first
            return (both, jnp.take_along_axis(jnp.concatenate([idx, pos.astype(jnp.int32) + cj], axis=1), where,
                                              axis=1)), None

        # built from ai so that, under shard_map, the carry varies over the mesh axis as the tile does
        init = (jnp.broadcast_to(jnp.full_like(ai[:, :1], -jnp.inf, jnp.float32), (bq, k)),
                jnp.broadcast_to(jnp.zeros_like(ai[:, :1], jnp.int32), (bq, k)))
        return lax.scan(chunk, init, (bt, gk, okt, first))[0]

    vals, idx = lax.map(row_tile, (at, gq))
    return idx.reshape(-1, k)[:r], vals.reshape(-1, k)[:r]
