"""Forward-pass behaviour: tap selection, hidden states, jit (no retrace on the second call), dtype, input checks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from spectral_jax.errors import InputError
from spectral_jax.models.vit import PRESETS, ViT, jit_forward, load_weights

CFG = dataclasses.replace(PRESETS["dinov2_vits14_reg"], hidden_size=48, num_heads=3, mlp_dim=96, num_layers=3,
                          pos_grid=4)


@pytest.fixture(scope="module")
def model():
    return load_weights(CFG, "random", seed=1)


def images(h=56, w=84, b=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32))


def test_layer_selection_and_hidden(model):
    x = images()
    out_all, all_taps = jit_forward(model, hidden=True)(x)
    out_one, one = jit_forward(model, layers=[2, 0])(x)
    assert sorted(one.layers) == [0, 2] and one.hidden == {}
    assert sorted(all_taps.layers) == [0, 1, 2] and sorted(all_taps.hidden) == [0, 1, 2]
    np.testing.assert_array_equal(out_one, out_all)
    for i in (0, 2):
        np.testing.assert_array_equal(one.layers[i].q, all_taps.layers[i].q)
    tap = all_taps.layers[1]
    assert tap.q.shape == (2, 3, 1 + 4 + 4 * 6, 16) and tap.grid == (4, 6) and tap.num_prefix == 5
    assert tap.patches().q.shape == (2, 3, 24, 16)
    assert all_taps.hidden[2].shape == (2, 29, 48)
    # the last block's output, layer-normed, is last_hidden_state
    np.testing.assert_allclose(out_all, model.layernorm(all_taps.hidden[2]), rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="layers 0..2"):
        jit_forward(model, layers=[3])


def test_jit_matches_eager_and_does_not_retrace(model, monkeypatch):
    x = images()
    ref_out, ref_taps = model(x, layers=[1])
    traces = []
    call = ViT.__call__
    monkeypatch.setattr(ViT, "__call__", lambda self, *a, **k: (traces.append(1), call(self, *a, **k))[1])
    forward = jit_forward(model, layers=[1])
    out, taps = forward(x)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5)
    np.testing.assert_allclose(taps.layers[1].v, ref_taps.layers[1].v, rtol=0, atol=1e-5)
    forward(x + 1.0)
    assert len(traces) == 1  # same shape: the compiled executable is reused
    forward(images(h=42))
    assert len(traces) == 2  # a new shape traces once more


def test_bfloat16_params_and_activations():
    m32 = load_weights(CFG, "random", seed=1)
    m16 = load_weights(CFG, "random", seed=1, dtype=jnp.bfloat16)
    assert m16.layers[0].attention.q_proj.kernel[...].dtype == jnp.bfloat16
    x = images()
    out16, taps16 = jit_forward(m16)(x.astype(jnp.bfloat16))
    out32, _ = jit_forward(m32)(x)
    assert out16.dtype == jnp.bfloat16 and taps16.layers[0].k.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per op); after 3 blocks and a final
    # norm the error stays within a few percent of the activation scale, while a wrong dtype path would not run.
    err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max() / np.abs(np.asarray(out32)).max()
    assert err < 3e-2


def test_bad_input_shape(model):
    with pytest.raises(ValueError, match="multiples of 14"):
        model(images(h=50))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model(jnp.zeros((1, 56, 56, 4)))
