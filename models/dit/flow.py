"""The rectified-flow forward (noising) process SD3 and FLUX were trained with, on the integer timestep grid of
diffusers' `FlowMatchEulerDiscreteScheduler` (static shift):

    u = (t + 1) / N,  σ_t = shift·u / (1 + (shift − 1)·u)      t ∈ {0..N−1}, N = 1000 (σ_999 = 1: pure noise)
    x_t = (1 − σ_t) · x0 + σ_t · ε                               (`scale_noise`)
    the transformer's timestep input is σ_t · N                  (the scheduler's `timesteps`)

FLUX's scheduler shifts dynamically: shift = exp(μ), μ linear in the image-token count N from base_shift at
base_seq_len to max_shift at max_seq_len (diffusers' `calculate_shift`, `time_shift` "exponential"):
σ_t = e^μ / (e^μ + 1/u − 1), the same formula with that shift.

Our t indexes the scheduler's training grid from the clean end: t = N − 1 − j for its j-th entry (descending), so
small t means little noise, as for the DDPM models. No JAX at import (the registry reads this dataclass).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """σ schedule over `num_train_timesteps` steps with a static `shift` (SD3/SD3.5: 3.0)."""

    shift: float = 3.0
    num_train_timesteps: int = 1000
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def shift_for(self, tokens: int | None = None) -> float:
        """The shift: static, or exp(μ(tokens)) when dynamic (then `tokens`, the image-token count, is needed)."""
        if not self.dynamic:
            return float(self.shift)
        if tokens is None:
            raise ValueError("a dynamically shifted schedule needs the image-token count")
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return float(np.exp(tokens * m + self.base_shift - m * self.base_seq_len))

    def sigmas_for(self, tokens: int | None = None) -> np.ndarray:
        """σ_t for t = 0..N−1, `[N]` float32, computed in float32 as the scheduler does."""
        n = self.num_train_timesteps
        u = np.linspace(1, n, n, dtype=np.float32) / np.float32(n)
        s = np.float32(self.shift_for(tokens))
        return (s * u / (1 + (s - 1) * u)).astype(np.float32)

    @property
    def sigmas(self) -> np.ndarray:
        """σ_t of a static schedule."""
        return self.sigmas_for(None)

    def check(self, timesteps) -> np.ndarray:
        t = np.asarray(timesteps)
        if not np.issubdtype(t.dtype, np.integer) or t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must be integers in [0, {self.num_train_timesteps - 1}], got {timesteps!r}")
        return t

    def sigma(self, timesteps, tokens: int | None = None):
        """σ_t `[B]` float32 for int timesteps (scalar or `[B]`; traced is fine: a constant table gathered at t)."""
        import jax.numpy as jnp

        return jnp.asarray(self.sigmas_for(tokens))[jnp.asarray(timesteps, jnp.int32).reshape(-1)]

    def add_noise(self, x0, noise, timesteps, tokens: int | None = None):
        """(1 − σ_t) · x0 + σ_t · noise; x0, noise `[B, ...]`; tokens: image tokens (dynamic shifting only)."""
        s = self.sigma(timesteps, tokens).reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return (1 - s) * x0 + s * noise

    def model_timestep(self, timesteps, tokens: int | None = None):
        """The transformer's timestep input, σ_t · N `[B]`."""
        return self.sigma(timesteps, tokens) * self.num_train_timesteps
