"""The diffusion transformer the taps need — transformer, VAE encoder, caption embedding, noise schedule — and
`load_dit(name, weights)`.

    m = load_dit("pixart_sigma")                 # HF cache (or download when online), diffusers layout
    m = load_dit("pixart_tiny", "random")        # tiny random model (tests, benchmarks)
    m.transformer, m.vae, m.context, m.schedule  # PixArt transformer, SD VAE encoder, caption [1, M, Ct], DDPM
    m = load_dit("sd3_tiny", "random")           # SD3 MM-DiT; context = (text tokens [1, M, Cj], pooled [1, Cp]),
                                                 # schedule a FlowSchedule
Text conditioning (see `config.py`): all zeros of the documented shape unless a saved embedding is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import zipfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spectral_jax.errors import InputError
from spectral_jax.io import open_regular
from spectral_jax.models import hub
from spectral_jax.models.convert import assemble
from spectral_jax.models.dit import params as P
from spectral_jax.models.dit.config import DIT_MODELS, DiTConfig
from spectral_jax.models.dit.flow import FlowSchedule
from spectral_jax.models.registry import get_spec
from spectral_jax.models.sd import params as SDW
from spectral_jax.models.sd.modeling import check_schedule, read_npy
from spectral_jax.models.spec import ModelSpec

MAX_CAPTION_TOKENS = 4096


@dataclasses.dataclass
class DiffusionTransformer:
    """What the attention taps need: the transformer, the VAE encoder, the caption embedding, the noise schedule."""

    name: str
    cfg: DiTConfig
    transformer: Any
    vae: Any
    context: Any                  # PixArt: [1, M, Ct]; SD3: ([1, M, Cj], [1, Cp])
    schedule: Any

    def latents(self, images, *, latent: str = "mean", seed: int = 0) -> jax.Array:
        """The transformer's input latents `[B, h, w, Z]`: scaling · (z − shift), z the VAE posterior mean or a
        sample from `seed` (`models.sd.diffusion.encode_images`)."""
        from spectral_jax.models.sd.diffusion import encode_images

        z = encode_images(self, images, latent=latent, seed=seed)
        shift = self.cfg.vae.scaling_factor * self.cfg.vae_shift
        return z - shift if shift else z


def get_dit_spec(name: str) -> ModelSpec:
    """`registry.get_spec(name)` (test models only while enabled), refused unless a diffusion-transformer model."""
    spec = get_spec(name)
    if spec.family != "dit":
        raise InputError(f"model {name!r}", "not a diffusion-transformer model", f"choose one of: {', '.join(DIT_MODELS)}")
    return spec


# ---------------------------------------------------------------------------------------------------------------
# Where the weights are
# ---------------------------------------------------------------------------------------------------------------

def _has(part: str):
    return lambda d: bool(glob.glob(os.path.join(d, part, "*.safetensors")))


def _resolve(source: str, part: str) -> str:
    """A local diffusers-layout directory holding `part`/ for `source` (a directory, or a repo id via the HF cache
    or a download of `part`/, vae/ and scheduler/)."""
    files = [f"{d}/{f}" for d in dict.fromkeys((part, "vae")) for f in ("config.json", "*.safetensors",
                                                                      "*.safetensors.index.json")]
    how = (f"fetch it once while online: `hf download {source} --include '{part}/*' 'vae/*' 'scheduler/*'` (fills "
           f"the HF cache), or pass --weights DIR holding {part}/ in diffusers layout")
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

def _pooled_dim(cfg: DiTConfig) -> int | None:
    return getattr(cfg.transformer, "pooled_projection_dim", None)


def unconditional_context(cfg: DiTConfig):
    """All zeros: text tokens `[1, text_tokens, Cj]` (and pooled `[1, Cp]` for SD3) — see `config.py`."""
    tokens = jnp.zeros((1, cfg.text_tokens, cfg.transformer.context_dim), jnp.float32)
    pooled = _pooled_dim(cfg)
    return tokens if pooled is None else (tokens, jnp.zeros((1, pooled), jnp.float32))


def _checked(arr, shape_ok: bool, want: str, path: str, fix: str) -> jax.Array:
    """A memory-mapped array checked (shape, floating dtype, finite) and read as float32."""
    if not shape_ok:
        raise InputError(path, f"has shape {arr.shape}, the transformer needs {want}", fix)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(path, f"has dtype {arr.dtype}, not floating point", fix)
    arr = np.array(arr, np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(path, "contains NaN or Inf", fix)
    return jnp.asarray(arr)


def load_text_embedding(path: str, cfg: DiTConfig):
    """A saved text embedding: PixArt a .npy `[M, Ct]` or `[1, M, Ct]` (the text encoder's unmasked tokens) →
    `[1, M, Ct]`; SD3/FLUX an .npz with `context` `[M, Cj]` (or `[1, M, Cj]`) and `pooled` `[Cp]` (or `[1, Cp]`) →
    (context, pooled). 1 ≤ M ≤ 4096, float. Shapes are checked from the headers before any data is read; a file
    that is not a regular file, not the expected kind (.npy / .npz), holds pickles or object arrays, or is damaged
    (a member with a header and no data, a corrupt deflate stream) is one `InputError` naming the file and the
    expected arrays."""
    width, pooled = cfg.transformer.context_dim, _pooled_dim(cfg)
    tokens = lambda a: a[None] if a.ndim == 2 else a
    ok = lambda a: a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == width and 1 <= a.shape[1] <= MAX_CAPTION_TOKENS
    want = f"[1, M, {width}] with 1 ≤ M ≤ {MAX_CAPTION_TOKENS}"
    if pooled is None:
        fix = f"save the text encoder's output for the prompt (its unmasked tokens) as a [M, {width}] float .npy"
        arr = tokens(read_npy(path, f"a float .npy [M, {width}], 1 ≤ M ≤ {MAX_CAPTION_TOKENS}", fix))
        return _checked(arr, ok(arr), want, path, fix)
    fix = f"save the pipeline's prompt_embeds [M, {width}] and pooled_prompt_embeds [{pooled}] as an .npz with keys " \
          "context and pooled"
    expected = f"an .npz with float context [M, {width}] (1 ≤ M ≤ {MAX_CAPTION_TOKENS}) and pooled [{pooled}]"
    shapes = _npz_shapes(path, expected, fix)         # from the headers: nothing is read before the shapes pass
    if set(shapes) != {"context", "pooled"}:
        raise InputError(path, f"holds {sorted(shapes)}, not exactly context and pooled", fix)
    sc, sp = shapes["context"], shapes["pooled"]
    c3 = (1,) * (3 - len(sc)) + sc if len(sc) in (2, 3) else sc
    p2 = (1,) * (2 - len(sp)) + sp if len(sp) in (1, 2) else sp
    if not (len(c3) == 3 and c3[0] == 1 and c3[2] == width and 1 <= c3[1] <= MAX_CAPTION_TOKENS):
        raise InputError(path, f"has context of shape {sc}, the transformer needs {want}", fix)
    if p2 != (1, pooled):
        raise InputError(path, f"has pooled of shape {sp}, the transformer needs [1, {pooled}]", fix)
    with _unreadable(path, ".npz", expected, fix), np.load(path, allow_pickle=False) as f:
        arr, pool = f["context"].reshape(c3), f["pooled"].reshape(p2)
    return _checked(arr, True, want, path, fix), _checked(pool, True, f"[1, {pooled}]", path, fix)


@contextlib.contextmanager
def _unreadable(path: str, kind: str, expected: str, fix: str):
    """Any error reading the archive `path` (a bad zip, a corrupt deflate stream, a member cut short) → one
    `InputError` naming it and what is expected."""
    try:
        yield
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, InputError):
            raise
        why = "corrupt deflate data" if isinstance(e, zlib.error) else type(e).__name__
        raise InputError(path, f"not a readable {kind} file ({why}); expected {expected}", fix) from None


def _npz_shapes(path: str, expected: str, fix: str) -> dict[str, tuple[int, ...]]:
    """{array name: shape} of an .npz, read from the member headers only, once `acts`' header checks passed (every
    member a .npy array, none of objects, each declaring exactly the bytes it holds, so the read that follows
    allocates no more than the file holds). A FIFO or a device is refused without being read, a .npy file as
    not an .npz."""
    from spectral_jax.acts import check_npz_headers

    with open_regular(path, ".npz file", fix) as f:
        if f.read(6) == b"\x93NUMPY":
            raise InputError(path, f"is a .npy file, not an .npz archive; expected {expected}", fix)
    with _unreadable(path, ".npz", expected, fix):
        check_npz_headers(path, fix)
        with zipfile.ZipFile(path) as z:
            out = {}
            for info in z.infolist():
                with z.open(info) as m:
                    major, _ = np.lib.format.read_magic(m)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape = read(m)[0]
                out[info.filename.removesuffix(".npy")] = tuple(int(d) for d in shape)
            return out


def _load_vae(folder: str, cfg: DiTConfig, dtype):
    """The VAE encoder from `folder`; its config.json's shift_factor (SD3/FLUX) is checked against the model's here
    and the rest read by Stable Diffusion's reader."""
    from spectral_jax.models.convert import abstract_model, apply_table, read_json
    from spectral_jax.models.sd.vae import AutoencoderKL

    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        return SDW.load_vae(folder, cfg.vae, dtype=dtype)
    d = read_json(file)
    shift = d.pop("shift_factor", None) or 0.0
    if not np.isclose(shift, cfg.vae_shift):
        raise InputError(file, f"has shift_factor {shift}, the model's VAE {cfg.vae_shift}",
                         "pass the VAE that matches --model")
    theirs = SDW.vae_config_from_diffusers(d, file)
    if theirs != cfg.vae:
        raise InputError(file, f"describes a different VAE: {theirs}", "pass the VAE that matches --model")
    tensors = SDW.read_component(folder, SDW.COMPONENTS["vae"])
    params = apply_table(SDW.VAE_TABLE, abstract_model(AutoencoderKL, cfg.vae)[2], tensors, folder,
                         "pass the vae folder of the model's checkpoint in diffusers layout")
    return assemble(AutoencoderKL, cfg.vae, params, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def load_dit(name: str, weights: str | None = None, *, text_embedding: str | None = None, dtype=jnp.float32,
             seed: int = 0) -> DiffusionTransformer:
    """Build diffusion-transformer `name` with its weights.

    weights: a diffusers-layout directory (transformer/, and vae/ unless the model's VAE repository is in the HF
    cache), an HF repo id (HF cache; downloaded only when online), None → the registry's repo id, or "random"
    (seeded: transformer from `seed`, VAE from seed + 1). text_embedding: a saved text embedding
    (`load_text_embedding`), checked before any weight is read; None → zeros (`unconditional_context`). Missing weights offline → `InputError` naming the
    download command.
    """
    spec = get_dit_spec(name)
    cfg: DiTConfig = spec.config
    source = weights if weights is not None else spec.repo_id
    if source is None:
        raise InputError(f"model {name!r}", "has no published weights", "pass --weights random")
    context = load_text_embedding(text_embedding, cfg) if text_embedding else unconditional_context(cfg)
    if source == "random":
        transformer = P.random_transformer(cfg.transformer, seed, dtype=dtype)
        vae = SDW.random_component("vae", cfg.vae, seed + 1, dtype=dtype)
        return DiffusionTransformer(name, cfg, transformer, vae, context, cfg.schedule)
    root = _resolve(source, "transformer")
    _check_flow(root, cfg.schedule) if isinstance(cfg.schedule, FlowSchedule) else check_schedule(root, cfg.schedule)
    vae_root = root if os.path.isdir(os.path.join(root, "vae")) or cfg.vae_repo_id is None else \
        _resolve(cfg.vae_repo_id, "vae")
    folder = os.path.join(vae_root, "vae")
    P.transformer_config(os.path.join(root, "transformer"), cfg.transformer)   # checked before any weights
    transformer = P.load_transformer(os.path.join(root, "transformer"), cfg.transformer, dtype=dtype)
    vae = _load_vae(folder, cfg, dtype)
    return DiffusionTransformer(name, cfg, transformer, vae, context, cfg.schedule)


def _check_flow(root: str, schedule: FlowSchedule) -> None:
    """With a scheduler/scheduler_config.json present, refuse another flow schedule than the one assumed (shift,
    steps, static shifting)."""
    from spectral_jax.models.convert import check_fields, read_json

    file = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(file):
        return
    fix = "fix or re-download the checkpoint's scheduler/scheduler_config.json"
    d = read_json(file, fix)
    check_fields(d, dict(shift="pos_num", num_train_timesteps="pos", use_dynamic_shifting="bool",
                         base_shift="num", max_shift="num", base_image_seq_len="pos", max_image_seq_len="pos"),
                 file, fix)
    dynamic = d.get("use_dynamic_shifting", False)
    theirs = (d.get("num_train_timesteps", 1000), dynamic) + (
        (d.get("base_shift", 0.5), d.get("max_shift", 1.15), d.get("base_image_seq_len", 256),
         d.get("max_image_seq_len", 4096)) if dynamic else (d.get("shift", 1.0),))
    ours = (schedule.num_train_timesteps, schedule.dynamic) + (
        (schedule.base_shift, schedule.max_shift, schedule.base_seq_len, schedule.max_seq_len) if schedule.dynamic
        else (schedule.shift,))
    if not (theirs[:2] == ours[:2] and len(theirs) == len(ours) and np.allclose(theirs[2:], ours[2:])):
        raise InputError(file, f"describes the flow schedule (steps, dynamic, shift(s)) {theirs}, not {ours}",
                         "use the checkpoint that matches --model")
