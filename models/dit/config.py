"""Diffusion-transformer architectures as frozen dataclasses, the named presets and the DiT registry entries — no
JAX here, so reading the registry is instant.

Names:
    pixart_sigma      PixArt-Σ XL/2 at 1024² (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS): 28 blocks, 16 heads × 72
    pixart_sigma_512  the same architecture trained at 512² (PixArt-alpha/PixArt-Sigma-XL-2-512-MS)
    pixart_tiny       a small random PixArt (4 blocks) for tests and benchmarks only
PixArt-Σ reads latents of the SDXL VAE (the SD VAE architecture, scaling factor 0.13025; the 512-MS repository holds
only transformer/, so the VAE comes from `DiTConfig.vae_repo_id` when the weights' folder has no vae/), and was
trained with the DDPM linear β schedule 0.0001 → 0.02 over 1000 steps.

Preprocessing: RGB in [−1, 1] ((x/255 − 0.5)/0.5); sides multiples of 16 (VAE downscale 8 × patch 2); the default
size is the training resolution (1024, 512; 256 for pixart_tiny).

Text conditioning (`text_embedding` option): by default a single all-zero caption token `[1, 1, caption_channels]`.
With zero captions every caption token is the same vector, so cross-attention returns that vector's value whatever
the caption length: zeros of length 1 are exactly zeros of length 300. What a user gets is the image stream
conditioned on a constant, caption-free context (not the T5 embedding of ""). For the pipeline's own unconditional
input, save the T5 encoder's output for "" — only its unmasked tokens, `[M, 4096]` (.npy) — and pass it with
`--text-embedding`: dropping masked tokens is what the pipeline's attention mask does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from spectral_jax.models.sd.config import SD_MEAN, SD_STD, VAEConfig
from spectral_jax.models.sd.scheduler import DDPMSchedule
from spectral_jax.models.spec import Family, ModelSpec, PreprocessSpec


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
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
        if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
            raise ValueError(f"cross_attention_dim {self.cross_attention_dim} must equal the width "
                             f"{self.inner_dim} (the caption is projected to it)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def context_dim(self) -> int:
        """Width of the text input (T5 features, or the cross-attention width without a caption projection)."""
        return self.caption_channels if self.caption_channels is not None else self.cross_attention_dim

    @property
    def pos_scale(self) -> float:
        return float(self.interpolation_scale if self.interpolation_scale is not None
                     else max(self.sample_size // 64, 1))

    def attn_layers(self) -> list[tuple[str, int, int]]:
        """Every tapped self-attention layer: (where, heads, head dim)."""
        return [(f"transformer_blocks.{i}", self.num_attention_heads, self.attention_head_dim)
                for i in range(self.num_layers)]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """One diffusion-transformer model: its `transformer` (a `PixArtConfig`), its VAE encoder, its noise schedule, and
    where its VAE is published when a transformer-only checkpoint lacks vae/ (None: it must be there)."""

    transformer: Any
    vae: VAEConfig
    schedule: Any
    vae_repo_id: str | None = None

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

# The family as the registry sees it: `dit.load_backbone(spec, weights, dtype=, seed=, timesteps=, latent=,
# text_embedding=)`; its taps carry no hidden states.
FAMILY = Family("dit", "diffusion transformer", ("dtype", "seed", "timesteps", "latent", "text_embedding"),
                hidden=False)


def _prep(size: int, cfg: DiTConfig) -> PreprocessSpec:
    return PreprocessSpec(size, cfg.patch_size, SD_MEAN, SD_STD)


# Registry entries: name → architecture, published weights (None: none), preprocessing.
DIT_MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("pixart_sigma", PIXART_SIGMA, "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", _prep(1024, PIXART_SIGMA),
              FAMILY.name),
    ModelSpec("pixart_sigma_512", PIXART_SIGMA_512, "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
              _prep(512, PIXART_SIGMA_512), FAMILY.name),
    ModelSpec("pixart_tiny", PIXART_TINY, None, _prep(256, PIXART_TINY), FAMILY.name),
]}
