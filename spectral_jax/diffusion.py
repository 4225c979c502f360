"""Moved: the diffusion taps live in `spectral_jax.models.sd.diffusion` (timestep schedules, noising,
`collect_taps`); this module re-exports them until every caller has switched."""

from spectral_jax.models.sd.diffusion import (DEFAULT_NUM_TIMESTEPS, DEFAULT_T_MAX, LATENTS, SCHEDULES,  # noqa: F401
                                              collect_taps, encode_images, fold_timesteps, noisy_latents,
                                              parse_timesteps, timestep_schedule)
