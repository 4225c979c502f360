"""A red-team pass over the public API (2026-12-07): inputs that used to crash with a library's raw error, or come
back NaN and marked converged, now give one `InputError` line or an honest verdict.

- graph weights that are all 0, negative or not finite (every solver normalises them to sum 1);
- a multi-grid `base_grid` that carries no graph's weight (B singular) on the dense path, per image and batched;
- a non-finite graph on the dense path: an error on the CPU (LAPACK refuses it), not converged where the device's
  `eigh` (or a batch's) gives NaNs;
- `Result.load` of a damaged compressed member (zlib's error), `Result.select` of no image;
- `graphs.knn` on a mesh whose devices do not divide the images (a subprocess with 2 host devices)."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sjtest import planted_qk, xla_flags

from spectral_jax import graphs, solvers
from spectral_jax.errors import InputError
from spectral_jax.solvers import exact as E
from spectral_jax.solvers.result import Result

GRID = (3, 4)


def _attention(rng, n=2):
    return [graphs.attention(rng.normal(size=(12, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32),
                             GRID) for _ in range(n)]


@pytest.mark.parametrize("weights, word", [([0.0, 0.0], "all 0"), ([1.0, -1.0], "negative"),
                                           ([np.nan, 1.0], "not finite"), ([np.inf, 1.0], "not finite")])
@pytest.mark.parametrize("solver", ["exact", "gd"])
def test_bad_graph_weights_are_one_input_error(rng, weights, word, solver):
    g = graphs.dense(np.full((2, 12, 12), 1 / 12, np.float32), GRID)
    solve = E.exact if solver == "exact" else solvers.gd.gd
    with pytest.raises(InputError, match=f"weights: the graph weights are {word}"):
        solve(g, 2, [np.array(weights)])
    ok = solve(g, 2, [np.array([0.0, 2.0])]) if solver == "exact" else None    # a zero beside a positive: fine
    assert ok is None or np.all(np.isfinite(ok.eigvals))


def test_a_base_grid_without_weight_is_refused_on_every_path(rng):
    gs = _attention(rng)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *gs)
    for solve in (lambda: E.exact(gs[0], 3, base_grid=(3, 5)),
                  lambda: E.exact_batch([stacked], 3, base_grid=(3, 5), subset=False),
                  lambda: E.exact_batch([stacked], 3, base_grid=(3, 5), subset=True)):
        with pytest.raises(InputError, match=r"base_grid: \(3, 5\) carries no graph's weight"):
            solve()


def test_a_non_finite_graph_is_never_a_converged_solve(rng):
    nan = graphs.dense(np.full((2, 12, 12), np.nan, np.float32), GRID)
    with pytest.raises(InputError, match="graphs: the problem's matrix holds NaN or inf"):
        E.exact(nan, 2)                                            # the CPU's LAPACK path
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *_attention(rng))
    broken = jax.tree.map(lambda x: x.at[0].set(jnp.nan), stacked)
    for subset in (False, True):                                  # the device's eigh / LAPACK in a callback
        with pytest.warns(RuntimeWarning, match="1 of 2 problems"):
            res = E.exact_batch([broken], 3, subset=subset)
        assert [r.convergence.converged for r in res] == [False, True]
        assert np.isnan(res[0].convergence.max_residual)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # a finite batch: converged, no warning
        assert all(r.convergence.converged for r in E.exact_batch([stacked], 3, subset=False))


def test_result_load_of_a_damaged_compressed_member_and_select_of_nothing(rng, tmp_path):
    q, k, _ = planted_qk(rng, (6, 6), groups=3, layers=2, heads=2, dim=8)
    res = E.exact(graphs.attention(q, k, (6, 6)), 3)
    path = res.save(str(tmp_path / "r.npz"))
    with np.load(path) as f:
        np.savez_compressed(tmp_path / "c.npz", **{k: f[k] for k in f.files})
    data = bytearray((tmp_path / "c.npz").read_bytes())
    data[200] ^= 0xFF                                             # inside the first member's deflate stream
    (tmp_path / "bad.npz").write_bytes(bytes(data))
    with pytest.raises(InputError, match="not a readable .npz archive"):
        Result.load(str(tmp_path / "bad.npz"))
    assert Result.load(str(tmp_path / "c.npz")).num_images == 1
    for none in ([], np.zeros(1, bool)):
        with pytest.raises(InputError, match="selects no image"):
            res.select(none)
    assert res.select([0]).num_images == 1


def test_knn_on_a_mesh_that_does_not_divide_the_images():
    child = """
import jax, numpy as np
from jax.sharding import Mesh
from spectral_jax import graphs
from spectral_jax.errors import InputError
mesh = Mesh(jax.devices()[:2], ("data",))
a = np.random.default_rng(0).normal(size=(36, 8)).astype(np.float32)
try:
    graphs.knn(a, a, (3, 4), 3, 4, 6, mesh=mesh)
except InputError as e:
    print("ERR", e)
b = np.random.default_rng(0).normal(size=(48, 8)).astype(np.float32)
print("OK", graphs.knn(b, b, (3, 4), 4, 4, 6, mesh=mesh).num_nodes)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ERR num_images=3: is not a multiple of the mesh's 2 devices" in r.stdout
    assert "pad the batch to 4" in r.stdout
    assert "OK 48" in r.stdout


def test_a_knn_graph_without_edges_is_refused_not_solved():
    zero = np.zeros((1, 24, 8), np.float32)                         # all-zero features: no cosine above min_cos
    with pytest.raises(InputError, match="graphs: have no edge"):
        E.exact(graphs.knn(zero, zero, GRID, 2, 4, 4), 3)
    a = np.random.default_rng(0).normal(size=(1, 24, 8)).astype(np.float32)
    assert E.exact(graphs.knn(a, a, GRID, 2, 4, 4, min_cos=-1.0), 3).convergence.converged
