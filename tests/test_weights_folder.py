"""What a checkpoint folder's files and config mean to the loaders: without a shard index, a ViT folder's weights
are its model.safetensors (transformers' single-file name) whatever else lies beside it; several unrelated
*.safetensors and no index are refused in one line naming them; and a FLUX config given as a diffusers model's
`.config` (tuples where config.json has lists) reads as its JSON would.
"""

import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from spectral_jax.errors import InputError
from spectral_jax.models import convert
from spectral_jax.models.vit import config_from_hf, load_weights


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """A random-init tiny `Dinov2Model` saved with `save_pretrained` (config.json + model.safetensors) and its
    query weight of layer 0 (torch layout `[out, in]`)."""
    import torch
    import transformers

    torch.manual_seed(0)
    ref = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
        image_size=28)).eval()
    path = tmp_path_factory.mktemp("dinov2")
    ref.save_pretrained(path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    return path, config_from_hf(ref.config.to_dict()), ref.encoder.layer[0].attention.q_proj.weight


def _q_kernel(model):
    return np.asarray(model.layers[0].attention.q_proj.kernel[...])          # [in, out]


def _copy_with(folder, dest, extra: dict[str, dict[str, np.ndarray]], rename: str | None = None):
    """`folder`'s files linked into `dest` (its model.safetensors under the name `rename`, if given), plus the named
    extra safetensors files."""
    os.makedirs(dest)
    for name in os.listdir(folder):
        link = rename if rename and name == "model.safetensors" else name
        os.symlink(os.path.join(folder, name), os.path.join(dest, link))
    for name, tensors in extra.items():
        save_file(tensors, os.path.join(dest, name))
    return str(dest)


@pytest.mark.parametrize("extra", ["zz_copy.safetensors", "adapter.safetensors"])
def test_model_safetensors_is_the_checkpoint_without_an_index(dinov2_folder, tmp_path, extra):
    """Beside model.safetensors: a later-sorting copy with other values (it used to overwrite the weights) or an
    unrelated file (its keys used to be refused as unmapped)."""
    folder, cfg, query = dinov2_folder
    rng = np.random.default_rng(1)
    if extra.startswith("zz_copy"):
        from safetensors.numpy import load_file

        tensors = {k: rng.standard_normal(v.shape).astype(v.dtype)
                   for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    else:
        tensors = {"lora.down.weight": rng.standard_normal((4, 32)).astype(np.float32)}
    path = _copy_with(folder, tmp_path / "ckpt", {extra: tensors})
    assert convert.safetensors_files(path) == [os.path.join(path, "model.safetensors")]
    model = load_weights(cfg, path)
    np.testing.assert_array_equal(_q_kernel(model), query.detach().numpy().T)


def test_one_file_of_another_name_is_loaded(dinov2_folder, tmp_path):
    folder, cfg, query = dinov2_folder
    dest = _copy_with(folder, tmp_path / "renamed", {}, rename="dinov2-small.safetensors")
    np.testing.assert_array_equal(_q_kernel(load_weights(cfg, dest)), query.detach().numpy().T)


def test_several_files_without_index_are_refused(dinov2_folder, tmp_path):
    folder, cfg, _ = dinov2_folder
    dest = _copy_with(folder, tmp_path / "several", {"adapter.safetensors": {"x": np.zeros(2, np.float32)}},
                      rename="dinov2-small.safetensors")
    msg = (r"holds 2 \.safetensors files \(adapter\.safetensors, dinov2-small\.safetensors\) and no "
           r"model\.safetensors or model\.safetensors\.index\.json .* — pass the file to load \(e\.g\. --weights "
           r".*adapter\.safetensors\), or add the index")
    with pytest.raises(InputError, match=msg) as e:
        load_weights(cfg, str(dest))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=msg):
        convert.read_safetensors(str(dest))
    # the file named explicitly is loaded
    load_weights(cfg, os.path.join(dest, "dinov2-small.safetensors"))


def test_flux_config_reads_a_diffusers_model_config_with_tuples():
    """A diffusers model's `.config` keeps axes_dims_rope as the tuple it was given; config.json has a list."""
    import diffusers

    from spectral_jax.models.dit.params import flux_config_from_diffusers

    kw = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4))
    model_config = diffusers.FluxTransformer2DModel(**kw).config
    assert isinstance(model_config["axes_dims_rope"], tuple)
    from_model = flux_config_from_diffusers(dict(model_config))
    from_json = flux_config_from_diffusers({**kw, "axes_dims_rope": [2, 2, 4]})
    assert from_model == from_json and from_model.axes_dims_rope == (2, 2, 4)
    for bad in [(2, 2, 0), "224", (2.0, 2, 4)]:
        with pytest.raises(InputError, match="axes_dims_rope must be a non-empty list of integers"):
            flux_config_from_diffusers({**kw, "axes_dims_rope": bad})
