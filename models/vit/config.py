"""ViT architectures as frozen dataclasses, the named presets, and the ViT registry entries — no JAX here, so
reading the registry is instant (`spectral_jax.models.registry`).

    cfg = PRESETS["dinov2_vits14"]          # ViTConfig(family="dinov2", hidden_size=384, num_layers=12, ...)
    spec = MODELS["dinov2_vits14"]          # ModelSpec: config, HF repo id, preprocessing (448, patch 14, ImageNet)

Preprocessing follows each reference's image processor for the mean/std normalisation constants and the patch
size. The default size is this library's, the same for `analyze`, `extract` and the API: the shorter side becomes
448 pixels (a 32×32 patch grid at patch 14; the processors' 224-pixel crop gives a 16×16 grid, too coarse for
segments), keeping the aspect ratio (`spectral_jax.io`, as docs/design.md specifies, instead of centre-cropping).
The resize filter is each checkpoint's processor class's: DINOv2 (`BitImageProcessor`) and CLIP
(`CLIPImageProcessor`) bicubic, DINO v1 and MAE (`ViTImageProcessor`) bilinear.
"""

from __future__ import annotations

import dataclasses

from spectral_jax.models.spec import BICUBIC, BILINEAR, IMAGENET_MEAN, IMAGENET_STD, Family, ModelSpec, PreprocessSpec

FAMILIES = ("vit", "dinov2", "mae", "clip")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of one ViT; `family` names the reference layout (and key table) it mirrors.

    family: "vit" (`ViTModel`, DINO v1) | "dinov2" (`Dinov2Model`, `Dinov2WithRegistersModel`) | "mae"
    (`ViTMAEModel`) | "clip" (`CLIPVisionModel`).
    pos_grid: G, the stored position embeddings cover a G×G patch grid (+1 for CLS).
    pos_antialias: resample them with torch's antialiased bicubic (DINOv2 with registers) instead of plain bicubic.
    """

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    pos_grid: int
    num_registers: int = 0
    layer_norm_eps: float = 1e-6
    act: str = "gelu"  # "gelu" (exact, erf) | "quick_gelu" (x·σ(1.702x))
    swiglu: bool = False
    layer_scale: bool = False
    qkv_bias: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    final_norm: bool = True
    pos_antialias: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {self.act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix(self) -> int:
        return 1 + self.num_registers


def _vit(family, c, layers, heads, patch, grid, **kw) -> ViTConfig:
    return ViTConfig(family, c, layers, heads, 4 * c, patch, grid, **kw)


def _dinov2(c, layers, heads, registers=0, swiglu=False) -> ViTConfig:
    # SwiGLU keeps 2/3 of the 4C hidden width, rounded up to a multiple of 8 (Dinov2SwiGLUFFN).
    mlp = (int(4 * c * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * c
    return ViTConfig("dinov2", c, layers, heads, mlp, 14, 37, num_registers=registers, layer_norm_eps=1e-6,
                     swiglu=swiglu, layer_scale=True, pos_antialias=registers > 0)


_S, _B, _L, _G = (384, 12, 6), (768, 12, 12), (1024, 24, 16), (1536, 40, 24)

# Named presets: the architectures of the checkpoints in `MODELS` below.
PRESETS: dict[str, ViTConfig] = {
    "dino_vits16": _vit("vit", *_S, 16, 14, layer_norm_eps=1e-12),
    "dino_vits8": _vit("vit", *_S, 8, 28, layer_norm_eps=1e-12),
    "dino_vitb16": _vit("vit", *_B, 16, 14, layer_norm_eps=1e-12),
    "dino_vitb8": _vit("vit", *_B, 8, 28, layer_norm_eps=1e-12),
    "dinov2_vits14": _dinov2(*_S),
    "dinov2_vitb14": _dinov2(*_B),
    "dinov2_vitl14": _dinov2(*_L),
    "dinov2_vitg14": _dinov2(*_G, swiglu=True),
    "dinov2_vits14_reg": _dinov2(*_S, registers=4),
    "dinov2_vitb14_reg": _dinov2(*_B, registers=4),
    "dinov2_vitl14_reg": _dinov2(*_L, registers=4),
    "dinov2_vitg14_reg": _dinov2(*_G, registers=4, swiglu=True),
    "mae_vitb16": _vit("mae", *_B, 16, 14, layer_norm_eps=1e-12),
    "mae_vitl16": _vit("mae", *_L, 16, 14, layer_norm_eps=1e-12),
    "clip_vitb16": _vit("clip", *_B, 16, 14, layer_norm_eps=1e-5, act="quick_gelu", patch_bias=False,
                        pre_norm=True, final_norm=False),
    "clip_vitb32": _vit("clip", *_B, 32, 7, layer_norm_eps=1e-5, act="quick_gelu", patch_bias=False,
                        pre_norm=True, final_norm=False),
    "clip_vitl14": _vit("clip", *_L, 14, 16, layer_norm_eps=1e-5, act="quick_gelu", patch_bias=False,
                        pre_norm=True, final_norm=False),
}


# The family as the registry sees it: `vit.load_backbone(spec, weights, dtype=, seed=, cache_dir=)`.
FAMILY = Family("vit", "ViT", ("dtype", "seed", "cache_dir"), hidden=True)

DEFAULT_SIZE = 448
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _spec(name: str, repo_id: str, resample: str, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ModelSpec:
    cfg = PRESETS[name]
    return ModelSpec(name, cfg, repo_id, PreprocessSpec(DEFAULT_SIZE, cfg.patch_size, mean, std, resample),
                     FAMILY.name)


# Registry entries: name → architecture, published weights, preprocessing.
MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    _spec("dino_vits16", "facebook/dino-vits16", BILINEAR),
    _spec("dino_vits8", "facebook/dino-vits8", BILINEAR),
    _spec("dino_vitb16", "facebook/dino-vitb16", BILINEAR),
    _spec("dino_vitb8", "facebook/dino-vitb8", BILINEAR),
    _spec("dinov2_vits14", "facebook/dinov2-small", BICUBIC),
    _spec("dinov2_vitb14", "facebook/dinov2-base", BICUBIC),
    _spec("dinov2_vitl14", "facebook/dinov2-large", BICUBIC),
    _spec("dinov2_vitg14", "facebook/dinov2-giant", BICUBIC),
    _spec("dinov2_vits14_reg", "facebook/dinov2-with-registers-small", BICUBIC),
    _spec("dinov2_vitb14_reg", "facebook/dinov2-with-registers-base", BICUBIC),
    _spec("dinov2_vitl14_reg", "facebook/dinov2-with-registers-large", BICUBIC),
    _spec("dinov2_vitg14_reg", "facebook/dinov2-with-registers-giant", BICUBIC),
    _spec("mae_vitb16", "facebook/vit-mae-base", BILINEAR),
    _spec("mae_vitl16", "facebook/vit-mae-large", BILINEAR),
    _spec("clip_vitb16", "openai/clip-vit-base-patch16", BICUBIC, CLIP_MEAN, CLIP_STD),
    _spec("clip_vitb32", "openai/clip-vit-base-patch32", BICUBIC, CLIP_MEAN, CLIP_STD),
    _spec("clip_vitl14", "openai/clip-vit-large-patch14", BICUBIC, CLIP_MEAN, CLIP_STD),
]}
