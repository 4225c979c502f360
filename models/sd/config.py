"""Stable Diffusion architectures as frozen dataclasses (UNet, VAE encoder, CLIP text encoder, DDPM schedule), the
named presets and the SD registry entries — no JAX here, so reading the registry is instant.

Names: sd14 (CompVis/stable-diffusion-v1-4), sd15 (runwayml/stable-diffusion-v1-5; since the original repository
was withdrawn, the same files are mirrored as stable-diffusion-v1-5/stable-diffusion-v1-5 — pass that id or a
local directory with --weights) and sd21_base (stabilityai/stable-diffusion-2-1-base). `TINY` (SD 1.x's layout at toy
width — 16 self-attention layers on 4 grids) is the test model sd_tiny, in `TEST_MODELS`, outside the registry
(`spectral_jax.models.testing`).

Preprocessing: RGB in [−1, 1] ((x/255 − 0.5)/0.5); the default size is 512 (SD's training resolution; the
official code resizes to 512²); sides must be multiples of 8 (the VAE's downscale).
"""

from __future__ import annotations

import dataclasses

from spectral_jax.models.sd.scheduler import DDPMSchedule
from spectral_jax.models.spec import LANCZOS, Family, ModelSpec, PreprocessSpec

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The `UNet2DConditionModel` options SD 1.x/2.x use (others are refused when reading a config.json).

    num_attention_heads: heads per down block (what diffusers' `attention_head_dim` means in these configs);
    the mid block uses the last, the up blocks the reversed list. attn_chunk: compute attention in blocks of
    this many query rows (memory, not math; None = all at once).
    """

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    transformer_layers_per_block: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    attn_chunk: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == len(self.num_attention_heads) == n):
            raise ValueError("block_out_channels, down/up_block_types and num_attention_heads must have one entry "
                             "per resolution level")
        bad = [t for t in self.down_block_types if t not in DOWN_TYPES] + \
              [t for t in self.up_block_types if t not in UP_TYPES]
        if bad:
            raise ValueError(f"unsupported block types {bad}: use {DOWN_TYPES} / {UP_TYPES}")
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            if c % h:
                raise ValueError(f"{c} channels are not divisible into {h} heads")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    def attn_layers(self) -> list[tuple[str, int, int]]:
        """Every self-attention layer in network order: (where, heads, head dim), e.g. ("down_blocks.0", 8, 40)."""
        out, t = [], self.transformer_layers_per_block
        for i, kind in enumerate(self.down_block_types):
            if kind.startswith("CrossAttn"):
                c, h = self.block_out_channels[i], self.num_attention_heads[i]
                out += [(f"down_blocks.{i}", h, c // h)] * (self.layers_per_block * t)
        c, h = self.block_out_channels[-1], self.num_attention_heads[-1]
        out += [("mid_block", h, c // h)] * t
        rev_c, rev_h = self.block_out_channels[::-1], self.num_attention_heads[::-1]
        for i, kind in enumerate(self.up_block_types):
            if kind.startswith("CrossAttn"):
                out += [(f"up_blocks.{i}", rev_h[i], rev_c[i] // rev_h[i])] * ((self.layers_per_block + 1) * t)
        return out

    @property
    def num_layers(self) -> int:
        """Number of tapped (self-attention) layers."""
        return len(self.attn_layers())

    @property
    def downscale(self) -> int:
        """Latent sides that are multiples of this need no size-matching in the up path (2^(levels−1))."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    in_channels: int = 3
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")


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


# Named presets.
SD1 = SDConfig(UNetConfig(), VAEConfig(), CLIPTextConfig(), "eos")
SD2 = SDConfig(UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                          use_linear_projection=True),
               VAEConfig(),
               CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                              hidden_act="gelu"), "zero")
TINY = SDConfig(UNetConfig(block_out_channels=(32, 64, 64, 64), num_attention_heads=(2, 2, 2, 2),
                           cross_attention_dim=32, norm_num_groups=8),
                VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
                CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2), "eos")

# The family as the registry sees it: `sd.load_backbone(spec, weights, dtype=, seed=, timesteps=, latent=,
# text_embedding=, attn_chunk=)`; its taps carry no hidden states.
FAMILY = Family("sd", "Stable Diffusion", ("dtype", "seed", "timesteps", "latent", "text_embedding", "attn_chunk"),
                hidden=False)

SD_MEAN, SD_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# diffusers' `VaeImageProcessor`: PIL Lanczos resize, then 2x − 1 (= (x − 0.5)/0.5).
_PREP = PreprocessSpec(512, 8, SD_MEAN, SD_STD, LANCZOS)

# Registry entries: name → architecture, published weights (None: none), preprocessing.
SD_MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("sd14", SD1, "CompVis/stable-diffusion-v1-4", _PREP, FAMILY.name),
    ModelSpec("sd15", SD1, "runwayml/stable-diffusion-v1-5", _PREP, FAMILY.name),
    ModelSpec("sd21_base", SD2, "stabilityai/stable-diffusion-2-1-base", _PREP, FAMILY.name),
]}

# The test model (random weights only; `spectral_jax.models.testing`, not in the registry's names).
TEST_MODELS: dict[str, ModelSpec] = {
    "sd_tiny": ModelSpec("sd_tiny", TINY, None, PreprocessSpec(128, 8, SD_MEAN, SD_STD, LANCZOS), FAMILY.name)}
