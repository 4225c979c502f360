"""Eigen-solvers for the layer-distributed objective: `exact` (eigh / LOBPCG) and `gd` (optax, jitted scan)."""

from spectral_jax.solvers.exact import exact
from spectral_jax.solvers.result import Result

__all__ = ["Result", "exact"]

from spectral_jax.solvers.gd import gd  # noqa: E402

__all__ += ["gd"]
