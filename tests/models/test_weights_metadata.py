"""Broken weights-folder metadata (issue #10, item 8): config.json (ViT and SD unet/vae/text_encoder),
scheduler_config.json and *.safetensors.index.json that are not JSON, not an object, have fields of the wrong type
or sizes < 1, lack `weight_map` or name missing shards → one `InputError` naming the file, the field and the fix
(never a JSONDecodeError/KeyError/TypeError traceback); through the console script: exit 2, one line, no output.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from test_vit_weights import TINY, tiny_checkpoint

from spectral_jax.errors import InputError
from spectral_jax.models.sd import params as S
from spectral_jax.models.vit import PRESETS, config_from_hf, load_weights
from spectral_jax.models.sd import load_sd

# transformers' facebook/dinov2-small config (the fields we read) and sd_tiny's diffusers configs
DINO_S = {"model_type": "dinov2", "hidden_size": 384, "num_attention_heads": 6, "image_size": 518, "patch_size": 14}
UNET = {"block_out_channels": [32, 64, 64, 64], "attention_head_dim": 2, "cross_attention_dim": 32,
        "norm_num_groups": 8, "layers_per_block": 2}
VAE = {"block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4, "layers_per_block": 1,
       "norm_num_groups": 4}
SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def put(folder, name, content) -> str:
    """Write `content` (a str as is, anything else as JSON) to folder/name; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(folder)


def refused(fn, file, match):
    with pytest.raises(InputError, match=match) as e:
        fn()
    msg = str(e.value)
    assert msg.startswith((f"{file}: ", f"{file} (")) and " — " in msg and "\n" not in msg, msg
    return msg


VIT_CONFIGS = {
    "invalid_json": ("{not json", r"not valid JSON \(Expecting property name enclosed in double quotes at line 1"),
    "a_list": ([1, 2], r"must hold a JSON object \{\.\.\.\}, got a list"),
    "hidden_str": ({**DINO_S, "hidden_size": "abc"}, r'hidden_size must be an integer ≥ 1, got "abc"'),
    "hidden_negative": ({**DINO_S, "hidden_size": -384}, "hidden_size must be an integer ≥ 1, got -384"),
    "hidden_float": ({**DINO_S, "hidden_size": 384.5}, "hidden_size must be an integer ≥ 1, got 384.5"),
    "patch_zero": ({**DINO_S, "patch_size": 0}, "patch_size must be an integer ≥ 1, got 0"),
    "layers_bool": ({**DINO_S, "num_hidden_layers": True}, "num_hidden_layers must be an integer ≥ 1, got true"),
    "eps_nan": (json.dumps({**DINO_S, "layer_norm_eps": float("nan")}), "layer_norm_eps must be a finite number > 0"),
    "qkv_bias_str": ({**DINO_S, "qkv_bias": "yes"}, 'qkv_bias must be true or false, got "yes"'),
    "registers_negative": ({**DINO_S, "model_type": "dinov2_with_registers", "num_register_tokens": -1},
                           "num_register_tokens must be an integer ≥ 0"),
    "model_type_list": ({**DINO_S, "model_type": ["dinov2"]}, r'model_type must be a string, got \["dinov2"\]'),
    "vision_config_str": ({"model_type": "clip", "vision_config": "x"}, 'vision_config must be a JSON object'),
    "vision_inner": ({"model_type": "clip", "vision_config": {"patch_size": "16"}},
                     r'\(vision_config\): patch_size must be an integer ≥ 1, got "16"'),
    "heads_do_not_divide": ({**DINO_S, "hidden_size": 385}, "hidden_size 385 is not a multiple of num_heads 6"),
    "other_family": ({**DINO_S, "model_type": "swin"}, "model_type 'swin' is not a supported ViT family"),
}


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_vit_config_json_problems_are_one_line(tmp_path, name):
    content, match = VIT_CONFIGS[name]
    folder = put(tmp_path / name, "config.json", content)
    refused(lambda: load_weights(PRESETS["dinov2_vits14"], folder), os.path.join(folder, "config.json"), match)


def test_config_from_hf_refuses_non_objects_and_checks_types():
    with pytest.raises(InputError, match=r"^config\.json: must hold a JSON object"):
        config_from_hf([1])
    with pytest.raises(InputError, match=r"^cfg\.json: image_size must be an integer ≥ 1, got null"):
        config_from_hf({**DINO_S, "image_size": None}, "cfg.json")
    assert config_from_hf(DINO_S) == PRESETS["dinov2_vits14"]


INDEXES = {
    "invalid_json": ("{oops", r"not valid JSON"),
    "a_list": ([], r"must hold a JSON object \{\.\.\.\}, got a list"),
    "no_weight_map": ({"metadata": {}}, r"needs a weight_map object \{tensor name: shard file\}, got no weight_map"),
    "weight_map_list": ({"weight_map": ["a.safetensors"]}, "got a list"),
    "weight_map_empty": ({"weight_map": {}}, "got an empty object"),
    "weight_map_ints": ({"weight_map": {"embeddings.cls_token": 1}}, "got a non-string file name"),
    "missing_shard": ({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}},
                      r"names 2 missing shard file\(s\): model-00001-of-00002\.safetensors, "
                      r"model-00002-of-00002\.safetensors"),
    "outside": ({"weight_map": {"a": "../model.safetensors"}}, "names a shard outside its folder: '../model.safetensors'"),
}


@pytest.mark.parametrize("name", sorted(INDEXES))
def test_vit_index_problems_are_one_line(tmp_path, name):
    content, match = INDEXES[name]
    folder = put(tmp_path / name, "model.safetensors.index.json", content)
    save_file(tiny_checkpoint(), str(tmp_path / "model.safetensors"))  # outside the folder: never read
    refused(lambda: load_weights(TINY, folder), os.path.join(folder, "model.safetensors.index.json"), match)


def test_a_good_sharded_index_still_loads(tmp_path):
    sd = tiny_checkpoint()
    names = sorted(sd)
    half = {n: sd[n] for n in names[::2]}, {n: sd[n] for n in names[1::2]}
    for i, part in enumerate(half):
        save_file(part, str(tmp_path / f"model-{i}.safetensors"))
    put(tmp_path, "model.safetensors.index.json",
        {"metadata": {}, "weight_map": {n: f"model-{names.index(n) % 2}.safetensors" for n in names}})
    direct = tmp_path / "direct"
    direct.mkdir()
    save_file(sd, str(direct / "model.safetensors"))
    a, b = load_weights(TINY, str(tmp_path)), load_weights(TINY, str(direct))
    np.testing.assert_array_equal(np.asarray(a.layers[1].attention.k_proj.kernel[...]),
                                  np.asarray(b.layers[1].attention.k_proj.kernel[...]))


SD_CONFIGS = {
    "unet": [({**UNET, "block_out_channels": "abc"}, 'block_out_channels must be a non-empty list of integers ≥ 1'),
             ({**UNET, "block_out_channels": [0, 64, 64, 64]}, r"got \[0, 64, 64, 64\]"),
             ({**UNET, "attention_head_dim": -2}, "attention_head_dim must be an integer ≥ 1 or a non-empty list"),
             ({**UNET, "norm_num_groups": 0}, "norm_num_groups must be an integer ≥ 1, got 0"),
             ({**UNET, "norm_num_groups": 5}, r"block_out_channels \[32, 64, 64, 64\] are not divisible into "
                                              r"norm_num_groups=5 groups"),
             ({**UNET, "norm_eps": "x"}, 'norm_eps must be a finite number > 0, got "x"'),
             ({**UNET, "use_linear_projection": 1}, "use_linear_projection must be true or false"),
             ({**UNET, "down_block_types": "CrossAttnDownBlock2D"}, "down_block_types must be a non-empty list of "
                                                                    "strings"),
             ([1], r"must hold a JSON object \{\.\.\.\}, got a list"),
             ("{", "not valid JSON")],
    "vae": [({**VAE, "down_block_types": "DownEncoderBlock2D"}, "down_block_types must be a non-empty list"),
            ({**VAE, "scaling_factor": "0.18"}, 'scaling_factor must be a finite number > 0, got "0.18"'),
            ({**VAE, "layers_per_block": 0}, "layers_per_block must be an integer ≥ 1, got 0"),
            ({**VAE, "norm_num_groups": 3}, "not divisible into norm_num_groups=3 groups")],
    "text_encoder": [({"hidden_size": 0}, "hidden_size must be an integer ≥ 1, got 0"),
                     ({"vocab_size": "big"}, 'vocab_size must be an integer ≥ 1, got "big"'),
                     ({"model_type": "clip", "text_config": []}, r"text_config must be a JSON object, got \[\]"),
                     ({"model_type": "clip", "text_config": {"hidden_act": 3}},
                      r"\(text_config\): hidden_act must be a string, got 3"),
                     ({"layer_norm_eps": -1}, "layer_norm_eps must be a finite number > 0, got -1")],
}


@pytest.mark.parametrize("part,case", [(p, i) for p, cases in SD_CONFIGS.items() for i in range(len(cases))])
def test_sd_component_config_problems_are_one_line(tmp_path, part, case):
    """Read as a folder without an expected config (the `load_unet(path)` API: the config alone decides)."""
    content, match = SD_CONFIGS[part][case]
    folder = put(tmp_path / part, "config.json", content)
    refused(lambda: S.load_component(part, folder), os.path.join(folder, "config.json"), match)


def sd_folder(root, unet=UNET, vae=VAE, sched=SCHED, unet_index=None) -> str:
    put(root / "unet", "config.json", unet)
    put(root / "vae", "config.json", vae)
    put(root / "scheduler", "scheduler_config.json", sched)
    (root / "text_encoder").mkdir(exist_ok=True)
    if unet_index is not None:
        put(root / "unet", "diffusion_pytorch_model.safetensors.index.json", unet_index)
    return str(root)


def test_load_sd_checks_scheduler_index_and_every_config_before_weights(tmp_path):
    sched = os.path.join("scheduler", "scheduler_config.json")
    for content, match in [("{", "not valid JSON"), ("[]", "must hold a JSON object"),
                           ({**SCHED, "beta_start": "x"}, 'beta_start must be a finite number, got "x"'),
                           ({**SCHED, "num_train_timesteps": 0}, "num_train_timesteps must be an integer ≥ 1")]:
        root = sd_folder(tmp_path / f"s{len(os.listdir(tmp_path))}", sched=content)
        refused(lambda: load_sd("sd_tiny", root), os.path.join(root, sched), match)
    index = os.path.join("unet", "diffusion_pytorch_model.safetensors.index.json")
    root = sd_folder(tmp_path / "no-map", unet_index={"metadata": {}})
    refused(lambda: load_sd("sd_tiny", root), os.path.join(root, index), "got no weight_map")
    root = sd_folder(tmp_path / "missing", unet_index={"weight_map": {"conv_in.weight": "u-1.safetensors"}})
    refused(lambda: load_sd("sd_tiny", root), os.path.join(root, index), r"names 1 missing shard file\(s\): u-1")
    # the vae's config.json is refused before the UNet's weights are looked for (there are none here)
    root = sd_folder(tmp_path / "vae", vae={**VAE, "scaling_factor": None, "latent_channels": "4"})
    refused(lambda: load_sd("sd_tiny", root), os.path.join(root, "vae", "config.json"),
            'latent_channels must be an integer ≥ 1, got "4"')


def _cli(*args, cwd):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "spectral_jax", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_console_script_refuses_broken_weights_folders_in_one_line(tmp_path):
    """As a user runs it: `spectral-jax extract img.png --model M --weights DIR --out a.npz` → exit 2, one stderr
    line naming the broken file, no output file (nor any leftover) in the output folder."""
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "img.png")
    put(tmp_path / "bad-json", "config.json", "{not json")
    put(tmp_path / "hidden-str", "config.json", {**DINO_S, "hidden_size": "abc"})
    put(tmp_path / "no-map", "model.safetensors.index.json", {"metadata": {}})
    sd_folder(tmp_path / "sd-vae", vae={**VAE, "scaling_factor": "0.18"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for model, size, folder, file in [("dinov2_vits14", "56", "bad-json", "config.json"),
                                      ("dinov2_vits14", "56", "hidden-str", "config.json"),
                                      ("dinov2_vits14", "56", "no-map", "model.safetensors.index.json"),
                                      ("sd_tiny", "64", "sd-vae", os.path.join("vae", "config.json"))]:
        r = _cli("extract", "img.png", "--model", model, "--size", size, "--weights", folder,
                 "--out", str(out_dir / "a.npz"), cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (folder, r.returncode, r.stderr)
        assert lines[0].startswith(f"spectral-jax extract: error: {os.path.join(folder, file)}: "), lines[0]
        assert r.stdout == "" and list(out_dir.iterdir()) == [], folder
