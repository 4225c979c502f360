"""The Stable Diffusion model the taps need — UNet, VAE encoder, empty-prompt text embedding, DDPM schedule — and
`load_sd(name, weights)`.

    sd = load_sd("sd15")                          # HF cache (or download when online), diffusers layout
    sd = load_sd("sd_tiny", "random")             # tiny random model (tests, benchmarks)
    sd.unet, sd.vae, sd.context, sd.schedule      # UNet, VAE encoder, empty-prompt embedding [1, 77, Cc], DDPM

Architectures, presets and the registry entries (sd14, sd15, sd21_base, sd_tiny): `config.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spectral_jax.errors import InputError
from spectral_jax.models import hub
from spectral_jax.models.convert import check_fields, read_json
from spectral_jax.models.registry import get_spec
from spectral_jax.models.sd import params as W
from spectral_jax.models.sd.clip_text import CLIPTextModel, empty_prompt_ids
from spectral_jax.models.sd.config import SD_MODELS, SDConfig
from spectral_jax.models.sd.scheduler import DDPMSchedule
from spectral_jax.models.sd.unet import UNet2DConditionModel
from spectral_jax.models.sd.vae import AutoencoderKL
from spectral_jax.models.spec import ModelSpec


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

_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
          "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors")


def how_to_get(repo_id: str) -> str:
    return (f"fetch it once while online: `hf download {repo_id} {' '.join(_FILES)}` (fills the HF cache; "
            f"older clients: huggingface-cli download), or pass --weights DIR holding unet/, vae/ and text_encoder/ "
            f"in diffusers layout")


def _has_unet(d: str) -> bool:
    return bool(glob.glob(os.path.join(d, "unet", "*.safetensors")))


def resolve(source: str) -> str:
    """A local diffusers-layout directory for `source` (a directory, or an HF repo id via cache or download)."""
    path = hub.resolve(source, local=os.path.isdir, local_words="directory",
                       fix="pass a diffusers-layout checkpoint directory, a repo id like "
                           "stabilityai/stable-diffusion-2-1-base, or 'random'",
                       patterns=[*_FILES, "tokenizer/*.json"], holds=_has_unet, how_to_get=how_to_get(source),
                       lacking=("the repository has no unet/*.safetensors", "choose a diffusers-layout SD repository"))
    if not os.path.isdir(os.path.join(path, "unet")) or not os.path.isdir(os.path.join(path, "vae")):
        raise InputError(path, "has no unet/ and vae/ subfolders",
                         "pass a Stable Diffusion checkpoint directory in diffusers layout")
    return path


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


def read_npy(path: str, want: str, fix: str) -> np.ndarray:
    """The array of the .npy file `path`, memory-mapped (nothing read yet: a header declaring more data than the file
    holds, or no data at all, fails here instead of allocating). Not a regular file, missing, a pickle or an object
    array, a damaged header, an .npz archive → one `InputError` naming `path`, the expected array `want` (e.g.
    "a float .npy [77, 768]") and `fix`. Shape and dtype are the caller's to check."""
    from spectral_jax.io import open_regular

    open_regular(path, ".npy file", f"{fix} (expected: {want})").close()   # a FIFO or a device is never read
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        why = " ".join(str(e).split())                        # numpy's message, on one line
        raise InputError(path, f"not a readable .npy file ({type(e).__name__}: {why}); expected {want}", fix) from None
    if not isinstance(arr, np.ndarray):                       # an .npz archive: np.load gave its NpzFile
        arr.close()
        raise InputError(path, f"is an .npz archive, not a .npy file; expected {want}", fix)
    return arr


def load_text_embedding(path: str, cfg: SDConfig) -> jax.Array:
    """A saved embedding (.npy, float `[77, Cc]` or `[1, 77, Cc]`, e.g. written by `save_empty_prompt_embedding`)
    → float32 `[1, 77, Cc]`. Read memory-mapped, its shape and dtype checked before the data (`read_npy`)."""
    want = (1, cfg.text.max_position_embeddings, cfg.unet.cross_attention_dim)
    expected = f"a float .npy [{want[1]}, {want[2]}] (or [1, {want[1]}, {want[2]}])"
    fix = "save it with spectral_jax.models.sd.save_empty_prompt_embedding(name, weights, path)"
    arr = read_npy(path, expected, fix)
    arr = arr[None] if arr.ndim == 2 else arr
    if arr.shape != want:
        raise InputError(path, f"has shape {arr.shape}, the UNet needs {want}", fix)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(path, f"has dtype {arr.dtype}, not floating point (expected {expected})", fix)
    arr = np.array(arr, np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(path, "contains NaN or Inf", fix)
    return jnp.asarray(arr, jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def get_sd_spec(name: str) -> ModelSpec:
    """`registry.get_spec(name)` (test models only while enabled), refused unless a Stable Diffusion model."""
    spec = get_spec(name)
    if spec.family != "sd":
        raise InputError(f"model {name!r}", "not a Stable Diffusion model", f"choose one of: {', '.join(SD_MODELS)}")
    return spec


def load_sd(name: str, weights: str | None = None, *, text_embedding: str | None = None, dtype=jnp.float32,
            seed: int = 0, attn_chunk: int | None = None) -> StableDiffusion:
    """Build SD model `name` with its weights.

    weights: a diffusers-layout directory (unet/, vae/, text_encoder/), an HF repo id (HF cache; downloaded only
    when online), None → the registry's repo id, or "random" (seeded; any name, e.g. sd_tiny for tests).
    text_embedding: a saved empty-prompt embedding (.npy) — then text_encoder/ is not read.
    attn_chunk: compute attention in blocks of this many query rows (bounds memory at 64² latents).
    Missing weights offline → `InputError` naming the download command.
    """
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
    check_schedule(root, cfg.schedule)
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


def check_schedule(root: str, schedule: DDPMSchedule) -> None:
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
