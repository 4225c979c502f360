"""One update for both gradient solvers: the dataset's minibatch step (`dataset.step.solve_batch`) takes exactly
`solvers.gd`'s step (`stiefel_step` / `descent_step`) with `solvers.gd.default_optimizer`'s optimizer, and one gd
step is that same function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sjtest import planted_qk

from spectral_jax import graphs
from spectral_jax.dataset import step
from spectral_jax.dataset.layout import Geometry
from spectral_jax.dataset.settings import Settings
from spectral_jax.objective import from_nodes, paper_loss, to_nodes
from spectral_jax.solvers import gd

GRID = (6, 6)
K = 4


def _graph(rng):
    q, k, _ = planted_qk(rng, GRID, groups=3, layers=2, heads=2, dim=8)
    return graphs.attention(q, k, GRID)


def _setup(rng, preset):
    s = Settings(method="gd", preset=preset, num_eigs=K, batch_size=1, inner_steps=1, weight_decay=0.01)
    geom = Geometry((((GRID), (0,)),), GRID, (84, 84), 1, 1, 1, 5, 5)
    opt = step.make_optimizer(s, geom)
    rows = jnp.asarray(rng.standard_normal((1, K, *GRID)), jnp.float32)
    return s, geom, opt, rows


def test_dataset_optimizer_is_gd_default_optimizer_adamw(rng):
    s, geom, opt, _ = _setup(rng, "eigen")
    assert opt is gd.default_optimizer("eigen", step.learning_rate(s, geom), 36, level="dataset",
                                       weight_decay=0.01)
    x = jnp.ones((3, 2))
    want = optax.adamw(step.learning_rate(s, geom), weight_decay=0.01)
    got_u, _ = opt.update(x, opt.init(x), x)
    want_u, _ = want.update(x, want.init(x), x)
    np.testing.assert_array_equal(got_u, want_u)


def test_dataset_eigen_step_is_gd_stiefel_step(rng):
    """One inner step of the dataset's eigen preset on one image = `gd.stiefel_step` with the optimizer's own
    update on the Brockett cost (to float32 rounding: one runs compiled inside a scan, the other op by op)."""
    g = _graph(rng)
    s, geom, opt, rows = _setup(rng, "eigen")
    ost = jax.vmap(opt.init)(rows)
    got, got_state, hist, _, _ = step.solve_batch(s, geom, opt, [g], None, rows, ost, jnp.array([True]))

    c = gd.brockett(K)
    x0 = gd.retract(to_nodes(rows))
    val, grad = jax.value_and_grad(lambda xn: gd.eigen_cost([g], from_nodes(xn, 1, GRID), None, c))(x0)
    state0 = opt.init(rows[0])
    one = lambda u, st, x: (lambda r: (r[0].reshape(K, -1).T, r[1]))(
        opt.update(u.T.reshape(K, *GRID), st, x.T.reshape(K, *GRID)))
    want, want_state = gd.stiefel_step(one, x0, grad, state0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(from_nodes(want, 1, GRID)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hist), [-np.asarray(val)], rtol=1e-6)
    assert np.abs(np.asarray(got) - np.asarray(rows)).max() > 1e-3          # it did move
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b), rtol=1e-4, atol=1e-7)


def test_dataset_paper_step_is_gd_descent_step(rng):
    g = _graph(rng)
    s, geom, opt, rows = _setup(rng, "paper")
    ost = jax.vmap(opt.init)(rows)
    got, _, hist, _, _ = step.solve_batch(s, geom, opt, [g], None, rows, ost, jnp.array([True]))
    loss, grad = jax.value_and_grad(lambda r: paper_loss([g], jax.nn.softmax(r, axis=1), None, s.lam))(rows)
    want, _ = gd.descent_step(jax.vmap(opt.update), rows, grad, ost)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(got) - np.asarray(rows)).max() > 1e-4          # it did move
    assert float(hist[0]) == pytest.approx(float(loss), rel=1e-6)


def test_gd_eigen_loop_takes_stiefel_step(rng):
    """One step of `gd`'s compiled loop = `stiefel_step` with its optimizer on the objective (`eigen_cost`)."""
    g = _graph(rng)
    opt = gd.default_optimizer("eigen", None, 36)
    cfg = gd._Config("eigen", "table", GRID, 1, K, 1, None, 1.0, opt)
    x0 = gd._eigen_init(0, 36, K)
    carry = gd.Carry(x0, opt.init(x0), jax.random.key(0), jnp.zeros((), jnp.int32))
    out, hist = gd._gd_chunk(cfg, [g], [jnp.ones(g.batch_shape)], carry)
    val, grad = jax.value_and_grad(lambda x: gd.eigen_cost([g], from_nodes(x, 1, GRID), [jnp.ones(g.batch_shape)]))(x0)
    want, _ = gd.stiefel_step(opt.update, x0, grad, opt.init(x0))
    np.testing.assert_allclose(np.asarray(out.params), np.asarray(want), rtol=0, atol=1e-6)
    assert float(hist[0]) == pytest.approx(float(val), rel=1e-6)
