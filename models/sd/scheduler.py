"""The DDPM forward (noising) process Stable Diffusion was trained with (diffusers `DDPMScheduler.add_noise`).

    sched = DDPMSchedule()                       # "scaled_linear": β_t = (√0.00085 + t/999·(√0.012 − √0.00085))²
    x_t = sched.add_noise(x0, eps, t)            # √ᾱ_t · x0 + √(1 − ᾱ_t) · eps,  ᾱ_t = Π_{s≤t} (1 − β_s)

Only the forward process is needed: an image's latent is noised to timestep t and the UNet's attention read.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """β schedule over `num_train_timesteps` steps (SD 1.x and 2.x: scaled_linear 0.00085 → 0.012, 1000 steps)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r}: only 'scaled_linear' and 'linear' are ported")

    @property
    def betas(self) -> np.ndarray:
        """`[T]` float64 (diffusers computes the same in float32; the difference is float32 rounding)."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2
        return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = Π_{s≤t} (1 − β_s), `[T]` float64."""
        return np.cumprod(1.0 - self.betas)

    def check(self, timesteps) -> np.ndarray:
        t = np.asarray(timesteps)
        if not np.issubdtype(t.dtype, np.integer) or t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must be integers in [0, {self.num_train_timesteps - 1}], got {timesteps!r}")
        return t

    def add_noise(self, x0, noise, timesteps):
        """√ᾱ_t · x0 + √(1 − ᾱ_t) · noise. x0, noise `[B, ...]`; timesteps int scalar or `[B]` (traced is fine:
        the table is a constant gathered at t)."""
        import jax.numpy as jnp  # here, not at the top: the registry reads this module's dataclass without JAX

        acp = jnp.asarray(self.alphas_cumprod, jnp.float32)
        t = jnp.asarray(timesteps, jnp.int32).reshape(-1)
        shape = (-1,) + (1,) * (jnp.ndim(x0) - 1)
        a = jnp.sqrt(acp[t]).reshape(shape).astype(x0.dtype)
        s = jnp.sqrt(1.0 - acp[t]).reshape(shape).astype(x0.dtype)
        return a * x0 + s * noise
