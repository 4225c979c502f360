"""Stable Diffusion model names → architecture, HF repo id, preprocessing; `load_sd(name, weights)`.

    sd = load_sd("sd15")                          # HF cache (or download when online), diffusers layout
    sd = load_sd("sd_tiny", "random")             # tiny random model (tests, benchmarks)
    sd.unet, sd.vae, sd.context, sd.schedule      # UNet, VAE encoder, empty-prompt embedding [1, 77, Cc], DDPM

Names: sd14 (CompVis/stable-diffusion-v1-4), sd15 (runwayml/stable-diffusion-v1-5; since the original repository
was withdrawn, the same files are mirrored as stable-diffusion-v1-5/stable-diffusion-v1-5 — pass that id or a
local directory with --weights), sd21_base (stabilityai/stable-diffusion-2-1-base), and sd_tiny (a small random
architecture with SD 1.x's layout — 16 self-attention layers on 4 grids — for tests and benchmarks only).

Preprocessing: RGB in [−1, 1] ((x/255 − 0.5)/0.5); the default size is 512 (SD's training resolution; the
official code resizes to 512²); sides must be multiples of 8 (the VAE's downscale).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, empty_prompt_ids
from spectral_jax.models.registry import PreprocessSpec
from spectral_jax.models.scheduler import DDPMSchedule
from spectral_jax.models.sd_unet import UNet2DConditionModel, UNetConfig
from spectral_jax.models.sd_vae import AutoencoderKL, VAEConfig
from spectral_jax.models.weights import check_fields, read_json

SD_MEAN, SD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SDConfig:
    """One Stable Diffusion architecture. pad: the tokenizer's padding ("eos" SD 1.x, "zero" SD 2.x)."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    pad: str
    schedule: DDPMSchedule = DDPMSchedule()

    @property
    def num_layers(self) -> int:
        """Self-attention (tapped) layers of the UNet."""
        return self.unet.num_layers


@dataclasses.dataclass(frozen=True)
class SDSpec:
    """Registry entry; the same fields as `registry.ModelSpec` (name, config, repo_id, preprocess)."""

    name: str
    config: SDConfig
    repo_id: str | None
    preprocess: PreprocessSpec


_SD1 = SDConfig(UNetConfig(), VAEConfig(), CLIPTextConfig(), "eos")
_SD2 = SDConfig(UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                           use_linear_projection=True),
                VAEConfig(),
                CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                               hidden_act="gelu"), "zero")
_TINY = SDConfig(UNetConfig(block_out_channels=(32, 64, 64, 64), num_attention_heads=(2, 2, 2, 2),
                            cross_attention_dim=32, norm_num_groups=8),
                 VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
                 CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2), "eos")

_PREP = PreprocessSpec(512, 8, SD_MEAN, SD_STD)
SD_MODELS: dict[str, SDSpec] = {s.name: s for s in [
    SDSpec("sd14", _SD1, "CompVis/stable-diffusion-v1-4", _PREP),
    SDSpec("sd15", _SD1, "runwayml/stable-diffusion-v1-5", _PREP),
    SDSpec("sd21_base", _SD2, "stabilityai/stable-diffusion-2-1-base", _PREP),
    SDSpec("sd_tiny", _TINY, None, PreprocessSpec(128, 8, SD_MEAN, SD_STD)),
]}


def is_sd(name: str) -> bool:
    return name in SD_MODELS


@dataclasses.dataclass
class StableDiffusion:
    """What the attention taps need: UNet, VAE encoder, the empty-prompt text embedding, the noise schedule."""

    name: str
    cfg: SDConfig
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    context: jax.Array            # [1, 77, Cc]
    schedule: DDPMSchedule


# ---------------------------------------------------------------------------------------------------------------
# Where the weights are
# ---------------------------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
          "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors")


def how_to_get(repo_id: str) -> str:
    return (f"fetch it once while online: `hf download {repo_id} {' '.join(_FILES)}` (fills the HF cache; "
            f"older clients: huggingface-cli download), or pass --weights DIR holding unet/, vae/ and text_encoder/ "
            f"in diffusers layout")


def _has_unet(d: str) -> bool:
    return bool(glob.glob(os.path.join(d, "unet", "*.safetensors")))


def find_in_hub_cache(repo_id: str) -> str | None:
    """The snapshot of `repo_id` in the HF hub cache that holds unet/*.safetensors (refs/main first), or None."""
    from spectral_jax.models.weights import find_in_hub_cache as find

    return find(repo_id, holds=_has_unet)


def _download(repo_id: str) -> str:
    what = f"weights {repo_id!r}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")
    if offline:
        raise InputError(what, "not in the HF cache and HF_HUB_OFFLINE is set", how_to_get(repo_id))
    try:
        import huggingface_hub
    except ImportError:
        raise InputError(what, "not in the HF cache and huggingface_hub is not installed",
                         how_to_get(repo_id)) from None
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=[*_FILES, "tokenizer/*.json"])
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise InputError(what, f"not in the HF cache and the download failed ({type(e).__name__})",
                         how_to_get(repo_id)) from None
    if not _has_unet(path):
        raise InputError(what, "the repository has no unet/*.safetensors", "choose a diffusers-layout SD repository")
    return path


def resolve(source: str) -> str:
    """A local diffusers-layout directory for `source` (a directory, or an HF repo id via cache or download)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if not os.path.isdir(os.path.join(path, "unet")) or not os.path.isdir(os.path.join(path, "vae")):
            raise InputError(path, "has no unet/ and vae/ subfolders",
                             "pass a Stable Diffusion checkpoint directory in diffusers layout")
        return path
    if _REPO_ID.match(source):
        return find_in_hub_cache(source) or _download(source)
    raise InputError(f"weights {source!r}", "no such directory, and not a Hugging Face repo id",
                     "pass a diffusers-layout checkpoint directory, a repo id like "
                     "stabilityai/stable-diffusion-2-1-base, or 'random'")


# ---------------------------------------------------------------------------------------------------------------
# Text conditioning
# ---------------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="graphdef")
def _encode_text(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def empty_prompt_embedding(encoder: CLIPTextModel, pad: str) -> jax.Array:
    """The text encoder's last_hidden_state for the empty prompt, `[1, 77, Cc]`."""
    graphdef, state = nnx.split(encoder)
    return _encode_text(graphdef, state, jnp.asarray(empty_prompt_ids(encoder.cfg, pad)))


def load_text_embedding(path: str, cfg: SDConfig) -> jax.Array:
    """A saved embedding (.npy, `[77, Cc]` or `[1, 77, Cc]`, e.g. written by `save_empty_prompt_embedding`)."""
    fix = "save it with spectral_jax.models.sd.save_empty_prompt_embedding(name, weights, path)"
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a readable .npy file ({type(e).__name__})", fix) from None
    arr = arr[None] if arr.ndim == 2 else arr
    want = (1, cfg.text.max_position_embeddings, cfg.unet.cross_attention_dim)
    if arr.shape != want:
        raise InputError(path, f"has shape {arr.shape}, the UNet needs {want}", fix)
    if not np.all(np.isfinite(arr)):
        raise InputError(path, "contains NaN or Inf", fix)
    return jnp.asarray(arr, jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def get_sd_spec(name: str) -> SDSpec:
    if name not in SD_MODELS:
        raise InputError(f"model {name!r}", "not a Stable Diffusion model", f"choose one of: {', '.join(SD_MODELS)}")
    return SD_MODELS[name]


def load_sd(name: str, weights: str | None = None, *, text_embedding: str | None = None, dtype=jnp.float32,
            seed: int = 0, attn_chunk: int | None = None) -> StableDiffusion:
    """Build SD model `name` with its weights.

    weights: a diffusers-layout directory (unet/, vae/, text_encoder/), an HF repo id (HF cache; downloaded only
    when online), None → the registry's repo id, or "random" (seeded; any name, e.g. sd_tiny for tests).
    text_embedding: a saved empty-prompt embedding (.npy) — then text_encoder/ is not read.
    attn_chunk: compute attention in blocks of this many query rows (bounds memory at 64² latents).
    Missing weights offline → `InputError` naming the download command.
    """
    from spectral_jax.models import sd_weights as W

    spec = get_sd_spec(name)
    cfg = dataclasses.replace(spec.config, unet=dataclasses.replace(spec.config.unet, attn_chunk=attn_chunk))
    source = weights if weights is not None else spec.repo_id
    if source is None:
        raise InputError(f"model {name!r}", "has no published weights", "pass --weights random")
    context = load_text_embedding(text_embedding, cfg) if text_embedding else None  # checked before the UNet
    if source == "random":
        unet = W.random_component("unet", cfg.unet, seed, dtype=dtype)
        vae = W.random_component("vae", cfg.vae, seed + 1, dtype=dtype)
        if context is None:
            context = empty_prompt_embedding(W.random_component("text_encoder", cfg.text, seed + 2), cfg.pad)
        return StableDiffusion(name, cfg, unet, vae, context, cfg.schedule)
    root = resolve(source)
    _check_schedule(root, cfg.schedule)
    folder = os.path.join(root, "text_encoder")
    if context is None and not os.path.isdir(folder):
        raise InputError(root, "has no text_encoder/ folder",
                         "add it (diffusers layout), or pass a saved empty-prompt embedding (.npy)")
    for part, expected in [("unet", cfg.unet), ("vae", cfg.vae)] + ([("text_encoder", cfg.text)] if context is None
                                                                     else []):
        W.component_config(os.path.join(root, part), part, expected)  # every config.json before any weights
    unet = W.load_unet(os.path.join(root, "unet"), cfg.unet, dtype=dtype)
    vae = W.load_vae(os.path.join(root, "vae"), cfg.vae, dtype=dtype)
    if context is None:
        context = empty_prompt_embedding(W.load_text_encoder(folder, cfg.text), cfg.pad)
    return StableDiffusion(name, cfg, unet, vae, context, cfg.schedule)


def _check_schedule(root: str, schedule: DDPMSchedule) -> None:
    """With a scheduler/scheduler_config.json present, refuse a different β schedule than the one assumed."""
    file = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(file):
        return
    fix = "fix or re-download the checkpoint's scheduler/scheduler_config.json"
    d = read_json(file, fix)
    check_fields(d, dict(beta_start="num", beta_end="num", num_train_timesteps="pos", beta_schedule="str"), file, fix)
    theirs = (d.get("beta_start", 0.0001), d.get("beta_end", 0.02), d.get("num_train_timesteps", 1000),
              d.get("beta_schedule", "linear"))
    ours = (schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps, schedule.beta_schedule)
    if not (np.allclose(theirs[:2], ours[:2]) and tuple(theirs[2:]) == ours[2:]):
        raise InputError(file, f"describes the noise schedule {theirs}, not {ours}",
                         "use a Stable Diffusion 1.x/2.x checkpoint")


def save_empty_prompt_embedding(name: str, weights: str | None, path: str, *, seed: int = 0) -> np.ndarray:
    """Compute the empty-prompt embedding once (reads only text_encoder/) and save it as .npy, `[1, 77, Cc]`, for
    `load_sd(..., text_embedding=path)`. weights as in `load_sd` ("random": the text encoder `load_sd` would draw
    from `seed`)."""
    from spectral_jax.files import write_atomic
    from spectral_jax.models import sd_weights as W

    spec = get_sd_spec(name)
    cfg = spec.config
    source = weights if weights is not None else spec.repo_id
    if source is None:
        raise InputError(f"model {name!r}", "has no published weights", "pass weights='random'")
    if source == "random":
        encoder = W.random_component("text_encoder", cfg.text, seed + 2)
    else:
        encoder = W.load_text_encoder(os.path.join(resolve(source), "text_encoder"), cfg.text)
    arr = np.asarray(empty_prompt_embedding(encoder, cfg.pad), np.float32)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save appends nothing to the name
            np.save(f, arr)

    write_atomic(path, write)
    return arr
