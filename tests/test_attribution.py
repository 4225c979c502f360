"""Attribution (`spectral_jax.attribution`, `analysis.Attribution`): on planted multi-layer graphs the layer that
carries the partition gets the high Rayleigh quotients, the large eigengap and the small principal angles; heads and
diffusion timesteps are kept apart; the JSON and the figure are written."""

import json
import re
import warnings

import jax
import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax import viz
from spectral_jax.analysis import principal_angles
from spectral_jax.taps import LayerTap, Taps

jax.config.update("jax_default_matmul_precision", "float32")

GRID = (6, 6)
N = GRID[0] * GRID[1]


def _planted_taps(heads=2, timesteps=1, seed=0, carrier=1, layers=3, labels=None):
    """Layer `carrier`: q = k = 6·(one-hot of the image half) + noise, so its attention splits left/right; the other
    layers: small random q/k (near-uniform attention, no structure). With `labels` (one per timestep), the heads
    axis holds timesteps × heads and the taps carry them (`Taps.timesteps`)."""
    rng = np.random.default_rng(seed)
    side = (np.arange(N) % GRID[1] >= GRID[1] // 2).astype(int)
    onehot = np.eye(2)[side]                                                   # [N, 2]
    out = {}
    for l in range(layers):
        hs = heads * timesteps
        if l == carrier:
            base = np.concatenate([6.0 * onehot, np.zeros((N, 2))], 1)[None, None]
            q = base + 0.1 * rng.standard_normal((1, hs, N, 4))
            k = base + 0.1 * rng.standard_normal((1, hs, N, 4))
        else:
            q, k = (0.3 * rng.standard_normal((1, hs, N, 4)) for _ in range(2))
        out[l] = LayerTap(q.astype(np.float32), k.astype(np.float32), q.astype(np.float32), GRID)
    return Taps(out, timesteps=() if labels is None else tuple(labels)), side


def test_the_layer_with_the_partition_is_attributed():
    taps, side = _planted_taps()
    res = sj.solve(taps, "qk", 5)
    v1 = res.eigvecs[0, 1].ravel()
    assert abs(np.corrcoef(v1, side)[0, 1]) > 0.95                             # the joint solution found it
    att = sj.attribution(taps, "qk", 5, result=res)
    assert att.rq.shape == (3, 1, 2, 5) and att.eigvals.shape == (3, 1, 5) and att.angles.shape == (3, 1, 4)
    np.testing.assert_allclose(att.rq.reshape(-1, 5), res.rq[0], rtol=1e-6)   # Result.rq reused, not recomputed
    assert att.layer_rq[1, 1] > att.layer_rq[[0, 2], 1].max() + 0.3            # high quotient for eigenvector 2
    assert att.angles[1, 0, 0] < 0.1 and att.angles[[0, 2], 0, 0].min() > att.angles[1, 0, 0]   # smallest angle
    assert att.eigengap[1, 0] == att.eigengap.max()
    # the joint vectors 3..5 come from the other layers (the partition layer has rank 2), so over all K − 1 angles
    # those layers agree more: agreement is a per-subspace mean, the first angle says who carries eigenvector 2
    assert np.all((att.agreement >= 0) & (att.agreement <= 1))
    # each layer's own eigenvalues are its own solve's
    alone = sj.solve(Taps({1: taps.layers[1]}), "qk", 5)
    np.testing.assert_allclose(att.eigvals[1, 0], alone.eigvals[0], rtol=1e-5)
    # without a result: solved here, same quotients
    again = sj.attribution(taps, "qk", 5)
    np.testing.assert_allclose(again.rq, att.rq, rtol=1e-5, atol=1e-6)
    blob = json.loads(json.dumps(att.to_json()))
    assert blob["layers"] == [0, 1, 2] and np.asarray(blob["rq"]).shape == (3, 1, 2, 5)
    pic = viz.attribution_figure(att)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[0] >= 3 * 14


def test_timesteps_are_kept_apart():
    taps, _ = _planted_taps(heads=2, timesteps=3, seed=1, labels=[10, 50, 90])
    att = sj.attribution(taps, "vv", 4, timesteps=[10, 50, 90])
    assert att.rq.shape == (3, 3, 2, 4) and att.eigvals.shape == (3, 3, 4) and att.agreement.shape == (3, 3)
    assert list(att.timesteps) == [10, 50, 90]
    assert att.head_rq.shape == (3, 6)
    own = sj.attribution(taps, "vv", 4)                                         # None: the taps' own timesteps
    assert list(own.timesteps) == [10, 50, 90]
    np.testing.assert_allclose(own.rq, att.rq, rtol=1e-5, atol=1e-6)
    # timestep t is graphs t·H .. t·H + H − 1: its own spectrum is the solve of those heads alone
    layer1 = taps.layers[1]
    alone = sj.solve(Taps({1: LayerTap(*(x[:, 2:4] for x in (layer1.q, layer1.k, layer1.v)), GRID)}), "vv", 4)
    np.testing.assert_allclose(att.eigvals[1, 1], alone.eigvals[0], rtol=1e-5)
    for bad, needle in (([1, 2, 3, 4], "are not the taps' own [10, 50, 90]"),
                        ([90, 50, 10], "are not the taps' own"),
                        ([10, 10, 90], "repeat a timestep")):
        with pytest.raises(sj.InputError, match=re.escape(f"timesteps {bad}: {needle}")):
            sj.attribution(taps, "vv", 4, timesteps=bad)


def test_taps_own_repeated_timesteps_are_taken():
    """A drawn schedule may repeat a timestep (the random schedule draws with replacement): the taps' own list is
    taken as given, and None means it too."""
    taps, _ = _planted_taps(heads=2, timesteps=3, seed=1, labels=[10, 10, 90])
    att = sj.attribution(taps, "vv", 4, timesteps=[10, 10, 90])
    assert list(att.timesteps) == [10, 10, 90] and att.rq.shape == (3, 3, 2, 4)
    np.testing.assert_allclose(sj.attribution(taps, "vv", 4).rq, att.rq, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, needle", [([0, 1, 2], "are given but the taps carry none"),
                                         ([5, 5], "repeat a timestep"), ([0], "are given but the taps carry none")])
def test_timesteps_for_taps_without_them_are_refused(bad, needle):
    """A 6-head ViT's taps with timesteps=[0, 1, 2] were split into 3 fake timesteps of 2 heads; [5, 5] was taken."""
    taps, _ = _planted_taps(heads=6, layers=2, seed=3)
    with pytest.raises(sj.InputError) as e:
        sj.attribution(taps, "qk", 3, timesteps=bad)
    assert str(e.value).startswith(f"timesteps {bad}: {needle}") and " — " in str(e.value), str(e.value)
    assert sj.attribution(taps, "qk", 3).rq.shape == (2, 1, 6, 3)             # its heads stay heads


def test_joint_knn_attribution_and_layers_with_fewer_heads():
    taps, _ = _planted_taps(layers=2, seed=2)
    two = Taps({l: LayerTap(*(np.concatenate([x, x]) for x in (t.q, t.k, t.v)), GRID) for l, t in taps.layers.items()})
    att = sj.attribution(two, "knn-vv", 4, k_intra=8, k_inter=4)
    assert att.rq.shape == (2, 1, 1, 4)
    # a layer with one head next to one with two: NaN where there is no head
    mixed = Taps({0: taps.layers[0], 1: LayerTap(*(x[:, :1] for x in (taps.layers[1].q, taps.layers[1].k,
                                                                        taps.layers[1].v)), GRID)})
    att = sj.attribution(mixed, "qk", 4)
    assert att.rq.shape == (2, 1, 2, 4) and np.isnan(att.rq[1, 0, 1]).all() and not np.isnan(att.rq[0]).any()
    assert np.isfinite(att.layer_rq).all()


def test_principal_angles():
    rng = np.random.default_rng(0)
    a = np.linalg.qr(rng.standard_normal((20, 3)))[0]
    np.testing.assert_allclose(principal_angles(a, a @ rng.standard_normal((3, 3))), 0.0, atol=1e-6)
    e = np.eye(20)
    np.testing.assert_allclose(principal_angles(e[:, :2], e[:, 2:4]), np.pi / 2, atol=1e-12)
    half = np.stack([e[:, 0], (e[:, 1] + e[:, 2]) / np.sqrt(2)], 1)
    np.testing.assert_allclose(principal_angles(e[:, :2], half), [0.0, np.pi / 4], atol=1e-12)
    # dependent columns span fewer dimensions: one angle (π/4 from (1,1,0,0) to span{e1, e4}), not a QR's
    # arbitrary second direction (it gave [0, π/2])
    dup = np.stack([e[:, 0] + e[:, 1]] * 2, 1)
    np.testing.assert_allclose(principal_angles(dup, e[:, [0, 3]]), [np.pi / 4], atol=1e-12)
    assert principal_angles(np.zeros((20, 2)), e[:, :2]).shape == (0,)


def test_a_layer_grid_with_fewer_nodes_than_k():
    """A UNet-like layer on a 2×2 grid (4 nodes) beside a 6×6 one, K = 5: its own spectrum and angles are
    NaN-padded, nothing fails and nothing warns."""
    rng = np.random.default_rng(6)
    mk = lambda n: rng.standard_normal((1, 2, n, 4)).astype(np.float32)
    taps = Taps({0: LayerTap(mk(N), mk(N), mk(N), GRID), 1: LayerTap(mk(4), mk(4), mk(4), (2, 2))})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        att = sj.attribution(taps, "vv", 5, layer_weights="select")
        pic = viz.attribution_figure(att)
    assert np.isnan(att.eigvals[1, 0, 3:]).all() and np.isfinite(att.eigvals[1, 0, :3]).all()
    assert np.isfinite(att.angles[0]).all() and np.isnan(att.angles[1, 0, -1])
    assert np.isfinite(att.eigengap).all() and pic.dtype == np.uint8
