"""spectral_jax: layer-distributed spectral clustering of vision-network attention, in JAX/Flax.

io → models (Taps) → graphs → solvers → Result → analysis / viz / cli.
"""

from spectral_jax import graphs, objective, solvers
from spectral_jax.errors import InputError
from spectral_jax.pipeline import analyze, describe, solve_taps
from spectral_jax.solvers import Result, exact, gd
from spectral_jax.taps import LayerTap, Taps

__version__ = "0.1.0"

__all__ = ["InputError", "LayerTap", "Result", "Taps", "analyze", "describe", "exact", "gd", "graphs", "objective",
           "solve_taps", "solvers"]
