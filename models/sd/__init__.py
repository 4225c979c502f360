"""The Stable Diffusion 1.x/2.x family: UNet self-attention taps across noise timesteps, with the VAE encoder, the
CLIP text encoder (empty prompt) and the DDPM schedule behind one `load_backbone(spec, weights)`.

    config.py     UNetConfig, VAEConfig, CLIPTextConfig, SDConfig, the presets and SD_MODELS — no JAX
    unet.py, vae.py, clip_text.py, layers.py, scheduler.py   the Flax NNX modules and the DDPM noising
    params.py     diffusers checkpoints → those modules (key tables, config.json readers)
    modeling.py   StableDiffusion (what the taps need) and load_sd
    diffusion.py  timestep schedules, noising, collect_taps (timesteps folded into the heads axis)
    backbone.py   load_backbone(spec, weights) -> Backbone

Names are imported on first use (PEP 562), so `spectral_jax.models.sd.config` does not import JAX.
"""

from spectral_jax import lazy as _lazy

_EXPORTS = {
    "StableDiffusion": ".modeling", "load_sd": ".modeling", "get_sd_spec": ".modeling",
    "save_empty_prompt_embedding": ".modeling", "load_text_embedding": ".modeling",
    "SDConfig": ".config", "SD_MODELS": ".config", "FAMILY": ".config", "UNetConfig": ".config",
    "VAEConfig": ".config", "CLIPTextConfig": ".config",
    "DDPMSchedule": ".scheduler",
    "collect_taps": ".diffusion", "timestep_schedule": ".diffusion", "parse_timesteps": ".diffusion",
    "load_backbone": ".backbone",
    "backbone": None, "clip_text": None, "config": None, "diffusion": None, "layers": None, "modeling": None,
    "params": None, "scheduler": None, "unet": None, "vae": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
