"""The diffusion transformer the taps need — transformer, VAE encoder, caption embedding, noise schedule — and
`load_dit(name, weights)`.

    m = load_dit("pixart_sigma")                 # HF cache (or download when online), diffusers layout
    m = load_dit("pixart_tiny", "random")        # tiny random model (tests, benchmarks)
    m.transformer, m.vae, m.context, m.schedule  # PixArt transformer, SD VAE encoder, caption [1, M, Ct], DDPM

Text conditioning (see `config.py`): `context` is one all-zero caption token unless a saved embedding is given.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.models import hub
from spectral_jax.models.convert import random_params, assemble
from spectral_jax.models.dit import params as P
from spectral_jax.models.dit.config import DIT_MODELS, DiTConfig
from spectral_jax.models.sd import params as SDW
from spectral_jax.models.sd.modeling import _check_schedule
from spectral_jax.models.spec import ModelSpec

MAX_CAPTION_TOKENS = 4096


@dataclasses.dataclass
class DiffusionTransformer:
    """What the attention taps need: the transformer, the VAE encoder, the caption embedding, the noise schedule."""

    name: str
    cfg: DiTConfig
    transformer: Any
    vae: Any
    context: jax.Array            # [1, M, Ct]
    schedule: Any


def get_dit_spec(name: str) -> ModelSpec:
    if name not in DIT_MODELS:
        raise InputError(f"model {name!r}", "not a diffusion-transformer model", f"choose one of: {', '.join(DIT_MODELS)}")
    return DIT_MODELS[name]


# ---------------------------------------------------------------------------------------------------------------
# Where the weights are
# ---------------------------------------------------------------------------------------------------------------

def _has(part: str):
    return lambda d: bool(glob.glob(os.path.join(d, part, "*.safetensors")))


def _resolve(source: str, part: str) -> str:
    """A local diffusers-layout directory holding `part`/ for `source` (a directory, or a repo id via the HF cache
    or a download)."""
    files = [f"{part}/config.json", f"{part}/*.safetensors", f"{part}/*.safetensors.index.json"]
    how = (f"fetch it once while online: `hf download {source} --include '{part}/*'` (fills the HF cache), or pass "
           f"--weights DIR holding {part}/ in diffusers layout")
    path = hub.resolve(source, local=os.path.isdir, local_words="directory",
                       fix=f"pass a diffusers-layout checkpoint directory holding {part}/, a repo id, or 'random'",
                       patterns=[*files, "scheduler/*.json"], holds=_has(part), how_to_get=how,
                       lacking=(f"the repository has no {part}/*.safetensors", "choose a diffusers-layout repository"))
    if not os.path.isdir(os.path.join(path, part)):
        raise InputError(path, f"has no {part}/ subfolder", f"pass a checkpoint directory holding {part}/ (diffusers "
                         "layout)")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Text conditioning
# ---------------------------------------------------------------------------------------------------------------

def unconditional_context(cfg: DiTConfig) -> jax.Array:
    """One all-zero caption token `[1, 1, Ct]` (equivalent to zeros of any length: see `config.py`)."""
    return jnp.zeros((1, 1, cfg.transformer.context_dim), jnp.float32)


def load_text_embedding(path: str, cfg: DiTConfig) -> jax.Array:
    """A saved caption embedding (.npy, `[M, Ct]` or `[1, M, Ct]`, 1 ≤ M ≤ 4096: the text encoder's unmasked tokens)
    as float32 `[1, M, Ct]`; shape and dtype are checked from the header before any data is read."""
    width = cfg.transformer.context_dim
    fix = f"save the text encoder's output for the prompt (its unmasked tokens) as a [M, {width}] float .npy"
    try:  # memory-mapped: a header declaring more data than the file holds fails here instead of allocating
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(path, f"not a readable .npy file ({type(e).__name__})", fix) from None
    arr = arr[None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[2] != width or not 1 <= arr.shape[1] <= MAX_CAPTION_TOKENS:
        raise InputError(path, f"has shape {arr.shape}, the transformer needs [1, M, {width}] with 1 ≤ M ≤ "
                         f"{MAX_CAPTION_TOKENS}", fix)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(path, f"has dtype {arr.dtype}, not floating point", fix)
    arr = np.array(arr, np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(path, "contains NaN or Inf", fix)
    return jnp.asarray(arr)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def load_dit(name: str, weights: str | None = None, *, text_embedding: str | None = None, dtype=jnp.float32,
             seed: int = 0) -> DiffusionTransformer:
    """Build diffusion-transformer `name` with its weights.

    weights: a diffusers-layout directory (transformer/, and vae/ unless the model's VAE repository is in the HF
    cache), an HF repo id (HF cache; downloaded only when online), None → the registry's repo id, or "random"
    (seeded: transformer from `seed`, VAE from seed + 1). text_embedding: a saved caption embedding (.npy), checked
    before any weight is read; None → one zero caption token. Missing weights offline → `InputError` naming the
    download command.
    """
    spec = get_dit_spec(name)
    cfg: DiTConfig = spec.config
    source = weights if weights is not None else spec.repo_id
    if source is None:
        raise InputError(f"model {name!r}", "has no published weights", "pass --weights random")
    context = load_text_embedding(text_embedding, cfg) if text_embedding else unconditional_context(cfg)
    if source == "random":
        transformer = assemble(P.TRANSFORMER.cls, cfg.transformer,
                               random_params(P.TRANSFORMER.cls, cfg.transformer, seed), dtype)
        vae = SDW.random_component("vae", cfg.vae, seed + 1, dtype=dtype)
        return DiffusionTransformer(name, cfg, transformer, vae, context, cfg.schedule)
    root = _resolve(source, "transformer")
    _check_schedule(root, cfg.schedule)
    vae_root = root if os.path.isdir(os.path.join(root, "vae")) or cfg.vae_repo_id is None else \
        _resolve(cfg.vae_repo_id, "vae")
    folder = os.path.join(vae_root, "vae")
    P.transformer_config(os.path.join(root, "transformer"), cfg.transformer)   # both configs before any weights
    SDW.component_config(folder, "vae", cfg.vae)
    transformer = P.load_transformer(os.path.join(root, "transformer"), cfg.transformer, dtype=dtype)
    vae = SDW.load_vae(folder, cfg.vae, dtype=dtype)
    return DiffusionTransformer(name, cfg, transformer, vae, context, cfg.schedule)
