"""The layer-distributed eigen-objective over graph groups of different grids.

X lives on a base grid (H0, W0); graph group l sees z_{l,k} = normalise(pool_l(x_k)) on its own grid, where
pool_l is adaptive average pooling (torch's bins) and normalise makes each channel unit-norm over the group's
nodes. With w_l the per-graph weights (normalised to sum 1 over all graphs of all groups):

    Rayleigh form   R_{l,k} = z_{l,k}ᵀ P_l z_{l,k};   objective = Σ_k Σ_l w_l R_{l,k}
    paper form      2·Σ_l w_l mean_k |R_{l,k} − 1| + 2λ·Σ_l w_l mean_{k≠k'} (z_{l,k}ᵀ z_{l,k'})²
    linearised      A = Σ_l w_l c_l G_lᵀ sym(P_l) G_l,  B = Σ_l w_l c_l G_lᵀ G_l,  c_l = N0 / N_l

where G_l is the pooling as a matrix. For graphs that all share the base grid, B = I and the optimum of the
Rayleigh form over orthonormal X is the sum of the top-K eigenvalues of A = Σ_l w_l sym(P_l).

Shape legend
    B  images     K  vectors     (H0, W0)  base grid     M0 = B·H0·W0 base nodes
    l  graph group; S_l its batch dims; G = Σ_l |S_l| graphs in all     (h, w)  a group's grid; N = B·h·w
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.graphs import Graph

Array = Any


@functools.lru_cache(maxsize=256)
def pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Adaptive average pooling along one axis as a matrix `[n_out, n_in]` (torch's bins).

    Row i averages inputs floor(i·n_in/n_out) … ceil((i+1)·n_in/n_out) − 1; for n_out > n_in it replicates.
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def base_grid_of(graphs: Sequence[Graph]) -> tuple[int, int]:
    """The default base grid: the grid of the group with the most nodes per image (first on ties)."""
    return max((g.grid for g in graphs), key=lambda hw: hw[0] * hw[1])


def check_graphs(graphs: Sequence[Graph], base_grid: tuple[int, int] | None = None, *, what: str = "graphs"
                 ) -> tuple[tuple[int, int], int]:
    """Validate a list of graph groups (at least one, each a `graphs.Graph`, all of one number of images); returns
    (base grid, number of images). A problem is one `InputError` naming `what` (the argument)."""
    from spectral_jax.errors import InputError

    fix = ("build graphs with spectral_jax.graphs (attention, value, knn, dense, from_taps) and pass one or a list "
           "of them; spectral_jax.solve also takes Taps (e.g. Backbone.taps(x))")
    if not graphs:
        raise InputError(what, "holds no graph", fix)
    for i, g in enumerate(graphs):
        if not isinstance(g, Graph):
            name = f"{what} {type(g).__name__}" if len(graphs) == 1 else f"{what}[{i}] {type(g).__name__}"
            raise InputError(name, "is not a graph (an AttentionGraph, DenseGraph or KnnGraph)", fix)
    nimg = {g.num_images for g in graphs}
    if len(nimg) != 1:
        raise InputError(what, f"graph groups disagree on the number of images: {sorted(nimg)}",
                         "build every group from the same images")
    base = tuple(base_grid) if base_grid is not None else base_grid_of(graphs)
    return (int(base[0]), int(base[1])), nimg.pop()


def pool(x: Array, grid: tuple[int, int]) -> Array:
    """G x: `[B, ..., H0, W0]` → `[B, ..., h, w]` by adaptive average pooling (identity on the same grid)."""
    h0, w0 = x.shape[-2:]
    if (h0, w0) == tuple(grid):
        return x
    return jnp.einsum("hH,...HW,wW->...hw", pool_matrix(h0, grid[0]), x, pool_matrix(w0, grid[1]))


def unpool(y: Array, base: tuple[int, int]) -> Array:
    """Gᵀ y: `[B, ..., h, w]` → `[B, ..., H0, W0]` (the adjoint of `pool`)."""
    h, w = y.shape[-2:]
    if (h, w) == tuple(base):
        return y
    return jnp.einsum("hH,...hw,wW->...HW", pool_matrix(base[0], h), y, pool_matrix(base[1], w))


def to_nodes(x: Array) -> Array:
    """`[B, K, h, w]` → `[B·h·w, K]` (image-major node order, as the graphs use)."""
    b, k, h, w = x.shape
    return jnp.transpose(x, (0, 2, 3, 1)).reshape(b * h * w, k)


def from_nodes(z: Array, num_images: int, grid: tuple[int, int]) -> Array:
    """`[B·h·w, K]` → `[B, K, h, w]`."""
    return jnp.transpose(z.reshape(num_images, grid[0], grid[1], -1), (0, 3, 1, 2))


VANISH = 32 * float(np.finfo(np.float32).eps)   # a pooled column this small relative to its vector is rounding


def project(x: Array, grid: tuple[int, int], eps: float = 1e-12, vanish: float | None = None) -> Array:
    """z = normalise(pool(x)): `[B, K, H0, W0]` → `[B·h·w, K]`, each column unit-norm.

    vanish (None: off, as the solvers' losses and the official code's `F.normalize` have it): a column whose pooled
    norm is at most `vanish` × its norm on the base grid is 0, not its rounding noise scaled to unit length — on a
    1×1 grid (Stable Diffusion's mid block below 128² inputs) every vector orthogonal to the constant pools to
    ~1e-8, which normalised would score R = 1 there. The reported quotients use `VANISH`."""
    z = to_nodes(pool(x, grid))
    norm = jnp.linalg.norm(z, axis=0, keepdims=True)
    z = z / jnp.maximum(norm, eps)
    if vanish is None:
        return z
    return jnp.where(norm > vanish * jnp.linalg.norm(to_nodes(x), axis=0, keepdims=True), z, 0.0)


def normalised_weights(graphs: Sequence[Graph], weights: Sequence[Array] | None) -> list[Array]:
    """Per-graph weights, one array of each group's batch shape, summing to 1 over all graphs."""
    if weights is None:
        weights = [jnp.ones(g.batch_shape, jnp.float32) for g in graphs]
    if isinstance(weights, (str, bytes)):           # e.g. gd(graphs, K, "eigen"): a preset passed by position
        from spectral_jax.errors import InputError

        raise InputError(f"weights {weights!r}", "is text, not one weight array per graph group (the solvers' third "
                         "parameter is weights; preset, steps and the other options are keywords)",
                         "pass the option by name, e.g. gd(graphs, K, preset='eigen')")
    if len(weights) != len(graphs):
        raise ValueError(f"{len(weights)} weight arrays for {len(graphs)} graph groups")
    ws = [jnp.broadcast_to(jnp.asarray(w, jnp.float32), g.batch_shape) for g, w in zip(graphs, weights)]
    _check_weights(ws)
    total = sum(w.sum() for w in ws)
    return [w / total for w in ws]


def _check_weights(ws: Sequence[Array]) -> None:
    """Weights the solvers can normalise: finite, ≥ 0, not all 0 (else an `InputError`; a 0 total would divide the
    objective into NaNs). Weights traced under `jit` or `grad` are not looked at: their caller checked them."""
    from spectral_jax.errors import InputError

    try:
        flat = np.concatenate([np.asarray(w, np.float64).ravel() for w in ws]) if ws else np.zeros(0)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if flat.size and (not np.all(np.isfinite(flat)) or flat.min() < 0 or flat.sum() <= 0):
        bad = ("not finite" if not np.all(np.isfinite(flat)) else "negative" if flat.min() < 0 else "all 0")
        raise InputError("weights", f"the graph weights are {bad} (the solvers normalise them to sum 1 over the "
                         "graphs)", "pass finite weights ≥ 0 with a positive sum")


def rayleigh(graphs: Sequence[Graph], x: Array, weights: Sequence[Array] | None = None, *,
             sequential: bool = False, vanish: float | None = None) -> tuple[list[Array], Array]:
    """Rayleigh quotients and the objective. x `[B, K, H0, W0]` → (per group R `[*S_l, K]`, objective scalar).

    R_{l,k} = z_{l,k}ᵀ P_l z_{l,k} (= z ᵀ sym(P_l) z); objective = Σ_k Σ_l w_l R_{l,k} (w normalised).
    sequential: each group's graphs one after the other (`Graph.quadratic`; the faster for diagnostics on a CPU)
    rather than all at once. vanish: `project`'s (the results' reported quotients: `VANISH`, a column that pools
    to rounding noise scores 0).
    """
    ws = normalised_weights(graphs, weights)
    rqs, obj = [], 0.0
    for g, w in zip(graphs, ws):
        z = project(x, g.grid, vanish=vanish)
        r = g.quadratic(z, sequential)
        rqs.append(r)
        obj = obj + jnp.sum(w[..., None] * r)
    return rqs, obj


def paper_loss(graphs: Sequence[Graph], x: Array, weights: Sequence[Array] | None = None, lam: float = 1.0
               ) -> Array:
    """The official code's loss: 2·Σ_l w_l mean_k |R_{l,k} − 1| + 2λ·Σ_l w_l mean_{k≠k'} (z_{l,k}ᵀ z_{l,k'})².

    x `[B, K, H0, W0]` (in the paper, non-negative and summing to 1 over K at each pixel).
    """
    ws = normalised_weights(graphs, weights)
    kk = x.shape[1]
    off = 1.0 - jnp.eye(kk)
    loss = 0.0
    for g, w in zip(graphs, ws):
        z = project(x, g.grid)
        r = jnp.einsum("nk,...nk->...k", z, g.matvec(z))                 # [*S, K]
        gram = (((z.T @ z) * off) ** 2).sum() / (kk * (kk - 1)) if kk > 1 else 0.0
        loss = loss + 2.0 * jnp.sum(w * jnp.abs(r - 1.0).mean(-1)) + 2.0 * lam * jnp.sum(w) * gram
    return loss


def linear_operators(graphs: Sequence[Graph], weights: Sequence[Array] | None, base: tuple[int, int],
                     num_images: int):
    """The linearised objective's operators on base-grid node vectors `[M0, K]`.

    Returns (A, B, same_grid): callables `[M0, K] → [M0, K]` for A = Σ_l w_l c_l G_lᵀ sym(P_l) G_l and
    B = Σ_l w_l c_l G_lᵀ G_l, and whether every group is on the base grid (then B = I exactly).
    """
    ws = normalised_weights(graphs, weights)
    n0 = base[0] * base[1]
    same_grid = all(tuple(g.grid) == tuple(base) for g in graphs)

    def a_op(v):
        xb = from_nodes(v, num_images, base)
        out = 0.0
        for g, w in zip(graphs, ws):
            c = n0 / (g.grid[0] * g.grid[1])
            z = to_nodes(pool(xb, g.grid))
            y = jnp.tensordot(w, g.sym_matvec(z), axes=w.ndim) * c           # [N, K]
            out = out + to_nodes(unpool(from_nodes(y, num_images, g.grid), base))
        return out

    def b_op(v):
        if same_grid:
            return v
        xb = from_nodes(v, num_images, base)
        out = 0.0
        for g, w in zip(graphs, ws):
            c = n0 / (g.grid[0] * g.grid[1])
            out = out + c * jnp.sum(w) * to_nodes(unpool(pool(xb, g.grid), base))
        return out

    return a_op, b_op, same_grid


def dense_operators(graphs: Sequence[Graph], weights: Sequence[Array] | None, base: tuple[int, int],
                    num_images: int) -> tuple[Array, Array]:
    """A and B of `linear_operators` materialised `[M0, M0]` (small problems: the exact solver's fast path).

    Each group's Σ_s w_s sym(P_s) is accumulated one graph at a time (`lax.scan`), so memory is O(N² + M0²).
    """
    ws = normalised_weights(graphs, weights)
    n0 = base[0] * base[1]
    m0 = num_images * n0
    a = jnp.zeros((m0, m0), jnp.float32)
    b = jnp.zeros((m0, m0), jnp.float32)
    for g, w in zip(graphs, ws):
        c = n0 / (g.grid[0] * g.grid[1])
        s = weighted_sym_dense(g, w)                                         # [N, N]
        if tuple(g.grid) == tuple(base):                                      # G = I: no pooling products
            a = a + s
            b = b + jnp.sum(w) * jnp.eye(m0, dtype=jnp.float32)
            continue
        gm = _pool_nodes_matrix(base, g.grid, num_images)                     # [N, M0]
        a = a + c * gm.T @ s @ gm
        b = b + c * jnp.sum(w) * gm.T @ gm
    return a, b


@jax.jit
def weighted_sym_dense(g: Graph, w: Array) -> Array:
    """Σ_s w_s sym(P_s) over a group's graphs, materialised `[N, N]` (w `[*S]`).

    Accumulates S = Σ_s w_s P_s one graph at a time (`lax.scan`, memory O(N²)) and symmetrises once at the end:
    ½(S + Sᵀ) = Σ_s w_s ½(P_s + P_sᵀ), without a transpose per graph.
    """
    flat = g._flat()
    wf = w.reshape(-1)

    def step(acc, inp):
        g1, w1 = inp
        return acc + w1 * g1._dense1(), None

    n = g.num_nodes
    acc, _ = jax.lax.scan(step, jnp.zeros((n, n), jnp.float32), (flat, wf))
    return 0.5 * (acc + acc.T)


def _pool_nodes_matrix(base: tuple[int, int], grid: tuple[int, int], num_images: int) -> np.ndarray:
    """G as a matrix `[B·h·w, B·H0·W0]` (block-diagonal over images)."""
    one = np.kron(pool_matrix(base[0], grid[0]), pool_matrix(base[1], grid[1]))
    return np.kron(np.eye(num_images, dtype=np.float32), one) if num_images > 1 else one
