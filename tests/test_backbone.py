"""The backbone contract: a user's own function behind `Backbone`, one layer reader, one compile per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax.errors import InputError
from spectral_jax.models import Backbone, parse_layers


def _user_taps(params, images, layers):
    """A toy 3-layer 'model': q/k/v are linear maps of 4×4 patch means, 2 heads of dim 3."""
    b, h, w, _ = images.shape
    patches = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4)).reshape(b, -1, 3)      # [B, N, 3]
    out = {}
    for i in range(3):
        if layers is not None and i not in layers:
            continue
        qkv = jnp.einsum("bnc,lcd->lbnd", patches, params[i]).reshape(3, b, -1, 2, 3).transpose(0, 1, 3, 2, 4)
        out[i] = (qkv[0], qkv[1], qkv[2])                                                    # [B, 2, N, 3] each
    return out


@pytest.fixture
def user_backbone():
    params = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 3, 6)), jnp.float32)
    return Backbone.from_function("toy", _user_taps, params, patch_size=4, num_layers=3, size=16)


def test_user_function_backbone_runs_the_whole_pipeline(user_backbone):
    img = (np.random.default_rng(1).random((20, 28, 3)) * 255).astype(np.uint8)
    res = sj.analyze([img, img], backbone=user_backbone, size=16, num_eigs=4, graph="qk")
    assert res.eigvecs.shape == (2, 4, 4, 5) and res.eigvals.shape == (2, 4) and not res.joint
    np.testing.assert_allclose(res.eigvecs[0], res.eigvecs[1], atol=1e-5)            # the same image twice
    joint = sj.analyze([img, img], backbone=user_backbone, size=16, num_eigs=4, graph="knn-vv", k_intra=5)
    assert joint.joint and joint.eigvecs.shape == (2, 4, 4, 5)
    taps = user_backbone.taps(user_backbone.preprocess_image(img, 16)[None], layers=[-1])
    assert list(taps.layers) == [2] and taps.layers[2].grid == (4, 5) and taps.layers[2].q.shape == (1, 2, 20, 3)


def test_taps_compile_once_per_layers_and_shape(user_backbone):
    x = np.zeros((1, 16, 20, 3), np.float32)
    for _ in range(3):
        user_backbone.taps(x)
        user_backbone.taps(x, layers="0,2")
    assert user_backbone._compiled._cache_size() == 2
    user_backbone.taps(np.zeros((2, 16, 20, 3), np.float32))
    assert user_backbone._compiled._cache_size() == 3


def test_backbone_refuses_bad_images_and_hidden(user_backbone):
    with pytest.raises(InputError, match="multiples of 4"):
        user_backbone.taps(np.zeros((1, 15, 16, 3), np.float32))
    with pytest.raises(InputError, match="no hidden states"):
        user_backbone.taps(np.zeros((1, 16, 16, 3), np.float32), hidden=True)


@pytest.mark.parametrize("text, expect", [
    (None, None), ("all", None), (" ALL ", None), ("0,3,5", (0, 3, 5)), ("5,3", (3, 5)), ([-1], (11,)),
    ("-1,0", (0, 11)), (7, (7,)), ((1, 2), (1, 2)),
])
def test_parse_layers(text, expect):
    assert parse_layers(text, 12) == expect


@pytest.mark.parametrize("bad", ["12", "-13", "a,b", [], "", [1.5], [True], "5,3,3", "11,-1"])   # a layer named twice
def test_parse_layers_refuses(bad):
    with pytest.raises(InputError):
        parse_layers(bad, 12)


def test_registry_backbones_share_the_contract():
    vit = sj.load_backbone("dinov2_vits14", "random")
    assert vit.num_layers == 12 and vit.patch_size == 14 and vit.heads(3) == 6 and vit.timesteps == ()
    t = vit.taps(np.zeros((1, 28, 28, 3), np.float32), layers=[0])
    assert t.layers[0].num_prefix == 1 and t.patches().layers[0].q.shape == (1, 6, 4, 64)
    sd = sj.load_backbone("sd_tiny", "random", timesteps=[5, 50])
    t = sd.taps(np.zeros((1, 64, 64, 3), np.float32), layers=[0])
    assert sd.timesteps == (5, 50) and t.layers[0].q.shape[1] == 2 * sd.heads(0)
    assert t.timesteps == (5, 50) and vit.taps(np.zeros((1, 28, 28, 3), np.float32), layers=[0]).timesteps == ()
    assert jax.tree.leaves(t)                          # a plain pytree


# ------------------------------------------------------------------------------------------------------------------
# a user function's misuse: one InputError naming the layer and the shape expected and got (it was a bare
# ValueError/JaxRuntimeError traceback deep in the graphs or the solver, or a silent result: an extra layer solved
# on, a missing one dropped, twice the batch giving two results for one image)


def _misuse(kind):
    """A 4-layer user function on 16×16 inputs (patch 4: a 4×4 grid, 16 tokens, one prefix token) that returns
    correct taps except for `kind`."""
    def fn(params, images, layers):
        b = images.shape[0]
        x = images.reshape(b, -1)[:, :17 * 3].reshape(b, 1, 17, 3)                  # [B, 1, T, 3]
        qkv = lambda heads=2, t=17, d=3, batch=b: jnp.tile(x[:batch, :, :t, :1], (1, heads, 1, d))
        out = {i: (qkv(), qkv(), qkv(d=5)) for i in (range(4) if layers is None else layers)}
        first = min(out)
        if kind == "tokens":
            out[first] = (qkv(t=16), qkv(t=16), qkv(t=16))
        elif kind == "k-heads":
            out[first] = (qkv(), qkv(heads=3), qkv())
        elif kind == "k-dim":
            out[first] = (qkv(), qkv(d=4), qkv())
        elif kind == "v-heads":
            out[first] = (qkv(), qkv(), qkv(heads=1))
        elif kind == "rank":
            out[first] = (qkv()[0], qkv(), qkv())
        elif kind == "not-a-triple":
            out[first] = (qkv(), qkv())
        elif kind == "ints":
            out[first] = tuple(a.astype(jnp.int32) for a in out[first])
        elif kind == "empty":
            out = {}
        elif kind == "extra-layer":
            out[99] = out[first]
        elif kind == "missing-layer":
            del out[max(out)]
        elif kind == "twice-the-batch":
            out[first] = tuple(jnp.concatenate([a, a]) for a in out[first])
        elif kind == "a-list":
            out = list(out.values())
        return out

    return Backbone.from_function("mine", fn, None, patch_size=4, num_layers=4, size=16, num_prefix=1)


MISUSE = {
    "tokens": "layer 0 of backbone 'mine': q has shape (1, 2, 16, 3), expected [B=1, heads, T=17 (num_prefix 1 + 4×4",
    "k-heads": "layer 0 of backbone 'mine': k has shape (1, 3, 17, 3), expected q's (1, 2, 17, 3)",
    "k-dim": "layer 0 of backbone 'mine': k has shape (1, 2, 17, 4), expected q's (1, 2, 17, 3)",
    "v-heads": "layer 0 of backbone 'mine': v has shape (1, 1, 17, 3), expected [1, 2, 17, Dv]",
    "rank": "layer 0 of backbone 'mine': q, k, v have shapes [(2, 17, 3), (1, 2, 17, 3), (1, 2, 17, 3)], expected",
    "not-a-triple": "layer 0 of backbone 'mine': is 2 items, not (q, k, v)",
    "ints": "layer 0 of backbone 'mine': q, k, v have dtypes ['int32', 'int32', 'int32'], expected floating",
    "empty": "the function of backbone 'mine': returned no layers (asked for [0, 1, 2, 3])",
    "extra-layer": "the function of backbone 'mine': returned layers [99], not asked for (asked for [0, 1, 2, 3])",
    "missing-layer": "the function of backbone 'mine': did not return layers [3] (asked for [0, 1, 2, 3])",
    "twice-the-batch": "layer 0 of backbone 'mine': q has shape (2, 2, 17, 3), expected [B=1, heads, T=17",
    "a-list": "the function of backbone 'mine': returned list",
}


@pytest.mark.parametrize("kind", sorted(MISUSE))
def test_user_function_misuse_is_one_input_error(kind):
    bb = _misuse(kind)
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    with pytest.raises(InputError) as e:
        sj.analyze(img, backbone=bb, num_eigs=3)
    msg = str(e.value)
    assert msg.startswith(MISUSE[kind]) and " — return {layer: (q, k, v)}" in msg and "\n" not in msg, msg
    with pytest.raises(InputError) as e:                                       # the same through taps() alone
        bb.taps(np.zeros((1, 16, 16, 3), np.float32))
    assert str(e.value) == msg


def test_user_function_layers_are_exactly_those_asked_for():
    """A layer selection reaches the function; missing one of them is refused, the rest is solved on exactly."""
    bb = _misuse("missing-layer")
    x = np.zeros((1, 16, 16, 3), np.float32)
    with pytest.raises(InputError, match=r"did not return layers \[2\] \(asked for \[0, 2\]\)"):
        bb.taps(x, layers=[0, 2])
    ok = _misuse("none")
    assert sorted(ok.taps(x, layers=[2, 0]).layers) == [0, 2]
    res = sj.analyze((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8), backbone=ok,
                     layers=[1, 3], num_eigs=3)
    assert res.provenance.layers == (1, 3)


def test_user_function_output_is_checked_once_per_compile():
    """The check reads shapes where jit traces: a second call of the same shape runs no Python of the function."""
    calls = []

    def fn(params, images, layers):
        calls.append(images.shape)
        b, n = images.shape[0], (images.shape[1] // 4) * (images.shape[2] // 4)
        q = jnp.broadcast_to(images[:, :1, :1, :1], (b, 2, n, 3))
        return {i: (q, q, q) for i in (range(2) if layers is None else layers)}

    bb = Backbone.from_function("once", fn, None, patch_size=4, num_layers=2, size=16)
    for _ in range(3):
        bb.taps(np.zeros((1, 16, 16, 3), np.float32))
    assert calls == [(1, 16, 16, 3)]


def test_user_function_taps_output_is_checked_too():
    def fn(params, images, layers):
        n = (images.shape[1] // 4) * (images.shape[2] // 4)
        q = jnp.zeros((images.shape[0], 2, n + 1, 3))                    # a prefix token the Taps do not declare
        return sj.Taps({0: sj.LayerTap(q, q, q, (images.shape[1] // 4, images.shape[2] // 4), 0)})

    bb = Backbone.from_function("taps", fn, None, patch_size=4, num_layers=1, size=16)
    with pytest.raises(InputError, match=r"layer 0 of backbone 'taps': q has shape \(1, 2, 17, 3\), expected "
                                         r"\[B=1, heads, T=16 "):
        bb.taps(np.zeros((1, 16, 16, 3), np.float32))


@pytest.mark.parametrize("scale, needle", [(1e20, "produced |q|, |k| or |v| up to 1e+20 > 1e+15"),
                                           (float("inf"), "produced NaN or Inf")])
def test_user_function_values_beyond_the_logits_range_are_refused(scale, needle):
    """q/k at 1e20: q·kᵀ overflows float32 to inf, the softmax gives NaN and the solver a JaxRuntimeError."""
    def fn(params, images, layers):
        n = (images.shape[1] // 4) * (images.shape[2] // 4)
        q = jnp.full((images.shape[0], 2, n, 3), params) * jnp.arange(1, n + 1)[None, None, :, None] / n
        return {0: (q, q, q)}

    bb = Backbone.from_function("huge", fn, jnp.float32(scale), patch_size=4, num_layers=1, size=16)
    img = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    with pytest.raises(InputError) as e:
        sj.analyze(img, backbone=bb, num_eigs=3)
    assert str(e.value).startswith(f"weights 'user': layer 0 {needle}"), str(e.value)
