"""SigLIP 2 vision towers as a frozen dataclass, the named presets, and the SigLIP 2 registry entries — no JAX
here, so reading the registry is instant (`spectral_jax.models.registry`).

    cfg = PRESETS["siglip2_b16"]        # SiglipConfig(variant="fixed", hidden_size=768, pos_grid=32, ...)
    spec = MODELS["siglip2_b16_naflex"] # ModelSpec: config, HF repo id, preprocessing (384, patch 16, mean/std 0.5)

Two variants, one encoder (pre-norm ViT, no CLS token, no registers, tanh-GELU MLP, `post_layernorm` on
`last_hidden_state`):
- "fixed" (FixRes): the `google/siglip2-*-patch{14,16}-{224,256,384,512}` checkpoints. They are published as
  `SiglipModel` (model_type "siglip", SigLIP v1 code), so they are ported against `SiglipVisionModel`: a
  stride-p convolution and a G×G position-embedding table, resampled for other grids by torch's bicubic
  (`interpolate_pos_encoding=True`).
- "naflex": `Siglip2VisionModel` (model_type "siglip2"): patches flattened (row, column, channel) through a
  Linear, the G×G table resampled per image by the antialiased bilinear kernel of `transformers`, and an
  attention mask over padded patch slots.

Preprocessing: mean = std = 0.5 per channel as both processors, patch 14/16. Default size (shorter side): a
FixRes model's own resolution (its trained grid, nothing resampled on square inputs); NaFlex 384 — aspect ratio
kept, 24×24 = 576 patches square, 24×32 = 768 on a 4:3 image, inside the 256–1024 patch budgets it was trained at.
Resize filter: bilinear, as `Siglip2ImageProcessor` and big_vision's `resize` (the FixRes checkpoints' training
preprocessing); transformers' `SiglipImageProcessor` class default is bicubic, which a checkpoint's
preprocessor_config.json overrides.
"""

from __future__ import annotations

import dataclasses

from spectral_jax.models.spec import BILINEAR, Family, ModelSpec, PreprocessSpec

VARIANTS = ("fixed", "naflex")
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Architecture of one SigLIP (2) vision tower.

    variant: "fixed" (`SiglipVisionModel`) | "naflex" (`Siglip2VisionModel`); pos_grid: G, the stored position
    embeddings cover a G×G patch grid (`image_size / patch_size`, or √`num_patches` for NaFlex); mlp_dim: the
    MLP's hidden width; the MLP's activation is tanh-approximated GELU ("gelu_pytorch_tanh").
    """

    variant: str
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    pos_grid: int
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix(self) -> int:
        return 0


# Widths (hidden, layers, heads, MLP) of the SigLIP 2 sizes.
_B, _L, _SO, _G = (768, 12, 12, 3072), (1024, 24, 16, 4096), (1152, 27, 16, 4304), (1536, 40, 16, 6144)

# name → (architecture, HF repo id); FixRes names end in their resolution except the default one per size.
_ENTRIES = {
    "siglip2_b16": (("fixed", *_B, 16, 32), "google/siglip2-base-patch16-512"),
    "siglip2_b16_384": (("fixed", *_B, 16, 24), "google/siglip2-base-patch16-384"),
    "siglip2_b16_256": (("fixed", *_B, 16, 16), "google/siglip2-base-patch16-256"),
    "siglip2_b16_224": (("fixed", *_B, 16, 14), "google/siglip2-base-patch16-224"),
    "siglip2_b32": (("fixed", *_B, 32, 8), "google/siglip2-base-patch32-256"),
    "siglip2_l16": (("fixed", *_L, 16, 32), "google/siglip2-large-patch16-512"),
    "siglip2_l16_384": (("fixed", *_L, 16, 24), "google/siglip2-large-patch16-384"),
    "siglip2_l16_256": (("fixed", *_L, 16, 16), "google/siglip2-large-patch16-256"),
    "siglip2_so400m14": (("fixed", *_SO, 14, 27), "google/siglip2-so400m-patch14-384"),
    "siglip2_so400m14_224": (("fixed", *_SO, 14, 16), "google/siglip2-so400m-patch14-224"),
    "siglip2_so400m16": (("fixed", *_SO, 16, 32), "google/siglip2-so400m-patch16-512"),
    "siglip2_so400m16_384": (("fixed", *_SO, 16, 24), "google/siglip2-so400m-patch16-384"),
    "siglip2_so400m16_256": (("fixed", *_SO, 16, 16), "google/siglip2-so400m-patch16-256"),
    "siglip2_g16": (("fixed", *_G, 16, 24), "google/siglip2-giant-opt-patch16-384"),
    "siglip2_g16_256": (("fixed", *_G, 16, 16), "google/siglip2-giant-opt-patch16-256"),
    "siglip2_b16_naflex": (("naflex", *_B, 16, 16), "google/siglip2-base-patch16-naflex"),
    "siglip2_so400m16_naflex": (("naflex", *_SO, 16, 16), "google/siglip2-so400m-patch16-naflex"),
}

# Named presets: the architectures of the checkpoints in `MODELS` below.
PRESETS: dict[str, SiglipConfig] = {name: SiglipConfig(*arch) for name, (arch, _) in _ENTRIES.items()}

# The family as the registry sees it: `siglip2.load_backbone(spec, weights, dtype=, seed=)`.
FAMILY = Family("siglip2", "SigLIP 2", ("dtype", "seed"), hidden=True)

NAFLEX_SIZE = 384


def default_size(cfg: SiglipConfig) -> int:
    """The default shorter side: the FixRes resolution (G·p), or 384 for NaFlex (see the module docstring)."""
    return NAFLEX_SIZE if cfg.variant == "naflex" else cfg.pos_grid * cfg.patch_size


# Registry entries: name → architecture, published weights, preprocessing.
MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name, PRESETS[name], repo,
                    PreprocessSpec(default_size(PRESETS[name]), PRESETS[name].patch_size, SIGLIP_MEAN, SIGLIP_STD,
                                   BILINEAR),
                    FAMILY.name)
    for name, (_, repo) in _ENTRIES.items()}
