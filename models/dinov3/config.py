"""DINOv3 ViT architectures as a frozen dataclass, the named presets, and the DINOv3 registry entries — no JAX
here, so reading the registry is instant (`spectral_jax.models.registry`).

    cfg = PRESETS["dinov3_vitb16"]      # DINOv3Config(hidden_size=768, num_layers=12, num_heads=12, ...)
    spec = MODELS["dinov3_vitb16"]      # ModelSpec: config, HF repo id, preprocessing (512, patch 16, ImageNet)

Presets: the `transformers` `DINOv3ViTConfig` defaults (ViT-S/16: 384 wide, 12 layers, 6 heads, MLP 1536, 4
registers, RoPE θ = 100, LayerNorm ε = 1e-5, q and v biased, k not) with the sizes of the released
`facebook/dinov3-*-pretrain-lvd1689m` checkpoints (S+, H+ and 7B use a SwiGLU MLP with SiLU; their widths 1536,
5120 and 8192 are the published config.json values as other ports record them — not checked against the files
here; a checkpoint's config.json is compared with the preset at load time and a difference is refused by name).

Preprocessing: ImageNet mean/std and the bilinear (antialiased) resize of `DINOv3ViTImageProcessor`, patch 16 —
here PIL's bilinear on the 8-bit image, as DINOv3's own `make_transform` (torchvision resize before `ToDtype`);
the transformers processor resizes after rescaling to float (the same kernel; the 8-bit result is within one grey
level of it). Default size 512 (shorter side): a 32×32
patch grid, the token count of the ViT family's default (448 at patch 14) — the processor's 224 crop gives 14×14,
too coarse for segments, and RoPE needs no position-embedding resampling at any size.
"""

from __future__ import annotations

import dataclasses

from spectral_jax.models.spec import BILINEAR, IMAGENET_MEAN, IMAGENET_STD, Family, ModelSpec, PreprocessSpec

ACTS = ("gelu", "silu")


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
    """Architecture of one DINOv3 ViT (`transformers` `DINOv3ViTModel`).

    mlp_dim: the MLP's hidden width (`intermediate_size`); gated_mlp: down(act(gate(x)) · up(x)) instead of
    down(act(up(x))); act: "gelu" (exact, erf) | "silu". rope_theta: RoPE base period; the RoPE rotates a head's
    dims in two halves by (y, x) patch-centre angles, prefix tokens (CLS + registers) unrotated.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int = 16
    num_registers: int = 4
    layer_norm_eps: float = 1e-5
    rope_theta: float = 100.0
    act: str = "gelu"
    gated_mlp: bool = False
    query_bias: bool = True
    key_bias: bool = False
    value_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 4 (2-D RoPE rotates it in quarters)")
        if self.act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {self.act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix(self) -> int:
        return 1 + self.num_registers


def _swiglu(c, layers, heads, mlp) -> DINOv3Config:
    return DINOv3Config(c, layers, heads, mlp, act="silu", gated_mlp=True)


# Named presets: the architectures of the checkpoints in `MODELS` below.
PRESETS: dict[str, DINOv3Config] = {
    "dinov3_vits16": DINOv3Config(384, 12, 6, 1536),
    "dinov3_vits16plus": _swiglu(384, 12, 6, 1536),
    "dinov3_vitb16": DINOv3Config(768, 12, 12, 3072),
    "dinov3_vitl16": DINOv3Config(1024, 24, 16, 4096),
    "dinov3_vith16plus": _swiglu(1280, 32, 20, 5120),
    "dinov3_vit7b16": _swiglu(4096, 40, 32, 8192),
}

# The family as the registry sees it: `dinov3.load_backbone(spec, weights, dtype=, seed=)`.
FAMILY = Family("dinov3", "DINOv3", ("dtype", "seed"), hidden=True)

DEFAULT_SIZE = 512

# Registry entries: name → architecture, published weights, preprocessing.
MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name, cfg, f"facebook/{name.replace('_', '-')}-pretrain-lvd1689m",
                    PreprocessSpec(DEFAULT_SIZE, cfg.patch_size, IMAGENET_MEAN, IMAGENET_STD, BILINEAR),
                    FAMILY.name)
    for name, cfg in PRESETS.items()}
