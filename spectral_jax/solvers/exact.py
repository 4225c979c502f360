"""The exact solver: top-K generalised eigenvectors of the linearised objective, A x = λ B x.

A = Σ_l w_l c_l G_lᵀ sym(P_l) G_l and B = Σ_l w_l c_l G_lᵀ G_l (see `spectral_jax.objective`). For graphs that
all share the base grid B = I and this is exactly the optimum of the Rayleigh objective.

- small problems (M0 ≤ `dense_max`): materialise A, B and solve for the top K only (LAPACK subset drivers on CPU,
  the device's `eigh` elsewhere, after a Cholesky of B when B ≠ I);
- otherwise matrix-free LOBPCG (`jax.experimental.sparse.linalg.lobpcg_standard`) on B^{-1/2} A B^{-1/2}, with
  B^{-1/2} applied by a Chebyshev polynomial (B is well conditioned: B ⪰ w_base·I when a group sits on the base
  grid, which the default base grid guarantees).

Every Result says how well it solved (`Result.convergence`, a `Convergence`): converged (bool), iterations (LOBPCG iterations; ARPACK's
operator applications; 0 for the dense path), tol, max_residual and residuals `[K]`: the relative residual of each pair,
‖A x − λ B x‖ / (‖A x‖ + |λ| ‖B x‖) (the normwise backward error; 0 would be exact), computed in float32 from one
application of A and B to the K returned vectors. LOBPCG stops when every pair is below `tol` (when B ≠ I: every
pair of B^{-1/2} A B^{-1/2}, which it iterates on); a run that reaches `maxiter` first and is still above `tol` has
converged False and warns. The dense path is a direct solve: its record's criterion says so (`DENSE_CRITERION`)
instead of claiming the residuals met `tol` (for a pair with λ ≈ 0 the relative residual of float32 rounding can
exceed it).

Many one-image problems of one structure (qk/vv graphs of a batch of images): `exact_batch`, the dense path for all
of them in one compiled program (`pipeline.solve` uses it).

On an accelerator nothing inside a solve waits for the device: the operators, the eigensolver, the residuals and the
per-graph quotients are dispatched back to back and the host receives them in one transfer (`jax.device_get`), then
sorts, fixes signs and assembles the `Result`; the multi-grid LOBPCG's Chebyshev interval comes from the weights and
the pooling on the host (`metric_bounds`), not from a power iteration read back. `seconds` is the wall time of the
whole solve up to that transfer. What still waits: the ARPACK path (host by design: scipy), the kNN CSR build
(`solvers.sparse`, host), and the LOBPCG iteration count read with the rest at the end.

Shape legend
    M0  base nodes (B·H0·W0)    K  eigenvectors    d  Chebyshev degree    b  images in one `exact_batch` call
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.experimental.sparse.linalg import lobpcg_standard

from spectral_jax.errors import InputError
from spectral_jax.options import DENSE_MAX, TOL, ExactSpec, check_num_eigs, solver_spec
from spectral_jax.graphs import Graph, KnnGraph
from spectral_jax.objective import (check_graphs, dense_operators, linear_operators, normalised_weights,
                                    pool_matrix, weighted_sym_dense)
from spectral_jax.solvers.result import Convergence, Result, assemble, quotients
from spectral_jax.solvers.sparse import ell_from_csr, knn_csr


LOBPCG_TOL = TOL      # 3.45e-4: a relative residual float32 reaches (`exact`; `options.TOL`)
BATCH_BYTES = 2 * 1024 ** 3   # memory budget of one `exact_batch` call (`images_per_call`)
DENSE_ARRAYS = 10     # n×n float32 arrays per image in `exact_batch` (`images_per_call`)


def as_list(graphs) -> list[Graph]:
    return list(graphs) if isinstance(graphs, (list, tuple)) else [graphs]


def check_problem(graphs: Sequence[Graph], num_eigs: int, base_grid) -> tuple[tuple[int, int], int, int]:
    """(base grid, images, M0) after checking K against the graph (`options.check_num_eigs`: 2 ≤ K < M0)."""
    base, nimg = check_graphs(graphs, base_grid)
    m0 = nimg * base[0] * base[1]
    check_num_eigs(num_eigs, m0)
    return base, nimg, m0


def exact(graphs, num_eigs: int = 20, weights=None, base_grid=None, *, options: ExactSpec | None = None,
          seed: int = 0, **fields) -> Result:
    """Top-`num_eigs` eigenvectors of the linearised layer-distributed objective.

    graphs: a graph or a list of graph groups (grids may differ); weights: per-group arrays of batch shape.
    options: an `options.ExactSpec` (checked when it was made) — or its fields as keywords (tol, maxiter, dense_max,
    sparse_solver; batch_images is the pipeline's and unused here), made into one here (`options.solver_spec`: a
    name that is not an ExactSpec field, or fields beside options=, is one `InputError`); the solve reads only the
    spec. Dense top-K when the base problem has ≤ `dense_max` nodes (A is M0² floats: 256 MiB at 8192, about 1 GiB
    peak while it is built and solved), else LOBPCG (random start from `seed`) until every pair's relative residual
    (module docstring) is below `tol`, or `maxiter` iterations (then convergence.converged is False, with a warning).
    The default tol = √eps32 ≈ 3.5e-4 is one float32 reliably reaches: a residual can't fall much below eps32 · ‖A‖
    times a growth factor (the length of the sums inside a matvec), so pairs with |λ| ≳ 1e-3 ‖A‖ get there, and then
    the eigenvalue error is ~ (tol·λ)² / gap. Every LOBPCG iteration applies all graphs to 3K vectors — for
    attention graphs about the work of building A once — so the dense path is far faster wherever A fits; the
    matrix-free path is for problems whose A does not fit in memory (timings: benchmarks/results/history.md).
    kNN groups on one grid (the dataset graph) above `dense_max`: Σ_l w_l sym(P_l) coalesced once into a sparse
    matrix (`solvers.sparse`) and `sparse_solver`: "arpack" — implicitly restarted Lanczos (scipy `eigsh`, float32
    CSR, `maxiter` restarts, start vector from `seed`; method "exact-arpack", iterations = operator applications) —
    or "lobpcg" — JAX LOBPCG on the sliced-ELL matrix ("exact-lobpcg-sparse"); "auto": ARPACK on the CPU backend
    (the faster there), LOBPCG on accelerators. Should ARPACK not converge within `maxiter` restarts, LOBPCG runs
    instead (from the same seed, `maxiter` iterations) and reports its own convergence.
    Returns a `Result` (eigvecs `[B, K, H0, W0]`, eigvals `[B, K]` largest first: one solve, repeated per image;
    `seconds` the whole solve: operators, eigensolver, residuals and per-graph quotients; `steps` 0 — it takes no
    optimisation steps — with the eigensolver's count in convergence.iterations).
    """
    spec = solver_spec("exact", options, **fields).kwargs()     # tol resolved: None → LOBPCG_TOL
    dense_max, maxiter, tol, sparse_solver = spec["dense_max"], spec["maxiter"], spec["tol"], spec["sparse_solver"]
    graphs = as_list(graphs)
    base, nimg, m0 = check_problem(graphs, num_eigs, base_grid)
    ws = normalised_weights(graphs, weights)
    t0 = time.perf_counter()
    same = all(tuple(g.grid) == base for g in graphs)
    _check_metric(graphs, weights, base, same)
    if all(isinstance(g, KnnGraph) for g in graphs) and not any(bool(jnp.any(g.w > 0)) for g in graphs):
        raise InputError("graphs", "have no edge (every kNN neighbour's cosine at or below min_cos): every eigenvalue "
                         "would be 0 and any vectors eigenvectors", "lower min_cos (-1 keeps every neighbour "
                         "found), or check the features (all zero?)")
    fallback = False                    # ARPACK did not converge and LOBPCG ran instead
    if dense_fits(m0, num_eigs, dense_max):
        a, b = dense_operators(graphs, ws, base, nimg)
        vals, vecs = _dense_eig(a, b, num_eigs, same)
        steps, method = 0, "exact-dense"
        a_op, b_op = (lambda v: a @ v), (None if same else lambda v: b @ v)
    elif same and all(isinstance(g, KnnGraph) for g in graphs):
        if sparse_solver not in ("auto", "arpack", "lobpcg"):
            raise ValueError(f"sparse_solver={sparse_solver!r}: choose 'auto', 'arpack' or 'lobpcg'")
        arpack = sparse_solver == "arpack" or sparse_solver == "auto" and jax.default_backend() == "cpu"
        csr = knn_csr(graphs, ws)
        found = _arpack(csr, num_eigs, maxiter, float(tol), seed) if arpack else None
        b_op, fallback = None, arpack and found is None
        if found is not None:
            vals, vecs, steps = found
            method, a_op = "exact-arpack", (lambda v: jnp.asarray(csr @ np.asarray(v)))
        else:
            op = ell_from_csr(csr)
            del csr
            vals, vecs, steps = _lobpcg_sparse(op, _start(m0, num_eigs, seed), maxiter, float(tol) / (10.0 * m0))
            method, a_op = "exact-lobpcg-sparse", op.matvec
    else:
        vals, vecs, steps = _lobpcg(graphs, ws, weights, base, nimg, num_eigs, maxiter, tol, seed)
        method = "exact-lobpcg"
        a_op, b_op, _ = linear_operators(graphs, ws, base, nimg)
        b_op = None if same else b_op
    # from here on nothing waits for the device until the one transfer: residuals and quotients are dispatched on
    # the eigenpairs as they come (in the solver's order and signs; sorted and signed on the host)
    vals, vecs = jnp.asarray(vals, jnp.float32), jnp.asarray(vecs, jnp.float32)
    res = residuals(a_op, b_op, vecs, vals)
    dev = quotients(graphs, ws, vecs, nimg, base, b_op)       # b_op: B's product (None: B = I), as the solver's
    vals, vecs, res, steps, (rqs, obj, bv) = jax.device_get((vals, vecs, res, steps, dev))
    seconds = time.perf_counter() - t0
    vals, vecs, res, rqs, bv = largest_first(vals, vecs, res, rqs, bv)
    res = np.asarray(res, np.float64)
    steps = int(steps)
    if method == "exact-arpack":      # ARPACK's own test is on its residual estimate: hold it to the measured one
        converged = bool(res.max() <= tol)
    else:                             # a NaN (a NaN graph) converges nowhere, the dense path included
        converged = bool(np.all(np.isfinite(res))) and (method == "exact-dense" or steps < maxiter
                                                        or bool(res.max() <= tol))
    if not converged:
        # Read by API and command-line users alike: the options named are the API's, with the `dataset` command's
        # flags beside them (the only command that sets them; none sets dense_max).
        detail = f"max relative residual {res.max():.2e} > tol {tol:.1e}"
        what = (f"ARPACK converged by its residual estimate but the measured {detail}" if method == "exact-arpack"
                else f"the dense eigensolver's residuals are not finite ({detail}): are the graphs finite?"
                if method == "exact-dense"
                else f"LOBPCG stopped at maxiter={maxiter} before converging ({detail})")
        warnings.warn(f"exact: {what}; raise maxiter or tol (spectral-jax dataset: --maxiter N, --tol T), or, from "
                      f"Python, take the dense path with dense_max >= {m0}", RuntimeWarning, stacklevel=2)
    info = {"arpack": f"not converged in maxiter={maxiter} restarts: LOBPCG instead"} if fallback else {}
    # steps are optimisation steps (gd's), none here: the eigensolver's count is convergence.iterations
    return assemble(vecs, vals, rqs, obj, bv, nimg, base, steps=0, seconds=seconds, method=method, info=info,
                    convergence=_verdict(converged, steps, tol, res, method))


def dense_fits(m0: int, num_eigs: int, dense_max: int = DENSE_MAX) -> bool:
    """Whether `exact` takes its dense path for M0 base nodes: M0 ≤ dense_max, or K so large (5K ≥ M0) that an
    iterative solver would not pay."""
    return m0 <= dense_max or 5 * num_eigs >= m0


DENSE_CRITERION = "direct dense eigensolver"   # the dense path's verdict: no iteration to stop, nothing to converge


def _verdict(converged: bool, steps: int, tol: float, res: np.ndarray, method: str) -> Convergence:
    """The solve's record. An iterative path (LOBPCG, ARPACK) is converged when every pair's measured residual is at
    most tol ("max_residual <= tol"); the dense path is a direct solve (LAPACK / the device's `eigh`: backward
    stable, no iteration), recorded as such (`DENSE_CRITERION`) rather than as having met tol — its residuals are
    float32 rounding, which for a pair with λ ≈ 0 can exceed tol relative to ‖A x‖ + |λ| ‖B x‖ ≈ 0."""
    criterion = DENSE_CRITERION if method == "exact-dense" else "max_residual <= tol"
    return Convergence(converged, steps, tol, criterion, float(res.max()), tuple(res))


def largest_first(vals, vecs, res, rqs, bv):
    """Host arrays of one solve reordered by eigenvalue, largest first: vals `[K]`, vecs `[M0, K]`, res `[K]`,
    rqs (per group `[*S, K]`), bv `[M0, K]` or None (stable for ties: the solvers' order among equals is kept)."""
    order = np.argsort(-np.asarray(vals), kind="stable")
    pick = lambda x: None if x is None else np.asarray(x)[..., order]
    return pick(vals), pick(vecs), pick(res), [pick(r) for r in rqs], pick(bv)


def images_per_call(graphs: Sequence[Graph], base: tuple[int, int], budget_bytes: int = BATCH_BYTES) -> int:
    """How many images one compiled call of `exact_batch` takes within `budget_bytes`, for one image's graph groups
    `graphs` (only their shapes are read: `jax.eval_shape` output will do) on base grid `base`.

    Per image: `DENSE_ARRAYS` float32 n×n arrays, n = max(M0, the largest group's nodes) — A and B, one graph's
    logits, softmax and the running sum with its transpose while A is built, the eigensolver's copy of A, its
    workspace and eigenvectors, B's Cholesky factor — plus the image's graph data (the stacked copy of its q/k or
    v). E.g. DINOv2-B at 448² (M0 = 1024, 144 graphs of 1024 × 64): 40 + 72 MiB, so 18 images within 2 GiB; at 896²
    (M0 = 4096): 640 + 288 MiB, 2 images. At least 1.
    """
    n = max([base[0] * base[1]] + [g.num_nodes for g in graphs])
    data = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(graphs))
    return max(1, int(budget_bytes) // (DENSE_ARRAYS * 4 * n * n + data))


def exact_batch(graphs, num_eigs: int = 20, weights=None, base_grid=None, *, build=None, vmap: bool | None = None,
                subset: bool | None = None, tol: float = LOBPCG_TOL, options: ExactSpec | None = None
                ) -> list[Result]:
    """`exact`'s dense path for a batch of independent one-image problems of the same structure, in one compiled
    call: one `Result` per image, equal to `exact` on that image's graphs (to float32 rounding; the same info).

    graphs: groups whose every data leaf has a leading axis of b images (the b images' groups stacked leaf by leaf,
    e.g. `jax.tree.map(lambda *x: jnp.stack(x), *[from_taps(taps, "qk", image=i) for i in range(b)])`); or, with
    `build`, any pytree whose leaves have a leading axis of b images, `build(one image's slice)` → that image's
    groups, traced inside the program (no stacked copy of the graphs; `build` is a static argument of the compiled
    program, so a hashable value such as a frozen dataclass, not a new lambda per call). Each image's problem must
    take the dense path (`dense_fits`). weights: per-group arrays as in `exact`, the same for every image; tol: the
    tol each `Result.convergence` reports (a direct solve: recorded with `DENSE_CRITERION`, as in `exact`).

    One program builds every image's A (and B when the grids differ), solves, and computes the residuals, the
    per-graph quotients and B·X; the host gets it all in one transfer, then orders, signs and assembles each image's
    `Result` (`seconds`: the call's wall time shared equally). The eigensolver (subset None: by the backend): on the
    CPU backend LAPACK's subset driver per image (`_subset_eig`, called back from the program; faster than a full
    `eigh`), elsewhere the device's batched `eigh` (Cholesky route when B ≠ I). vmap: the images in parallel
    (`jax.vmap`: memory for all b at once) or one after the other (`lax.map`) while A and the quotients are built;
    None: one after the other on the CPU backend (faster there: one graph's N² tiles stay in cache),
    parallel elsewhere. Memory: about `images_per_call`'s estimate per image; split larger batches (the pipeline
    does). options: an `options.ExactSpec`, whose tol replaces `tol`.
    """
    if options is not None:
        tol = options.kwargs()["tol"]
    data = as_list(graphs) if build is None else graphs
    nb = int(jax.tree.leaves(data)[0].shape[0])
    one = as_list(jax.eval_shape(lambda d: _image(build, d), jax.tree.map(lambda x: x[0], data)))
    base, nimg, m0 = check_problem(one, num_eigs, base_grid)
    if nimg != 1 or not dense_fits(m0, num_eigs):
        raise ValueError(f"exact_batch takes one-image problems on the dense path (got {nimg} images per problem, "
                         f"M0 = {m0}): call exact on each")
    ws = normalised_weights(one, weights)
    same = all(tuple(g.grid) == base for g in one)
    _check_metric(one, weights, base, same)
    leaf = jax.tree.leaves(data)[0]                       # host (numpy) inputs go to the default device
    cpu = (next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]).platform == "cpu"
    parallel = (not cpu) if vmap is None else bool(vmap)
    lapack = cpu if subset is None else bool(subset)
    t0 = time.perf_counter()
    out = _solve_batch(data, build, ws, int(num_eigs), base, same, lapack, nb if parallel else None)
    vals, vecs, res, rqs, obj, bv = jax.device_get(out)                        # the one transfer
    seconds = (time.perf_counter() - t0) / nb
    results = []
    for i in range(nb):
        v, x, r, q, bvi = largest_first(vals[i], vecs[i], res[i], [rq[i] for rq in rqs],
                                        None if bv is None else bv[i])
        results.append(assemble(x, v, q, obj[i], bvi, 1, base, steps=0, seconds=seconds, method="exact-dense",
                                convergence=_verdict(bool(np.all(np.isfinite(r))), 0, tol, np.asarray(r, np.float64),
                                                     "exact-dense")))
    bad = [i for i, r in enumerate(results) if not r.convergence.converged]
    if bad:
        warnings.warn(f"exact_batch: {len(bad)} of {nb} problems (the first: {bad[0]}) have residuals that are not "
                      "finite; are their graphs finite?", RuntimeWarning, stacklevel=2)
    return results


def _image(build, d):
    """One image's graph groups from its slice `d` of `exact_batch`'s input."""
    return as_list(d if build is None else build(d))


@functools.partial(jax.jit, static_argnames=("build", "k", "base", "same", "subset", "batch_size"))
def _solve_batch(data, build, ws, k, base, same, subset, batch_size):
    """(vals `[b, k]`, vecs `[b, M0, k]`, residuals `[b, k]`, per-group R `[b, *S, k]`, objective `[b]`, B·X
    `[b, M0, k]` or None) of `exact_batch`; images mapped with `lax.map(batch_size=batch_size)` (None: one at a
    time)."""
    def operators(d):
        a, b = dense_operators(_image(build, d), ws, base, 1)
        return a, (None if same else b)

    a, b = jax.lax.map(operators, data, batch_size=batch_size)                # [b, M0, M0]
    nb, m0 = a.shape[0], a.shape[1]
    if subset:
        shapes = (jax.ShapeDtypeStruct((nb, k), jnp.float32), jax.ShapeDtypeStruct((nb, m0, k), jnp.float32))
        vals, vecs = jax.pure_callback(functools.partial(_subset_eig_each, k=k), shapes, a, b)
    else:
        vals, vecs = jax.vmap(lambda a1, b1: _top_eig(a1, b1, k, same))(a, b)
    res = jax.vmap(lambda a1, b1, x, l: residuals(lambda v: a1 @ v, None if same else (lambda v: b1 @ v), x, l))(
        a, b, vecs, vals)

    def quote(inp):
        gs = _image(build, inp[0])
        metric = None if same else linear_operators(gs, ws, base, 1)[1]
        return quotients(gs, ws, inp[1], 1, base, metric)

    rqs, obj, bv = jax.lax.map(quote, (data, vecs), batch_size=batch_size)
    return vals, vecs, res, rqs, obj, bv


def _subset_eig_each(a: np.ndarray, b: np.ndarray | None, k: int):
    """`_subset_eig` of each image: a, b `[b, M0, M0]` (b None: B = I) → float32 (`[b, k]`, `[b, M0, k]`); an
    image whose A is not finite gets NaNs (as the device's `eigh` gives; `exact_batch` flags it not converged)."""
    m = a.shape[1]
    nan = (np.full(k, np.nan), np.full((m, k), np.nan))
    pairs = [_subset_eig(np.asarray(a[i]), None if b is None else np.asarray(b[i]), k)
             if np.all(np.isfinite(a[i])) else nan for i in range(a.shape[0])]
    return (np.stack([p[0] for p in pairs]).astype(np.float32),
            np.ascontiguousarray(np.stack([p[1] for p in pairs]), dtype=np.float32))


def residuals(a_op, b_op, x, vals):
    """Relative residuals `[K]` ‖A x_k − λ_k B x_k‖ / (‖A x_k‖ + |λ_k| ‖B x_k‖) of pairs x `[M0, K]`, λ `[K]`
    (`b_op` None: B = I)."""
    ax = a_op(x)
    bx = x if b_op is None else b_op(x)
    num = jnp.linalg.norm(ax - vals[None, :] * bx, axis=0)
    den = jnp.linalg.norm(ax, axis=0) + jnp.abs(vals) * jnp.linalg.norm(bx, axis=0)
    return num / jnp.where(den > 0, den, 1.0)


def _dense_eig(a, b, k, same_grid):
    """Top-`k` eigenpairs of A x = λ B x (B = I when `same_grid`), largest first: (`[k]`, `[M0, k]`).

    On CPU, LAPACK's subset drivers through scipy (`syevr`, or `sygvx` when B ≠ I) compute only the k wanted pairs
    (faster than a full `eigh`); on accelerators the device's full `eigh`.
    """
    if next(iter(a.devices())).platform == "cpu":
        a = np.asarray(a)
        if not np.all(np.isfinite(a)):          # LAPACK refuses it (the device's `eigh` returns NaNs: not converged)
            raise InputError("graphs", "the problem's matrix holds NaN or inf (features or weights not finite?)",
                             "pass finite features")
        return _subset_eig(a, None if same_grid else np.asarray(b), k)
    return _dense_eig_full(a, b, k, same_grid)


def _subset_eig(a: np.ndarray, b: np.ndarray | None, k: int):
    """Top-`k` pairs of A x = λ B x (b None: B = I) by LAPACK's subset drivers, largest first."""
    m = a.shape[0]
    vals, vecs = scipy.linalg.eigh(a, b, subset_by_index=(m - k, m - 1), driver="evr" if b is None else "gvx")
    return vals[::-1], vecs[:, ::-1]


def _top_eig(a, b, k, same_grid):
    """The device's `eigh` (after a Cholesky of B when B ≠ I), top `k` largest first: (`[k]`, `[M0, k]`)."""
    if same_grid:
        vals, vecs = jnp.linalg.eigh(a)
        return vals[::-1][:k], vecs[:, ::-1][:, :k]
    low = jnp.linalg.cholesky(b)
    c = jax.scipy.linalg.solve_triangular(low, jax.scipy.linalg.solve_triangular(low, a, lower=True).T, lower=True)
    vals, y = jnp.linalg.eigh(0.5 * (c + c.T))
    x = jax.scipy.linalg.solve_triangular(low.T, y[:, ::-1][:, :k], lower=False)
    return vals[::-1][:k], x


_dense_eig_full = jax.jit(_top_eig, static_argnums=(2, 3))


def chebyshev_inv_sqrt(lo: float, hi: float, tol: float = 1e-8) -> np.ndarray:
    """Chebyshev coefficients of t^{-1/2} on [lo, hi], degree chosen for ~`tol` relative accuracy."""
    kappa = hi / lo
    rho = (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
    deg = int(np.clip(np.ceil(np.log(tol) / np.log(max(rho, 1e-3))) + 3, 4, 200))
    nodes = np.cos(np.pi * (np.arange(deg + 1) + 0.5) / (deg + 1))
    f = ((hi - lo) / 2 * nodes + (hi + lo) / 2) ** -0.5
    c = np.array([2.0 / (deg + 1) * np.sum(f * np.cos(np.pi * j * (np.arange(deg + 1) + 0.5) / (deg + 1)))
                  for j in range(deg + 1)])
    c[0] /= 2
    return c


def apply_chebyshev(op, v, coef, lo, hi):
    """Σ_j c_j T_j(t(B)) v by the Clenshaw recurrence, t(B) = (2B − (hi+lo)I)/(hi − lo)."""
    t = lambda u: (2.0 * op(u) - (hi + lo) * u) / (hi - lo)
    b1 = jnp.zeros_like(v)
    b2 = jnp.zeros_like(v)
    for c in coef[:0:-1]:
        b1, b2 = c * v + 2.0 * t(b1) - b2, b1
    return coef[0] * v + t(b1) - b2


def _lobpcg(graphs, ws, weights, base, nimg, k, maxiter, tol, seed):
    """(θ `[k]`, x `[M0, k]`, iterations). `lobpcg_standard` calls a pair converged when ‖r‖ < tol' · 10 n ·
    (‖A x‖ + θ) (n = M0, its floating-point error estimate); tol' = tol / (10 n) makes that our relative residual
    ‖r‖ / (‖A x‖ + θ) < tol. It stops when all k pairs are converged, or after `maxiter` iterations. Multi-grid: the
    Chebyshev interval of B^{-1/2} is `metric_bounds` (from the weights and the pooling, on the host), so nothing
    waits for the device before the iteration runs."""
    _, _, same = linear_operators(graphs, ws, base, nimg)
    m0 = nimg * base[0] * base[1]
    tol = float(tol) / (10.0 * m0)
    x0 = _start(m0, k, seed)
    if same:
        return _lobpcg_run(graphs, ws, x0, None, 0.0, 0.0, base, nimg, maxiter, tol)
    lo, hi = metric_bounds(graphs, weights, base)            # lo > 0: `_check_metric`
    coef = tuple(float(c) for c in chebyshev_inv_sqrt(lo, max(hi, lo * 1.0001)))
    return _lobpcg_run(graphs, ws, x0, coef, lo, hi, base, nimg, maxiter, tol)


def _check_metric(graphs: Sequence[Graph], weights, base: tuple[int, int], same: bool) -> None:
    """A multi-grid problem's metric B must be positive definite: some weight on the base grid (`metric_bounds`'s
    lo > 0), else an `InputError` before any solve (B singular: the dense path's Cholesky fails, LOBPCG diverges)."""
    if not same and metric_bounds(graphs, weights, base)[0] <= 0:
        raise InputError("base_grid", f"{base} carries no graph's weight, so the multi-grid metric B is singular",
                         "pass base_grid= one of the grids of the graphs with positive weight")


def metric_bounds(graphs: Sequence[Graph], weights, base: tuple[int, int]) -> tuple[float, float]:
    """(lo, hi) with lo·I ⪯ B ⪯ hi·I for the multi-grid metric B = Σ_l w_l c_l G_lᵀ G_l (weights normalised to sum
    1), computed on the host from the weights and the pooling matrices alone: lo = the weight on the base grid
    (its G = I, the other terms are ⪰ 0), hi = Σ_l W_l c_l ‖G_l‖² (W_l the group's total weight, ‖G_l‖ =
    ‖pool_h‖·‖pool_w‖, a Kronecker product). For pooling by whole bins c_l‖G_l‖² = 1, so hi = 1 = λ_max(B) (the
    constant vector): the bound is tight there, and an upper bound always (uneven bins: a little above)."""
    totals = [float(np.sum(np.ones(g.batch_shape))) if weights is None else
              float(np.broadcast_to(np.asarray(w, np.float64), g.batch_shape).sum())
              for g, w in zip(graphs, weights if weights is not None else [None] * len(graphs))]
    total = sum(totals)
    n0 = base[0] * base[1]
    lo = hi = 0.0
    for g, t in zip(graphs, totals):
        if tuple(g.grid) == tuple(base):
            lo += t / total
            hi += t / total
            continue
        norm = (np.linalg.norm(pool_matrix(base[0], g.grid[0]), 2) * np.linalg.norm(pool_matrix(base[1], g.grid[1]), 2))
        hi += t / total * n0 / (g.grid[0] * g.grid[1]) * float(norm) ** 2
    return lo, hi


def _arpack(csr, k: int, maxiter: int, tol: float, seed: int):
    """(θ `[k]`, x `[M0, k]`, operator applications) by ARPACK (`scipy.sparse.linalg.eigsh`, which="LA") on the
    float32 CSR matrix, or None when it did not converge within `maxiter` restarts. ARPACK stops when every Ritz
    pair's residual estimate is ≤ tol·|θ|; for a unit x with A x ≈ θ x our relative residual is ‖r‖ / (‖A x‖ + |θ|)
    ≈ ‖r‖ / 2|θ|, so the same tol leaves a factor 2 for the float32 rounding of the estimate. Start vector v0 from
    `seed`; deterministic for a given seed (one thread's CSR products)."""
    import scipy.sparse.linalg as sla

    n = csr.shape[0]
    count = [0]

    def mv(v):
        count[0] += 1 if v.ndim == 1 else v.shape[1]
        return csr @ v

    op = sla.LinearOperator((n, n), matvec=mv, matmat=mv, dtype=np.float32)
    v0 = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA4]).generate_state(1)[0]).standard_normal(n)
    try:
        vals, vecs = sla.eigsh(op, k=k, which="LA", v0=v0.astype(np.float32), maxiter=int(maxiter), tol=tol,
                               ncv=min(n, max(2 * k + 1, 20)))
    except sla.ArpackNoConvergence:
        return None
    return vals, vecs, count[0]


def _start(m0: int, k: int, seed: int):
    """LOBPCG's random start `[M0, k]` from `seed`."""
    return jax.random.normal(jax.random.key(seed), (m0, k), jnp.float32)


@functools.partial(jax.jit, static_argnames=("maxiter", "tol"))
def _lobpcg_sparse(op, x0, maxiter, tol):
    """LOBPCG on the coalesced sparse operator of kNN groups (`solvers.sparse.knn_operator`)."""
    return lobpcg_standard(op.matvec, x0, m=maxiter, tol=tol)


@functools.partial(jax.jit, static_argnames=("coef", "base", "nimg", "maxiter", "tol"))
def _lobpcg_run(graphs, ws, x0, coef, lo, hi, base, nimg, maxiter, tol):
    a_op, b_op, _ = linear_operators(graphs, ws, base, nimg)
    if coef is None:
        vals, vecs, steps = lobpcg_standard(a_op, x0, m=maxiter, tol=tol)
        return vals, vecs, steps
    half = lambda v: apply_chebyshev(b_op, v, coef, lo, hi)
    vals, y, steps = lobpcg_standard(lambda v: half(a_op(half(v))), x0, m=maxiter, tol=tol)
    return vals, half(y), steps


def layer_solves(graphs: Sequence[Graph], group_layers: Sequence[Sequence[int]], num_eigs: int,
                 layers: Sequence[int] | None = None) -> tuple[list[int], list[Result]]:
    """Each layer's own exact top-K solve (its graphs alone, every head equal; K capped at the layer's nodes − 1):
    (layers `[L]` ascending, one `Result` each, eigvecs on the layer's own grid)."""
    from spectral_jax.layer_weights import subset

    layers = sorted({l for ls in group_layers for l in ls}) if layers is None else [int(l) for l in layers]
    results = []
    for l in layers:
        gs, _ = subset(graphs, group_layers, [l])
        results.append(own_solve(gs, num_eigs))
    return layers, results


def own_solve(graphs: Sequence[Graph], num_eigs: int) -> Result:
    """The top-K solve of `graphs` alone, every graph equal (a layer's, or one timestep's heads), K capped at the
    nodes − 1 (`exact`). A grid of fewer than 3 nodes (a UNet's 1×1 mid block below 128² inputs), where a K ≥ 2
    cannot be asked of `exact`, gets every eigenpair of the dense Σ_s sym(P_s) / S directly (the first, of a
    row-stochastic P, at 1): eigvals `[B, n]`, eigvecs `[B, n, h, w]`, rq NaN (not computed)."""
    n = graphs[0].num_nodes
    if n >= 3:
        return exact(graphs, min(num_eigs, n - 1))                           # K < the layer's nodes
    total = sum(g.num_graphs for g in graphs)
    a = sum(np.asarray(weighted_sym_dense(g, jnp.ones(g.batch_shape, jnp.float32)), np.float64) for g in graphs)
    vals, vecs = np.linalg.eigh(a / total)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    (h, w), b = graphs[0].grid, graphs[0].num_images
    x = vecs.T.reshape(n, b, h, w).transpose(1, 0, 2, 3)                     # [B, n, h, w]: nodes image-major
    return Result(x.astype(np.float32), np.tile(vals, (b, 1)), np.full((b, len(graphs), n), np.nan),
                  np.full(b, vals.sum()), 0.0, 0, 0.0, "exact-dense", joint=b > 1)


def layer_spectra(graphs: Sequence[Graph], group_layers: Sequence[Sequence[int]], num_eigs: int,
                  layers: Sequence[int] | None = None) -> np.ndarray:
    """Each layer's own top-K eigenvalues `[L, K]` (largest first, NaN after a small layer's last;
    `layer_solves`): what the layer-weight rules read (`layer_weights.for_groups(spectra=partial(layer_spectra,
    graphs, group_layers, K))`)."""
    from spectral_jax.layer_weights import pad

    _, res = layer_solves(graphs, group_layers, num_eigs, layers)
    return np.stack([pad(r.eigvals[0], num_eigs) for r in res])
