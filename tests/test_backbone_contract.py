"""The one backbone contract (`models.backbone`): for a ViT and every diffusion family (sd_tiny, pixart_tiny,
sd3_tiny, flux_tiny; random weights), `params` is a pytree of arrays and `apply(params, images, layers, hidden)` is
pure and jittable — no weights captured as constants, one compilation for other params values (the timesteps are
data), the diffusion timesteps under one scan (the program does not grow with T), an image's taps independent of
its batch, and a batch of one giving the numbers of the implementation before this contract (a closure per
timestep). `Backbone.from_function` with a diffusion-style user function (timesteps as int32 data)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax.errors import InputError
from spectral_jax.models import Backbone, load_backbone

TS = (10, 600)
SEED = 3
SIDE = {"dino_vits16": 32, "sd_tiny": 64, "pixart_tiny": 64, "sd3_tiny": 64, "flux_tiny": 64}
LATENT = {"sd_tiny": "mean", "pixart_tiny": "mean", "sd3_tiny": "mean", "flux_tiny": "sample"}
DIFFUSION = list(LATENT)

# Computed with the implementation before the pure contract (commit 3d20531: one jitted UNet/transformer call per
# timestep, closing over the model), on `_images(1)` at timesteps TS, seed SEED, every layer: the sums of |q|, |k|,
# |v| over all layers, and the last layer's v[0, T·H − 1, 0, :4] (the last timestep's last head).
BEFORE = {
    "sd_tiny": ((3364.5859, 3373.0289, 3380.697), 15, (-0.1322194, 0.1873983, -0.121275, 0.0213355)),
    "pixart_tiny": ((340.54788, 357.0405, 339.65202), 3, (0.09668779, 0.0844504, 0.08801372, -0.02621115)),
    "sd3_tiny": ((45.597286, 34.014199, 271.15225), 2, (0.04813308, 0.001275967, -0.08827783, -0.1094151)),
    "flux_tiny": ((52.278206, 43.964771, 355.41403), 3, (-0.0112275, -0.1107752, -0.0155769, -0.02587444)),
}


def _images(n, side=64, seed=0):
    """`n` images `[n, side, side, 3]` in [−1, 1]; the first of `_images(1)` is the same image for any n."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-1, 1, (side, side, 3)).astype(np.float32) for _ in range(n)])


@functools.lru_cache(maxsize=None)
def _backbone(name):
    options = {} if name == "dino_vits16" else dict(timesteps=list(TS), seed=SEED, latent=LATENT[name])
    return load_backbone(name, "random", **options)


@pytest.fixture(scope="module", params=["dino_vits16", *DIFFUSION])
def case(request):
    """(name, backbone, jitted apply, taps of `_images(1)` through it)."""
    name = request.param
    bb = _backbone(name)
    run = jax.jit(bb.apply, static_argnums=(2, 3))
    return name, bb, run, run(bb.params, _images(1, SIDE[name]), None, False)


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, what
    assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-6), what


def test_params_are_arrays_and_apply_closes_over_none(case):
    """Every leaf of params is an array (numpy copies of them run too); a jaxpr of apply captures no weights: its
    constants are small tables (the noise schedule, a position embedding), not params."""
    name, bb, run, taps = case
    leaves = jax.tree.leaves(bb.params)
    assert leaves and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
    x = _images(1, SIDE[name])
    closed = jax.make_jaxpr(bb.apply, static_argnums=(2, 3))(bb.params, x, None, False)
    assert sum(np.size(c) for c in closed.consts) <= 4096 < sum(np.size(x) for x in leaves) // 25
    host = jax.tree.map(np.asarray, bb.params)             # the dataset's replication of params
    again = run(host, x, None, False)
    for i, t in taps.layers.items():
        _close(again.layers[i].k, t.k, f"{name} layer {i}: host params")
    if name in DIFFUSION:
        assert bb.params["noise_key"].dtype == np.uint32 and bb.params["timesteps"].dtype == np.int32
        assert tuple(np.asarray(bb.params["timesteps"])) == bb.timesteps == TS


def test_other_params_values_reuse_the_compilation(case):
    """A second call with other param values (the diffusion backbones: other timesteps; the ViT: other weights)
    compiles nothing new, and its taps differ (the values are data, not baked in)."""
    name, bb, run, taps = case
    x = _images(1, SIDE[name])
    compiled = run._cache_size()
    if name in DIFFUSION:
        other = {**bb.params, "timesteps": jnp.asarray([600, 10], jnp.int32)}
    else:
        other = jax.tree.map(lambda a: a * 1.5, bb.params)
    out = run(other, x, None, False)
    assert run._cache_size() == compiled
    first = min(taps.layers)
    assert np.abs(np.asarray(out.layers[first].q) - np.asarray(taps.layers[first].q)).max() > 1e-4


@pytest.mark.parametrize("name", DIFFUSION)
def test_timesteps_run_under_one_scan(name):
    """The traced program is the same size for 2 and 5 timesteps: the denoiser is traced once, under a scan."""
    bb = _backbone(name)
    x = _images(1, SIDE[name])
    size = lambda ts: len(jax.make_jaxpr(bb.apply, static_argnums=(2, 3))(
        {**bb.params, "timesteps": jnp.asarray(ts, jnp.int32)}, x, (0,), False).jaxpr.eqns)
    assert size([10, 600]) == size([1, 2, 3, 4, 5])


def test_an_images_taps_do_not_depend_on_its_batch(case):
    """Image j's taps in a batch equal its taps alone, in either slot (the noise of a timestep, and a VAE sample,
    are one draw of an image's shape for the whole batch)."""
    name, bb, run, taps = case
    a, b = _images(1, SIDE[name]), _images(1, SIDE[name], seed=1)
    alone_b = run(bb.params, b, None, False)
    ab = run(bb.params, np.concatenate([a, b]), None, False)
    ba = run(bb.params, np.concatenate([b, a]), None, False)
    for i, t in taps.layers.items():
        for n in "qkv":
            _close(getattr(ab.layers[i], n)[:1], getattr(t, n), f"{name} layer {i} {n}: slot 0")
            _close(getattr(ba.layers[i], n)[1:], getattr(t, n), f"{name} layer {i} {n}: slot 1")
            _close(getattr(ab.layers[i], n)[1:], getattr(alone_b.layers[i], n), f"{name} layer {i} {n}: b")


@pytest.mark.parametrize("name", DIFFUSION)
def test_a_batch_of_one_gives_the_numbers_of_before(name):
    """Through the public `Backbone.taps`: every layer, T·H graphs, labelled with the timesteps; the numbers of
    the per-timestep implementation this contract replaced (`BEFORE`)."""
    bb = _backbone(name)
    taps = bb.taps(_images(1, SIDE[name]))
    sums, last, values = BEFORE[name]
    assert taps.timesteps == TS and max(taps.layers) == last
    for n, want in zip("qkv", sums):
        got = sum(float(np.abs(np.asarray(getattr(t, n), np.float64)).sum()) for t in taps.layers.values())
        assert got == pytest.approx(want, rel=1e-5), n
    v = np.asarray(taps.layers[last].v)
    assert v.shape[1] == len(TS) * bb.heads(last)
    np.testing.assert_allclose(v[0, -1, 0, :4], values, rtol=1e-4, atol=1e-6)


def test_backbone_timesteps_must_match_the_params():
    """`Backbone.timesteps` (provenance) and params["timesteps"] agree; taps are labelled with the params'."""
    bb = _backbone("pixart_tiny")
    with pytest.raises(InputError, match=r"has timesteps \[600, 10\] but its params hold \[10, 600\]"):
        dataclasses.replace(bb, timesteps=(600, 10))
    other = dataclasses.replace(bb, params={**bb.params, "timesteps": jnp.asarray([600, 10], jnp.int32)},
                                timesteps=(600, 10))
    assert other.taps(_images(1, 64)).timesteps == (600, 10)      # every layer: the program `case` compiled


# ------------------------------------------------------------------------------------------------ a user's function


def _user_diffusion(seen):
    """A diffusion-style user function: per layer q = k = v `[B, T·H, N, D]` with graph t·H + h equal to
    w[layer, h] · (timesteps[t] + 1) · the image's mean over channels of each patch (a stand-in for a model)."""

    def fn(params, images, layers, timesteps):
        seen.append((timesteps.dtype, timesteps.shape))
        b, hh, ww, _ = images.shape
        patches = images.reshape(b, hh // 8, 8, ww // 8, 8, 3).mean(axis=(2, 4, 5)).reshape(b, -1)   # [B, N]
        out = {}
        for i in (range(2) if layers is None else layers):
            w = params["w"][i]                                                           # [H, D]
            scale = (timesteps.astype(jnp.float32) + 1)[:, None, None]                    # [T, 1, 1]
            g = (scale * w[None]).reshape(-1, w.shape[1])                                # [T·H, D]
            q = patches[:, None, :, None] * g[None, :, None, :]                         # [B, T·H, N, D]
            out[i] = (q, q, q)
        return out

    return fn


def test_from_function_passes_timesteps_as_data():
    seen = []
    w = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)        # 2 layers, 3 heads, D = 4
    bb = Backbone.from_function("mine", _user_diffusion(seen), {"w": w}, patch_size=8, num_layers=2, size=16,
                                num_heads=3, timesteps=[5, 20])
    x = _images(2, 16)
    taps = bb.taps(x)
    assert bb.timesteps == taps.timesteps == (5, 20) and seen[0] == (jnp.int32, (2,))
    q = np.asarray(taps.layers[1].q)
    assert q.shape == (2, 6, 4, 4)
    patches = x.reshape(2, 2, 8, 2, 8, 3).mean(axis=(2, 4, 5)).reshape(2, -1)
    for t, ts in enumerate((5, 20)):
        for h in range(3):
            np.testing.assert_allclose(q[:, t * 3 + h], patches[:, :, None] * w[1, h] * (ts + 1), rtol=1e-5)
    other = dataclasses.replace(bb, params={**bb.params, "timesteps": jnp.asarray([7, 20], jnp.int32)},
                                timesteps=(7, 20))
    q7 = np.asarray(other.taps(x).layers[1].q)
    np.testing.assert_allclose(q7[:, :3], q[:, :3] * 8 / 6, rtol=1e-5)
    assert len(seen) == 1                                   # traced once: other timesteps are data


def test_from_function_checks_the_timestep_major_heads_axis():
    """num_heads given: each layer's heads axis must hold T·num_heads graphs; one InputError naming the layer."""
    w = np.ones((2, 3, 4), np.float32)
    fn = _user_diffusion([])
    bb = Backbone.from_function("mine", lambda p, im, layers, ts: fn(p, im, layers, ts[:1]), {"w": w},
                                patch_size=8, num_layers=2, size=16, num_heads=3, timesteps=[5, 20])
    with pytest.raises(InputError, match=r"layer 0 of backbone 'mine'.*3 graphs on its heads axis, expected "
                                         r"T·heads = 2·3 = 6"):
        bb.taps(_images(1, 16))
    with pytest.raises(InputError, match="timesteps"):
        Backbone.from_function("mine", fn, {"w": w}, patch_size=8, num_layers=2, timesteps=[-1])
    with pytest.raises(InputError, match="num_heads"):
        Backbone.from_function("mine", fn, {"w": w}, patch_size=8, num_layers=2, num_heads=0, timesteps=[5])
