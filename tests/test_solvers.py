"""Solvers against numpy eigh; gd convergence; determinism; one compile per run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sjtest import planted_qk, subspace_alignment

from spectral_jax import graphs, solvers
from spectral_jax.objective import dense_operators, normalised_weights
from spectral_jax.options import TOL, ExactSpec
import importlib


def _reference(gs, k):
    """Top-k eigenpairs of mean sym(P) by numpy (float64), one grid."""
    a = sum(np.asarray(g.dense(), np.float64).reshape(-1, g.num_nodes, g.num_nodes).sum(0) for g in gs)
    a /= sum(g.num_graphs for g in gs)
    a = 0.5 * (a + a.T)
    vals, vecs = np.linalg.eigh(a)
    return vals[::-1][:k], vecs[:, ::-1][:, :k], vals[::-1]


def _random_graph(rng, grid=(16, 16)):
    n = grid[0] * grid[1]
    q = (1.5 * rng.normal(size=(3, 2, n, 8))).astype(np.float32)
    k = (1.5 * rng.normal(size=(3, 2, n, 8))).astype(np.float32)
    return graphs.attention(q, k, grid)


def _planted_graph(rng, grid=(16, 16)):
    q, k, _ = planted_qk(rng, grid, groups=4, layers=3, heads=2)
    return graphs.attention(q, k, grid)


@pytest.mark.parametrize("make", [_random_graph, _planted_graph], ids=["random", "planted"])
@pytest.mark.parametrize("dense_max", [4096, 16], ids=["dense", "lobpcg"])
def test_exact_matches_numpy_eigh(rng, make, dense_max):
    g = make(rng)
    k = 6
    vals, vecs, spectrum = _reference([g], k)
    # choose K at a spectral gap so the subspace is well defined
    res = solvers.exact.exact(g, k, dense_max=dense_max)
    assert res.method == ("exact-dense" if dense_max > 256 else "exact-lobpcg")
    x = res.eigvecs.reshape(k, -1).T
    assert subspace_alignment(x, vecs) >= 0.999, (spectrum[:k + 2], res.eigvals)
    np.testing.assert_allclose(res.eigvals[0], vals, atol=2e-5)
    np.testing.assert_allclose(res.objective, vals.sum(), rtol=1e-5)
    assert res.orth_error < 1e-4
    assert res.rq.shape == (1, 6, k) and res.eigvecs.shape == (1, k, 16, 16)


INFO_KEYS = {"converged", "criterion", "iterations", "tol", "max_residual", "residuals"}   # summary.json's


def test_exact_lobpcg_stops_when_converged_and_says_so(rng):
    """A well-separated problem (4 planted groups, K = 4): LOBPCG stops long before maxiter, every pair's relative
    residual is below tol, and the dense path reports the same keys (converged, residual at float32 level)."""
    g = _planted_graph(rng)
    vals, vecs, _ = _reference([g], 4)
    res = solvers.exact.exact(g, 4, dense_max=16, maxiter=400)
    c = res.convergence
    assert res.method == "exact-lobpcg" and set(c.as_dict()) == INFO_KEYS and res.info == {}
    assert INFO_KEYS <= set(res.summary()) and res.summary()["converged"] is True
    assert c.converged is True and 0 < c.iterations < 100 and res.steps == 0, c
    assert len(c.residuals) == 4 and c.max_residual == max(c.residuals) and c.criterion == "max_residual <= tol"
    assert c.max_residual <= c.tol == ExactSpec().kwargs()["tol"] == TOL
    assert subspace_alignment(res.eigvecs.reshape(4, -1).T, vecs) >= 0.999
    np.testing.assert_allclose(res.eigvals[0], vals, atol=2e-5)
    dense = solvers.exact.exact(g, 4)
    d = dense.convergence
    assert dense.method == "exact-dense" and set(d.as_dict()) == INFO_KEYS
    assert d.converged is True and d.iterations == 0 and d.max_residual < 1e-5


def test_exact_lobpcg_at_maxiter_reports_not_converged(rng):
    """Two iterations on a random graph (clustered spectrum) cannot converge: the Result says so and a warning
    names maxiter; a tol below what is reachable in 2 steps gives the same; a bad tol is refused."""
    g = _random_graph(rng)
    with pytest.warns(RuntimeWarning, match="maxiter=2") as caught:
        res = solvers.exact.exact(g, 6, dense_max=16, maxiter=2)
    # what to do, for both readers: the dataset command's flags (it cannot set dense_max) and the API's dense_max
    text = str(caught[0].message)
    assert "--maxiter N, --tol T" in text and "from Python, take the dense path with dense_max >= " in text, text
    c = res.convergence
    assert c.converged is False and c.iterations == 2 and res.steps == 0   # no gd steps
    assert c.max_residual > c.tol
    for tol in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tol"):
            solvers.exact.exact(g, 6, dense_max=16, tol=tol)


def test_exact_planted_partition_recovered(rng):
    q, k, labels = planted_qk(rng, (12, 12), groups=3, layers=2, heads=2)
    res = solvers.exact.exact(graphs.attention(q, k, (12, 12)), 3)
    feats = res.eigvecs[0].reshape(3, -1).T                      # [N, 3]
    # spectral embedding: rows of one planted group point the same way, rows of different groups are orthogonal
    rows = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cos = rows @ rows.T
    same = labels[:, None] == labels[None, :]
    assert cos[same].min() > 0.99 and np.abs(cos[~same]).max() < 0.1


def test_exact_multigrid_matches_dense_generalised_eigh(rng):
    q1 = (1.5 * rng.normal(size=(2, 2, 100, 8))).astype(np.float32)
    q2 = (1.5 * rng.normal(size=(2, 25, 8))).astype(np.float32)
    gs = [graphs.attention(q1, q1[::-1], (10, 10)), graphs.attention(q2, q2, (5, 5))]
    ws = normalised_weights(gs, None)
    a, b = (np.asarray(m, np.float64) for m in dense_operators(gs, ws, (10, 10), 1))
    lb = np.linalg.cholesky(b)
    c = np.linalg.solve(lb, np.linalg.solve(lb, a).T)
    vals, y = np.linalg.eigh(0.5 * (c + c.T))
    ref = np.linalg.solve(lb.T, y[:, ::-1][:, :5])
    for dense_max in (4096, 16):
        res = solvers.exact.exact(gs, 5, dense_max=dense_max)
        np.testing.assert_allclose(res.eigvals[0], vals[::-1][:5], atol=3e-5)
        assert subspace_alignment(res.eigvecs.reshape(5, -1).T, ref) >= 0.999
        assert res.orth_error < 1e-4                              # B-orthonormal


@pytest.mark.parametrize("same_grid", [True, False], ids=["one-grid", "multi-grid"])
def test_dense_eig_paths_agree(rng, same_grid):
    """The dense path's two eigensolvers — LAPACK subset drivers (CPU) and the device `eigh` (accelerators, not run
    by CI otherwise) — return the same top-K pairs of A x = λ B x."""
    exact_module = importlib.import_module("spectral_jax.solvers.exact")
    q1 = (1.5 * rng.normal(size=(2, 2, 256, 8))).astype(np.float32)
    gs = [graphs.attention(q1, q1[::-1], (16, 16))]
    if not same_grid:
        q2 = (1.5 * rng.normal(size=(2, 64, 8))).astype(np.float32)
        gs.append(graphs.attention(q2, q2, (8, 8)))
    a, b = dense_operators(gs, normalised_weights(gs, None), (16, 16), 1)
    v1, x1 = (np.asarray(t, np.float64) for t in exact_module._dense_eig(a, b, 6, same_grid))
    v2, x2 = (np.asarray(t, np.float64) for t in exact_module._dense_eig_full(a, b, 6, same_grid))
    np.testing.assert_allclose(v1, v2, atol=2e-5)
    assert np.all(np.diff(v1) <= 0) and np.all(np.diff(v2) <= 0)                     # largest first
    assert subspace_alignment(x1, x2) >= 0.999
    bb = np.asarray(b, np.float64)
    for x in (x1, x2):                                                             # B-orthonormal
        np.testing.assert_allclose(x.T @ bb @ x, np.eye(6), atol=1e-4)


def test_exact_rejects_k_not_below_n(rng):
    g = _random_graph(rng, (4, 4))
    with pytest.raises(ValueError, match="num_eigs"):
        solvers.exact.exact(g, 16)


@pytest.mark.parametrize("seed,materialize", [(0, None), (1, None), (0, False)])
def test_gd_eigen_reaches_exact_objective_on_planted_graphs(rng, seed, materialize):
    g = _planted_graph(rng, (14, 14))
    ex = solvers.exact.exact(g, 8)
    res = solvers.gd.gd(g, 8, preset="eigen", steps=200, seed=seed, materialize=materialize)
    assert res.info["materialized"] == (materialize is None)
    assert res.objective >= 0.99 * ex.objective, (res.objective, ex.objective)
    assert res.orth_error < 1e-4
    assert subspace_alignment(res.eigvecs.reshape(8, -1).T, ex.eigvecs.reshape(8, -1).T) > 0.95


def test_gd_eigen_multigrid_not_below_exact(rng):
    """gd optimises the true (per-grid normalised) objective; exact the linearised one: gd ≥ 0.99 exact."""
    q1, k1, _ = planted_qk(rng, (12, 12), groups=3)
    q2 = q1.reshape(2, 2, 6, 2, 6, 2, -1).mean((3, 5)).reshape(2, 2, 36, -1)
    gs = [graphs.attention(q1, k1, (12, 12)), graphs.attention(q2, q2, (6, 6))]
    ex = solvers.exact.exact(gs, 5)
    res = solvers.gd.gd(gs, 5, preset="eigen", steps=200)
    assert res.objective >= 0.99 * ex.objective


def test_gd_paper_improves_its_loss_and_is_deterministic(rng):
    g = _planted_graph(rng, (8, 8))
    runs = [solvers.gd.gd(g, 4, preset="paper", steps=s, param=p, seed=3)
            for p, s in (("table", 60), ("conv", 20), ("conv", 20))]
    for r in runs:
        assert r.history[0, -1] < r.history[0, 0]
        assert r.info["history_kind"] == "loss"
        assert r.orth_error < 1e-4
    np.testing.assert_array_equal(runs[1].eigvecs, runs[2].eigvecs)
    np.testing.assert_array_equal(runs[1].history, runs[2].history)


def test_the_conv_prior_as_shifted_matmuls_is_nnx_conv(rng):
    """`gd._conv3x3` (a 3×3 'SAME' conv as one matmul over 9 shifted copies: XLA:CPU runs it fast inside the scan)
    gives nnx.Conv's numbers, bias included, on a non-square grid of several images."""
    from flax import nnx

    conv = nnx.Conv(5, 7, (3, 3), rngs=nnx.Rngs(1))
    conv.bias[...] = jnp.asarray(rng.normal(size=7).astype(np.float32))
    x = jnp.asarray(rng.normal(size=(2, 6, 9, 5)).astype(np.float32))
    np.testing.assert_allclose(solvers.gd._conv3x3(x, conv), conv(x), rtol=1e-5, atol=1e-5)


def test_gd_same_seed_same_result_different_seed_differs(rng):
    g = _planted_graph(rng, (8, 8))
    a = solvers.gd.gd(g, 4, steps=20, seed=5, sample=0.5)
    b = solvers.gd.gd(g, 4, steps=20, seed=5, sample=0.5)
    c = solvers.gd.gd(g, 4, steps=20, seed=6, sample=0.5)
    np.testing.assert_array_equal(a.eigvecs, b.eigvecs)
    np.testing.assert_array_equal(a.history, b.history)
    assert not np.array_equal(a.history, c.history)


@pytest.mark.parametrize("preset", ["eigen", "paper"])
def test_gd_materialized_equals_matrix_free(rng, preset):
    """Building P once (aggregated for eigen, per graph for paper) changes the arithmetic, not the run."""
    g = _planted_graph(rng, (8, 8))
    a = solvers.gd.gd(g, 4, preset=preset, steps=30, seed=2, materialize=True)
    b = solvers.gd.gd(g, 4, preset=preset, steps=30, seed=2, materialize=False)
    assert a.info["materialized"] and not b.info["materialized"]
    np.testing.assert_allclose(a.history, b.history, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(a.rq, b.rq, atol=2e-4)


def test_gd_chunk_compiles_once(rng, caplog):
    """One trace for a run of 8 chunks; none for a repeat with the same settings and shapes (other data).
    Traces counted from JAX's own log (`jax_log_compiles`)."""
    import jax

    g = _planted_graph(rng, (8, 8))
    traces = lambda: sum(r.getMessage().startswith("Finished tracing gd_chunk") for r in caplog.records)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        res = solvers.gd.gd(g, 4, steps=40, chunks=8, lr=0.0271)                 # an lr no other test uses
        assert traces() == 1
        caplog.clear()
        again = solvers.gd.gd(_planted_graph(rng, (8, 8)), 4, steps=40, chunks=8, lr=0.0271, seed=1)
        assert traces() == 0 and again.info["compile_seconds"] < res.info["compile_seconds"]
        assert res.steps == 40 and res.history.shape == (1, 40)
        solvers.gd.gd(g, 4, steps=40, chunks=8, preset="eigen", lr=0.0123)     # another optimizer: compiles
        assert traces() == 1


def test_gd_sampling_touches_a_subset(rng):
    """With sample=1/6 each step sees one of six graphs: on average the objective is still the full one's."""
    g = _planted_graph(rng, (8, 8))
    full = solvers.exact.exact(g, 3)
    res = solvers.gd.gd(g, 3, steps=150, sample=1 / 6, seed=0)
    assert res.objective >= 0.95 * full.objective
    assert res.info["sample"] == pytest.approx(1 / 6)


def test_gd_rejects_bad_arguments(rng):
    g = _planted_graph(rng, (4, 4))
    for kwargs, match in [({"preset": "nope"}, "preset"), ({"param": "conv"}, "param"), ({"sample": 0.0}, "sample"),
                          ({"steps": 0}, "steps")]:
        with pytest.raises(ValueError, match=match):
            solvers.gd.gd(g, 2, **kwargs)


def test_result_save_roundtrip(rng, tmp_path):
    res = solvers.exact.exact(_planted_graph(rng, (6, 6)), 3)
    path = tmp_path / "r.npz"
    res.save(str(path))
    with np.load(path) as f:
        np.testing.assert_array_equal(f["eigvecs"], res.eigvecs)
        assert f["eigvals"].shape == (3,) and f["rq"].shape == (6, 3)   # DESIGN.md's [K], [G, K] (B = 1)
    assert np.all(np.diff(res.eigvals[0]) <= 0)


def test_result_rq_matches_objective_rayleigh(rng):
    """`Result.rq`/objective (finish's fast diagnostics: dense-softmax branch for attention, matvec branch for kNN
    and dense graphs) equal the differentiable `objective.rayleigh` on every graph of a mixed problem."""
    from spectral_jax.objective import rayleigh

    att = _random_graph(rng)
    feats = rng.normal(size=(2, 256, 8)).astype(np.float32)
    knn = graphs.knn(feats, feats, (16, 16), k_intra=10)
    dense = graphs.dense(np.asarray(_random_graph(rng).dense()), (16, 16))
    gs = [att, knn, dense]
    ws = [np.full(g.batch_shape, w, np.float32) for g, w in zip(gs, (1.0, 2.0, 0.5))]
    res = solvers.exact.exact(gs, 5, weights=ws)
    rqs, obj = rayleigh(gs, res.eigvecs, normalised_weights(gs, ws))
    ref = np.concatenate([np.asarray(r).reshape(-1, 5) for r in rqs])
    assert res.rq.shape == (1, 6 + 2 + 6, 5)
    np.testing.assert_allclose(res.rq[0], ref, atol=2e-6)
    np.testing.assert_allclose(res.objective, float(obj), rtol=1e-6)
    np.testing.assert_allclose(res.objective[0], res.eigvals[0].sum(), rtol=1e-5)


def test_dense_path_records_a_direct_solve_not_a_met_tolerance(rng):
    """The dense path is LAPACK's direct solve: its record says so (criterion `DENSE_CRITERION`) instead of
    "max_residual <= tol", which a pair with λ ≈ 0 can fail through float32 rounding alone — and the iterative
    path's criterion is still the residual test. exact_batch records the same as exact."""
    g = _planted_graph(rng)
    dense = solvers.exact.exact(g, 4)
    c = dense.convergence
    assert dense.method == "exact-dense" and c.criterion == solvers.exact.DENSE_CRITERION and c.converged
    assert c.iterations == 0 and len(c.residuals) == 4 and c.max_residual == max(c.residuals)
    assert dense.summary()["criterion"] == solvers.exact.DENSE_CRITERION
    iterative = solvers.exact.exact(g, 4, dense_max=16, maxiter=400).convergence
    assert iterative.criterion == "max_residual <= tol" and iterative.max_residual <= iterative.tol
    stacked = jax.tree.map(lambda x: x[None], g)
    (batch,) = solvers.exact.exact_batch(stacked, 4)
    assert batch.convergence.criterion == solvers.exact.DENSE_CRITERION and batch.convergence.converged
