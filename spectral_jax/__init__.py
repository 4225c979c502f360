"""spectral_jax: layer-distributed spectral clustering of vision-network attention, in JAX/Flax.

io → models (Taps) → graphs → solvers → Result → analysis / viz / cli.

Every public name and subpackage is reachable from `import spectral_jax as sj` (`sj.analyze`, `sj.Result`,
`sj.models.load`, `sj.dataset.run`, ...) but is imported on first use (PEP 562), so `import spectral_jax` and the
`spectral-jax --help` command line do not pay for importing JAX.

`spectral_jax.models` lives in the checkout's top-level `models/` folder; the install maps it to `spectral_jax.models`
(setuptools `package-dir` in pyproject.toml; `pip install -e .` for a checkout). A raw checkout on `PYTHONPATH`,
without an install, is not supported: there `spectral_jax.models` does not exist.
"""

from spectral_jax import lazy as _lazy

__version__ = "0.1.0"

# Public name → the module that defines it. Subpackages map to themselves (`None`).
_EXPORTS: dict[str, str | None] = {
    "InputError": "spectral_jax.errors",
    "LayerTap": "spectral_jax.taps",
    "Taps": "spectral_jax.taps",
    "Result": "spectral_jax.solvers",
    "exact": "spectral_jax.solvers",
    "gd": "spectral_jax.solvers",
    "analyze": "spectral_jax.pipeline",
    "describe": "spectral_jax.analysis",
    "View": "spectral_jax.analysis",
    "solve": "spectral_jax.pipeline",
    "sweep": "spectral_jax.pipeline",
    "attribution": "spectral_jax.pipeline",
    "Attribution": "spectral_jax.analysis",
    "Backbone": "spectral_jax.models",
    "load_backbone": "spectral_jax.models",
    "files": None,
    "acts": None,
    "analysis": None,
    "cli": None,
    "dataset": None,
    "errors": None,
    "graphs": None,
    "io": None,
    "layer_weights": None,
    "models": None,
    "objective": None,
    "pipeline": None,
    "report": None,
    "solvers": None,
    "taps": None,
    "viz": None,
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
