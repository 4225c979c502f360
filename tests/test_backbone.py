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
    (None, None), ("all", None), (" ALL ", None), ("0,3,5", (0, 3, 5)), ("5,3,3", (3, 5)), ([-1], (11,)),
    ("-1,0", (0, 11)), (7, (7,)), ((1, 2), (1, 2)),
])
def test_parse_layers(text, expect):
    assert parse_layers(text, 12) == expect


@pytest.mark.parametrize("bad", ["12", "-13", "a,b", [], "", [1.5], [True]])
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
    assert jax.tree.leaves(t)                          # a plain pytree
