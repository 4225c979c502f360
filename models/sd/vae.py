"""The encoder half of Stable Diffusion's `AutoencoderKL` (Flax NNX, NHWC): image → latent.

    vae = AutoencoderKL(VAE_PRESETS["sd"], rngs=nnx.Rngs(0))      # or sd.params.load_vae(dir)
    z = vae.encode(images)                       # images [B, H, W, 3] in [-1, 1] → z [B, H/8, W/8, 4]

encoder: conv_in → down_blocks (DownEncoderBlock2D: ResnetBlock2D ×layers, then a stride-2 conv with one pixel
of right/bottom padding, except the last) → mid_block (resnet, single-head self-attention with GroupNorm and a
residual, resnet) → conv_norm_out → SiLU → conv_out (2·latent channels); then quant_conv (1×1). The result is a
diagonal Gaussian: mean and log-variance (clamped to [−30, 20]) halves. The latent the UNet sees is
`scaling_factor · z` with z the mean (deterministic) or a sample mean + exp(logvar/2)·ε (diffusers'
`latent_dist.sample()`, which the official code uses). The decoder is not ported (never needed here).

Shape legend
    B  images   (H, W)  pixels   (h, w) = (H, W) / 2^(levels−1)   C  channels   Z  latent channels (4)
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from spectral_jax.models.sd.config import VAEConfig  # noqa: F401  (re-exported)
from spectral_jax.models.sd.layers import Attention, Downsample2D, ResnetBlock2D, conv, group_norm


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, c_in: int, c_out: int, downsample: bool, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(c_in if i == 0 else c_out, c_out, None, groups=cfg.norm_num_groups,
                                               eps=1e-6, dtype=dtype, rngs=rngs)
                                 for i in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([Downsample2D(c_out, 0, dtype=dtype, rngs=rngs)]) if downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UNetMidBlock2D(nnx.Module):
    """resnet → single-head attention (GroupNorm inside, residual) → resnet."""

    def __init__(self, c: int, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        g = cfg.norm_num_groups
        self.resnets = nnx.List([ResnetBlock2D(c, c, None, groups=g, eps=1e-6, dtype=dtype, rngs=rngs)
                                 for _ in range(2)])
        self.attentions = (nnx.List([Attention(c, 1, c, bias=True, norm_num_groups=g, eps=1e-6,
                                               residual_connection=True, upcast=True, dtype=dtype, rngs=rngs)])
                           if cfg.mid_block_add_attention else None)

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)[0]
        return self.resnets[1](x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        self.conv_in = conv(cfg.in_channels, ch[0], dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, cfg, dtype=dtype,
                                                        rngs=rngs) for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], cfg, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], cfg.norm_num_groups, 1e-6, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Encoder + quant_conv. `model(images)` → (mean, logvar) `[B, h, w, Z]` (unscaled)."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = conv(z2, z2, 1, padding=0, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None

    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"images must be [B, H, W, {self.cfg.in_channels}] in [-1, 1], got {images.shape}")
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images, key: jax.Array | None = None):
        """The scaled latent the UNet sees: `scaling_factor · z`, z = mean, or a sample when `key` is given: mean +
        σ·ε with ε ~ N(0, I) of one image's latent shape `[1, h, w, C]` from `key`, the same for every image of the
        batch (an image's sample does not depend on its batch); ε drawn in float32 then cast (a bfloat16 draw is
        another sample: `diffusion.image_noise`)."""
        mean, logvar = self(images)
        eps = None if key is None else jax.random.normal(key, (1, *mean.shape[1:]), jnp.float32).astype(mean.dtype)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * eps
        return self.cfg.scaling_factor * z
