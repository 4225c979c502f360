"""The diffusion-transformer family: self-attention taps of DiT blocks across noise timesteps, with the VAE encoder,
the text conditioning and the noise schedule behind one `load_backbone(spec, weights)`.

    config.py     PixArtConfig, DiTConfig, the presets and DIT_MODELS — no JAX
    pixart.py     PixArt-Σ's `PixArtTransformer2DModel` (Flax NNX) with q/k/v taps
    mmdit.py      SD3 / SD3.5's `SD3Transformer2DModel` (MM-DiT) with image-token q/k/v taps
    flux.py       FLUX.1's `FluxTransformer2DModel` (double- and single-stream blocks, RoPE) with image q/k/v taps
    flow.py       FlowSchedule: the rectified-flow noising of SD3/FLUX (diffusers' FlowMatchEulerDiscreteScheduler)
    params.py     diffusers checkpoints → those modules (key tables, config.json readers)
    modeling.py   DiffusionTransformer (what the taps need) and load_dit
    backbone.py   load_backbone(spec, weights) -> Backbone, collect_taps

The VAE encoder and the DDPM schedule are Stable Diffusion's (`models/sd`). Names are imported on first use
(PEP 562), so `spectral_jax.models.dit.config` does not import JAX.
"""

from spectral_jax import lazy as _lazy

_EXPORTS = {
    "DIT_MODELS": ".config", "FAMILY": ".config", "DiTConfig": ".config", "PixArtConfig": ".config",
    "SD3Config": ".config", "FluxConfig": ".config", "FlowSchedule": ".flow",
    "PixArtTransformer2DModel": ".pixart", "SD3Transformer2DModel": ".mmdit",
    "FluxTransformer2DModel": ".flux",
    "DiffusionTransformer": ".modeling", "load_dit": ".modeling", "load_text_embedding": ".modeling",
    "load_backbone": ".backbone", "collect_taps": ".backbone",
    "backbone": None, "config": None, "flow": None, "flux": None, "mmdit": None, "modeling": None, "params": None,
    "pixart": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
