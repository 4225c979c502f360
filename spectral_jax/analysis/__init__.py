"""Analysis of pseudo-eigenvectors (being split into one module per topic; see `cluster`)."""

from spectral_jax.analysis.cluster import *  # noqa: F401,F403
from spectral_jax.analysis.cluster import __all__  # noqa: F401
from spectral_jax.analysis.cluster import _components, _merge_small, _nms, _silhouette  # noqa: F401
