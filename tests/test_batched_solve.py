"""The batched exact path (`solvers.exact.exact_batch`, `pipeline.solve` on qk/vv Taps) equals the per-image loop —
eigvals, sign-fixed eigvecs, per-graph quotients, objective and the per-image `info` — on crafted graphs and taps and
on a random-weights ViT, one grid and several, B = 1 and B > 1, odd chunk sizes, with the CPU's LAPACK subset
driver and with the accelerators' batched `eigh`; and the exact solver's device paths convert nothing to the host
implicitly (one `jax.device_get` per solve)."""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax import graphs as G
from spectral_jax import pipeline
from spectral_jax.errors import InputError
from spectral_jax.objective import dense_operators, normalised_weights
from spectral_jax.taps import LayerTap, Taps

E = importlib.import_module("spectral_jax.solvers.exact")
GRID = (6, 6)


# what pipeline.solve records (seed, solver options, provenance) and what an image taken from a batch adds (its
# seconds are the batch's, its index): not the solver's diagnostics compared here
PIPELINE_KEYS = {"seed", "solver_options", "seconds_images", "image_index", "provenance"}


def _same(batched, loop, vec_tol=2e-5):
    """Two `Result`s of the same images agree: values to float32 rounding, the same diagnostics."""
    assert batched.eigvecs.shape == loop.eigvecs.shape and batched.method == loop.method
    np.testing.assert_allclose(batched.eigvals, loop.eigvals, rtol=1e-5, atol=1e-6, err_msg="eigvals")
    np.testing.assert_allclose(batched.eigvecs, loop.eigvecs, atol=vec_tol, err_msg="eigvecs after sign fixing")
    np.testing.assert_allclose(batched.rq, loop.rq, rtol=1e-5, atol=1e-6, err_msg="per-graph quotients")
    np.testing.assert_allclose(batched.objective, loop.objective, rtol=1e-5, err_msg="objective")
    assert batched.orth_error < 1e-4 and loop.orth_error < 1e-4
    one = lambda r: [r.info] if r.num_images == 1 else r.info["per_image"]
    for i, (a, b) in enumerate(zip(one(batched), one(loop), strict=True)):
        assert a.keys() - PIPELINE_KEYS == b.keys() - PIPELINE_KEYS, i
        assert a.get("layer_weights") == b.get("layer_weights"), i
    for i in range(batched.num_images):
        a, b = batched.image(i).convergence, loop.image(i).convergence
        assert (a.converged, a.iterations, a.tol) == (b.converged, b.iterations, b.tol), i
        assert max(a.max_residual, b.max_residual) < 1e-4, i       # both solved to float32 rounding
        np.testing.assert_allclose(a.residuals, b.residuals, atol=1e-5)
    assert batched.summary().keys() - PIPELINE_KEYS == loop.summary().keys() - PIPELINE_KEYS


def _crafted(seed: int, multigrid: bool):
    """One image's graph groups: 3 layers × 2 heads of planted attention on GRID (+ a coarse 3×3 group)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(36) % 6 >= 2 + seed % 2).astype(int) + (np.arange(36) >= 24)           # three regions
    centers = 3.0 * rng.normal(size=(3, 8))
    q = (centers[labels] + 0.7 * rng.normal(size=(3, 2, 36, 8))).astype(np.float32)
    k = (centers[labels] + 0.7 * rng.normal(size=(3, 2, 36, 8))).astype(np.float32)
    gs = [G.attention(q, k, GRID)]
    if multigrid:
        v = rng.normal(size=(2, 9, 8)).astype(np.float32)
        gs.append(G.value(v, (3, 3), tau=0.5))
    return gs


@pytest.mark.parametrize("multigrid, nimg, subset, vmap", [
    (False, 1, True, False), (True, 3, True, False), (False, 3, False, True), (True, 3, False, True)])
def test_exact_batch_equals_exact_on_crafted_graphs(multigrid, nimg, subset, vmap, monkeypatch):
    per = [_crafted(s, multigrid) for s in range(nimg)]
    weights = [np.array([[1.0, 2.0], [0.5, 0.5], [1.0, 0.0]])] + ([np.array([3.0, 1.0])] if multigrid else [])
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *per)
    got = E.exact_batch(stacked, 5, weights=weights, subset=subset, vmap=vmap)
    if not subset:          # the reference with the same eigensolver: the device's eigh, one image at a time
        monkeypatch.setattr(E, "_dense_eig", E._dense_eig_full)
    for b in range(nimg):
        _same(got[b], E.exact(per[b], 5, weights=weights))


def _random_taps(nimg: int, multigrid: bool, seed: int = 0) -> Taps:
    """Crafted taps: 2 layers on GRID with a CLS token (+ a coarse 3×3 layer, as a UNet has), 2 heads."""
    rng = np.random.default_rng(seed)
    mk = lambda n: jnp.asarray(rng.standard_normal((nimg, 2, n, 8)), jnp.float32)
    layers = {l: LayerTap(mk(37), mk(37), mk(37), GRID, 1) for l in range(2)}
    if multigrid:
        layers[2] = LayerTap(mk(9), mk(9), mk(9), (3, 3))
    return Taps(layers)


@pytest.mark.parametrize("graph, multigrid, nimg, per_call", [
    ("qk", False, 1, None), ("qk", True, 5, 2), ("vv", False, 5, 3), ("vv", True, 5, None)])
def test_solve_batched_equals_the_per_image_loop(graph, multigrid, nimg, per_call):
    taps = _random_taps(nimg, multigrid, seed=nimg)
    _same(pipeline.solve(taps, graph, 4, batch_images=per_call), pipeline.solve(taps, graph, 4, batch_images=0))


@pytest.fixture(scope="module")
def vit_taps():
    """A random-weights DINOv2 (the preset shrunk to 32 wide, 2 layers, 2 heads) on 4 random 70² images."""
    from spectral_jax.models import registry
    from spectral_jax.models.vit.backbone import load_backbone

    spec = registry.get_spec("dinov2_vits14")
    cfg = dataclasses.replace(spec.config, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=128)
    bb = load_backbone(dataclasses.replace(spec, config=cfg), "random")
    x = np.random.default_rng(0).normal(size=(4, 70, 70, 3)).astype(np.float32)
    return bb.taps(x, None)


@pytest.mark.parametrize("graph", ["qk", "vv"])
def test_random_weights_vit_batched_equals_loop(vit_taps, graph, monkeypatch):
    loop = pipeline.solve(vit_taps, graph, 6, batch_images=0)
    _same(pipeline.solve(vit_taps, graph, 6), loop)
    _same(pipeline.solve(vit_taps, graph, 6, batch_images=3), loop)             # chunks of 2 and 2
    one = Taps({l: jax.tree.map(lambda x: x[2:3], t) for l, t in vit_taps.layers.items()})
    _same(pipeline.solve(one, graph, 6), loop.image(2))                        # B = 1
    # the accelerators' program (vmapped images, batched eigh) on this CPU, against the device eigh per image; the
    # random graphs' top eigenvalues lie within ~1e-4 of each other, where two float32 eigh calls (batched and not)
    # give eigenvectors that differ by ~eps32/gap
    build = pipeline._TapGroups(graph, tuple(sorted(dict(tau=0.1, k_intra=50, k_inter=50, min_cos=0.1).items())))
    dev = E.exact_batch(vit_taps.layers, 6, build=build, subset=False, vmap=True)
    monkeypatch.setattr(E, "_dense_eig", E._dense_eig_full)
    for b, res in enumerate(dev):
        _same(res, pipeline.solve(vit_taps, graph, 6, batch_images=0).image(b), vec_tol=5e-3)


def _spy_batches(monkeypatch):
    calls = []
    real = E.exact_batch

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(E, "exact_batch", spy)
    return calls


def test_layer_weights_numbers_batch_and_rules_loop(monkeypatch):
    taps = _random_taps(3, True, seed=7)
    loop = pipeline.solve(taps, "qk", 4, layer_weights=[1.0, 0.0, 2.0], batch_images=0)
    calls = _spy_batches(monkeypatch)
    got = pipeline.solve(taps, "qk", 4, layer_weights=[1.0, 0.0, 2.0])
    assert calls == [1]                                         # numbers: the batched path, one call
    _same(got, loop)
    assert got.info["per_image"][0]["layer_weights"] == [0.333333, 0.0, 0.666667]
    _same(pipeline.solve(taps, "vv", 4, layer_weights="uniform"),
          pipeline.solve(taps, "vv", 4, layer_weights="uniform", batch_images=0))
    assert calls == [1, 1]
    pipeline.solve(taps, "qk", 4, layer_weights="eigengap")                  # reads each image's spectra: the loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)                      # 3 steps do not converge
        pipeline.solve(taps, "qk", 4, method="gd", steps=3)                  # gd keeps its own path
    assert calls == [1, 1]


def test_solve_batched_refuses_what_the_loop_refuses():
    taps = _random_taps(2, False)
    for per_call in (None, 0):
        with pytest.raises(InputError, match="num_eigs"):
            pipeline.solve(taps, "qk", 36, batch_images=per_call)          # K ≥ the 36 nodes
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(InputError, match="batch_images"):
            pipeline.solve(taps, "qk", 4, batch_images=bad)


def test_images_per_call_follows_the_byte_budget():
    """The documented estimate: DINOv2-B at 448² (12 layers × 12 heads, N = 1024, head dim 64) is 40 + 72 MiB an
    image: 18 within the default 2 GiB; at 896², 2; never below one."""
    def shapes(n):
        q = jax.ShapeDtypeStruct((12, 12, n, 64), jnp.float32)
        side = int(np.sqrt(n))
        return [jax.eval_shape(lambda a, b: G.attention(a, b, (side, side)), q, q)]

    assert E.images_per_call(shapes(1024), (32, 32)) == 18
    assert E.images_per_call(shapes(4096), (64, 64)) == 2
    assert E.images_per_call(shapes(4096), (64, 64), budget_bytes=1) == 1


def test_metric_bounds_hold_and_are_tight_for_whole_bins():
    rng = np.random.default_rng(3)
    for coarse, tight in (((3, 3), True), ((4, 4), False), ((5, 5), False)):   # 6 → 3 whole bins; uneven
        q = rng.normal(size=(2, 36, 4)).astype(np.float32)
        c = rng.normal(size=(3, coarse[0] * coarse[1], 4)).astype(np.float32)
        gs = [G.attention(q, q, GRID), G.attention(c, c, coarse)]
        w = [np.array([1.0, 0.5]), np.array([2.0, 1.0, 0.0])]
        lo, hi = E.metric_bounds(gs, w, GRID)
        _, b = dense_operators(gs, normalised_weights(gs, w), GRID, 1)
        ev = np.linalg.eigvalsh(np.asarray(b, np.float64))
        assert lo == pytest.approx(1.5 / 4.5) and ev[0] >= lo - 1e-6 and ev[-1] <= hi + 1e-6
        assert hi == pytest.approx(1.0) if tight else 1.0 < hi < 1.5 * ev[-1]     # = λ_max = 1 for whole bins


def _refuse_transfers(monkeypatch):
    """Array→host conversions outside `jax.device_get` fail; returns the list of device_get calls."""
    array_type = type(jnp.zeros(1))
    calls, inside, real = [], [False], jax.device_get

    def refuse(name, allowed=None):
        def f(self, *a, **kw):
            if allowed is not None and inside[0]:
                return allowed(self, *a, **kw)
            raise AssertionError(f"implicit device→host transfer ({name}) inside the solve")
        return f

    def device_get(x):
        calls.append(1)
        inside[0] = True
        try:
            return real(x)
        finally:
            inside[0] = False

    for name in ("__array__", "__float__", "__int__", "__bool__", "__index__", "item", "tolist"):
        monkeypatch.setattr(array_type, name, refuse(name, getattr(array_type, name)))
    monkeypatch.setattr(jax, "block_until_ready", refuse("block_until_ready"))
    monkeypatch.setattr(jax, "device_get", device_get)
    return calls


def _one_transfer_each(solves):
    refs = [fn() for fn in solves]                             # compiled outside the guard
    with pytest.MonkeyPatch.context() as mp:
        calls = _refuse_transfers(mp)
        got = [fn() for fn in solves]
    assert len(calls) == len(solves)                           # one transfer per solve
    for a, b in zip(got, refs):
        np.testing.assert_array_equal(a.eigvecs, b.eigvecs)


def test_device_paths_convert_nothing_implicitly(monkeypatch):
    """What runs on an accelerator — the dense path with the device's eigh, the batched program — reads its results
    back in one `jax.device_get` and nothing else (checked on the CPU backend, whose own dense path calls LAPACK on
    host arrays by design)."""
    gs = _crafted(1, True)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), gs, _crafted(2, True))
    monkeypatch.setattr(E, "_dense_eig", E._dense_eig_full)
    _one_transfer_each([lambda: E.exact(gs, 4), lambda: E.exact(_crafted(0, False), 4),
                        lambda: E.exact_batch(stacked, 4, subset=False)[1]])


@pytest.mark.slow
def test_multigrid_lobpcg_converts_nothing_implicitly():
    """The multi-grid LOBPCG takes its Chebyshev interval from the host (`metric_bounds`): no value is read back
    before or during the iteration (14 s: LOBPCG's compile)."""
    gs = _crafted(1, True)
    _one_transfer_each([lambda: E.exact(gs, 4, dense_max=0, maxiter=200)])
