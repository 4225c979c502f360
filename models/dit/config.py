"""Diffusion-transformer architectures as frozen dataclasses, the named presets and the DiT registry entries — no
JAX here, so reading the registry is instant.

Names:
    pixart_sigma      PixArt-Σ XL/2 at 1024² (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS): 28 blocks, 16 heads × 72
    pixart_sigma_512  the same architecture trained at 512² (PixArt-alpha/PixArt-Sigma-XL-2-512-MS)
    sd3_medium        SD3 Medium MM-DiT (stabilityai/stable-diffusion-3-medium-diffusers): 24 blocks, 24 heads × 64
    sd35_large        SD3.5 Large (stabilityai/stable-diffusion-3.5-large): 38 blocks, 38 heads × 64, RMS q/k norms
    flux1_dev         FLUX.1 [dev] (black-forest-labs/FLUX.1-dev): 19 double- + 38 single-stream blocks, 24 heads × 128,
                      guidance embedding (3.5, the pipeline's default)
    flux1_schnell     FLUX.1 [schnell] (black-forest-labs/FLUX.1-schnell): the same blocks, no guidance embedding
Test models (`TEST_MODELS`, outside the registry: `spectral_jax.models.testing`): pixart_tiny (4 PixArt blocks),
sd3_tiny (3 MM-DiT blocks), flux_tiny (2 + 2 FLUX blocks), small random architectures for tests and benchmarks.
PixArt-Σ reads latents of the SDXL VAE (the SD VAE architecture, scaling factor 0.13025; the 512-MS repository holds
only transformer/, so the VAE comes from `DiTConfig.vae_repo_id` when the weights' folder has no vae/), and was
trained with the DDPM linear β schedule 0.0001 → 0.02 over 1000 steps. SD3/SD3.5 read 16-channel latents of their
own VAE (the same encoder architecture; latent = scaling · (z − shift), 1.5305 and 0.0609) and were trained with
rectified flow, x_t = (1 − σ)·x + σ·ε (`flow.py`: σ from the integer timestep as diffusers'
FlowMatchEulerDiscreteScheduler with shift 3). FLUX: 16-channel latents (scaling 0.3611, shift 0.1159), packed 2×2
into tokens, rectified flow with the dynamic shift of its scheduler (dev; schnell: static shift 1).

Preprocessing: RGB in [−1, 1] ((x/255 − 0.5)/0.5); sides multiples of 16 (VAE downscale 8 × patch 2); the default
size is the training resolution (1024, 512; 256 for the tiny models).

Text conditioning (`text_embedding` option): by default a single all-zero caption token `[1, 1, caption_channels]`.
With zero captions every caption token is the same vector, so cross-attention returns that vector's value whatever
the caption length: zeros of length 1 are exactly zeros of length 300. What a user gets is the image stream
conditioned on a constant, caption-free context (not the T5 embedding of ""). For the pipeline's own unconditional
input, save the T5 encoder's output for "" — only its unmasked tokens, `[M, 4096]` (.npy) — and pass it with
`--text-embedding`: dropping masked tokens is what the pipeline's attention mask does.
SD3: the text tokens join the image tokens in every attention (no mask), so their number matters. The default is
zeros of the pipeline's shape, context `[1, 333, 4096]` (77 CLIP + 256 T5 tokens) and pooled `[1, 2048]` — what the
pipeline itself feeds for a prompt whose encoders are dropped (it zero-fills T5 when T5 is absent). For the
empty-prompt embedding, save `pipe.encode_prompt("", "", "")`'s prompt_embeds `[333, 4096]` and
pooled_prompt_embeds `[2048]` as an .npz with keys `context` and `pooled`, and pass it with `--text-embedding`.
FLUX: the same as SD3 with context `[1, 512, 4096]` (T5, max_sequence_length 512) and pooled `[1, 768]` (CLIP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spectral_jax.models.dit.flow import FlowSchedule
from spectral_jax.models.sd.config import SD_MEAN, SD_STD, VAEConfig
from spectral_jax.models.sd.scheduler import DDPMSchedule
from spectral_jax.models.spec import LANCZOS, Family, ModelSpec, PreprocessSpec


class _Blocks:
    """What every transformer config here shares: the width, the text width, and the tapped layers — one per block
    (`num_layers`), each (where, heads, head dim); FLUX overrides the list (two kinds of blocks)."""

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def context_dim(self) -> int:
        """Width of the text tokens the transformer reads."""
        return self.joint_attention_dim

    def attn_layers(self) -> list[tuple[str, int, int]]:
        return [(f"transformer_blocks.{i}", self.num_attention_heads, self.attention_head_dim)
                for i in range(self.num_layers)]


@dataclasses.dataclass(frozen=True)
class PixArtConfig(_Blocks):
    """The `PixArtTransformer2DModel` options PixArt-Σ uses (others are refused when reading a config.json).

    Blocks: adaLN-single (one shared timestep MLP, a per-block learned shift/scale/gate table), self-attention,
    cross-attention to the projected caption, GELU(tanh) MLP (4× width). interpolation_scale None means diffusers'
    default max(sample_size // 64, 1). caption_channels None: no caption projection (the context is read as is).
    """

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8
    num_layers: int = 28
    cross_attention_dim: int = 1152
    caption_channels: int | None = 4096
    sample_size: int = 128
    patch_size: int = 2
    interpolation_scale: float | None = None
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.interpolation_scale is None:  # resolved here, so that None and its value compare equal
            object.__setattr__(self, "interpolation_scale", float(max(self.sample_size // 64, 1)))
        if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must equal the width "
                             f"{self.inner_dim} (the caption is projected to it)")


    @property
    def context_dim(self) -> int:
        """Width of the text input (T5 features, or the cross-attention width without a caption projection)."""
        return self.caption_channels if self.caption_channels is not None else self.cross_attention_dim

    @property
    def pos_scale(self) -> float:
        return float(self.interpolation_scale)



@dataclasses.dataclass(frozen=True)
class SD3Config(_Blocks):
    """The `SD3Transformer2DModel` options SD3 / SD3.5 Large use (SD3.5 Medium's dual attention is not ported).

    qk_norm: None (SD3) or "rms_norm" (SD3.5). caption_projection_dim must equal the width (heads × head dim).
    """

    num_attention_heads: int = 24
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    sample_size: int = 128
    patch_size: int = 2
    pos_embed_max_size: int = 192
    qk_norm: str | None = None

    def __post_init__(self):
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal the width "
                             f"{self.inner_dim}")
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {self.qk_norm!r}: only None and 'rms_norm' are ported")





@dataclasses.dataclass(frozen=True)
class FluxConfig(_Blocks):
    """The `FluxTransformer2DModel` options FLUX.1 uses. in_channels/out_channels: latent channels (diffusers counts
    the packed 4×: 64); patch_size 2 is the pipeline's 2×2 packing (diffusers' own patch_size is 1); guidance: the
    guidance value fed to the guidance embedding (dev; unused without `guidance_embeds`)."""

    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    num_double_layers: int = 19
    num_single_layers: int = 38
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    guidance: float = 3.5
    mlp_ratio: float = 4.0
    patch_size: int = 2

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to the head dim "
                             f"{self.attention_head_dim}")



    @property
    def num_layers(self) -> int:
        """Tapped layers: the double-stream blocks, then the single-stream blocks."""
        return self.num_double_layers + self.num_single_layers

    def attn_layers(self) -> list[tuple[str, int, int]]:
        h, d = self.num_attention_heads, self.attention_head_dim
        return ([(f"transformer_blocks.{i}", h, d) for i in range(self.num_double_layers)]
                + [(f"single_transformer_blocks.{i}", h, d) for i in range(self.num_single_layers)])


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """One diffusion-transformer model: its `transformer` (a `PixArtConfig` or `SD3Config`), its VAE encoder (and the
    latent shift, subtracted before scaling), its noise schedule (`DDPMSchedule` or `FlowSchedule`), the number of
    text tokens of the default all-zero conditioning, and where its VAE is published when a transformer-only
    checkpoint lacks vae/ (None: it must be there)."""

    transformer: Any
    vae: VAEConfig
    schedule: Any
    vae_repo_id: str | None = None
    vae_shift: float = 0.0
    text_tokens: int = 1

    @property
    def num_layers(self) -> int:
        """Tapped (self-attention) layers: one per transformer block."""
        return self.transformer.num_layers

    @property
    def patch_size(self) -> int:
        """Pixels per token side: the VAE's downscale × the transformer's patch."""
        return self.vae.downscale * self.transformer.patch_size


PIXART_SCHEDULE = DDPMSchedule(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
SDXL_VAE = VAEConfig(scaling_factor=0.13025)
PIXART_VAE_REPO = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"

# Named presets.
PIXART_SIGMA = DiTConfig(PixArtConfig(), SDXL_VAE, PIXART_SCHEDULE, PIXART_VAE_REPO)
PIXART_SIGMA_512 = DiTConfig(PixArtConfig(sample_size=64), SDXL_VAE, PIXART_SCHEDULE, PIXART_VAE_REPO)
PIXART_TINY = DiTConfig(PixArtConfig(num_attention_heads=2, attention_head_dim=16, num_layers=4,
                                     cross_attention_dim=32, caption_channels=24, sample_size=32),
                        VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                  scaling_factor=0.13025), PIXART_SCHEDULE)
SD3_VAE = VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=1.5305)
SD3_MEDIUM = DiTConfig(SD3Config(), SD3_VAE, FlowSchedule(shift=3.0), vae_shift=0.0609, text_tokens=333)
SD35_LARGE = DiTConfig(SD3Config(num_attention_heads=38, num_layers=38, caption_projection_dim=2432,
                                 qk_norm="rms_norm"), SD3_VAE, FlowSchedule(shift=3.0), vae_shift=0.0609,
                       text_tokens=333)
SD3_TINY = DiTConfig(SD3Config(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                               num_layers=3, joint_attention_dim=24, caption_projection_dim=32,
                               pooled_projection_dim=20, sample_size=32, pos_embed_max_size=24, qk_norm="rms_norm"),
                     VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                               latent_channels=16, use_quant_conv=False, scaling_factor=1.5305),
                     FlowSchedule(shift=3.0), vae_shift=0.0609, text_tokens=5)
FLUX_VAE = VAEConfig(latent_channels=16, use_quant_conv=False, scaling_factor=0.3611)
FLUX_DEV = DiTConfig(FluxConfig(), FLUX_VAE, FlowSchedule(dynamic=True), vae_shift=0.1159, text_tokens=512)
FLUX_SCHNELL = DiTConfig(FluxConfig(guidance_embeds=False), FLUX_VAE, FlowSchedule(shift=1.0), vae_shift=0.1159,
                         text_tokens=256)
FLUX_TINY = DiTConfig(FluxConfig(num_attention_heads=2, attention_head_dim=16, num_double_layers=2, num_single_layers=2,
                                 joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6)),
                      VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                                latent_channels=16, use_quant_conv=False, scaling_factor=0.3611),
                      FlowSchedule(dynamic=True), vae_shift=0.1159, text_tokens=5)

# The family as the registry sees it: `dit.load_backbone(spec, weights, dtype=, seed=, timesteps=, latent=,
# text_embedding=)`; its taps carry no hidden states.
FAMILY = Family("dit", "diffusion transformer", ("dtype", "seed", "timesteps", "latent", "text_embedding"),
                hidden=False)


def _prep(size: int, cfg: DiTConfig) -> PreprocessSpec:
    """As the pipelines' `VaeImageProcessor`: PIL Lanczos resize, then 2x − 1; sides multiples of the patch."""
    return PreprocessSpec(size, cfg.patch_size, SD_MEAN, SD_STD, LANCZOS)


# Registry entries: name → architecture, published weights (None: none), preprocessing.
DIT_MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("pixart_sigma", PIXART_SIGMA, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", _prep(1024, PIXART_SIGMA),
              FAMILY.name),
    ModelSpec("pixart_sigma_512", PIXART_SIGMA_512, "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
              _prep(512, PIXART_SIGMA_512), FAMILY.name),
    ModelSpec("sd3_medium", SD3_MEDIUM, "stabilityai/stable-diffusion-3-medium-diffusers", _prep(1024, SD3_MEDIUM),
              FAMILY.name),
    ModelSpec("sd35_large", SD35_LARGE, "stabilityai/stable-diffusion-3.5-large", _prep(1024, SD35_LARGE),
              FAMILY.name),
    ModelSpec("flux1_dev", FLUX_DEV, "black-forest-labs/FLUX.1-dev", _prep(1024, FLUX_DEV), FAMILY.name),
    ModelSpec("flux1_schnell", FLUX_SCHNELL, "black-forest-labs/FLUX.1-schnell", _prep(1024, FLUX_SCHNELL),
              FAMILY.name),
]}

# The test models (random weights only; `spectral_jax.models.testing`, not in the registry's names).
TEST_MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("pixart_tiny", PIXART_TINY, None, _prep(256, PIXART_TINY), FAMILY.name),
    ModelSpec("sd3_tiny", SD3_TINY, None, _prep(256, SD3_TINY), FAMILY.name),
    ModelSpec("flux_tiny", FLUX_TINY, None, _prep(256, FLUX_TINY), FAMILY.name),
]}
