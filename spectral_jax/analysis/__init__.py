"""Analysis of pseudo-eigenvectors: PCA colours, k-means segments with an automatic k, figure/ground, instance
masks, the metrics and linear probes used to evaluate them, and a per-image summary of a `Result`. Functions of
numpy arrays; importing this package does not import JAX (k-means is one jitted JAX program, `lloyd`, imported on
the first `kmeans` call).

One module per topic, every public name re-exported here (`from spectral_jax import analysis as A; A.segment(...)`):
    features  spectral_features, pca_rgb         per-pixel spectral embedding, RGB picture of the eigenvectors
    cluster   KMeans, kmeans, AutoK, auto_k, cluster_embedding, segment   k-means, the choice of k, segments
    lloyd     (internal) the compiled k-means: greedy k-means++ seeding, Lloyd iterations, n_init runs
    masks     bipartition, instance_masks        figure/ground, instance-mask candidates
    metrics   iou, miou_hungarian                mask IoU, mean IoU after Hungarian matching
    probe     Probe, linear_probe                ridge probes from features to coordinates or labels
    grid      upsample, grid_coords              resizing maps, pixel-centre coordinates
    views     View, describe                     segments, foreground and instances of each image of a Result
    layerwise  Attribution, eigengap, principal_angles   which layers/heads/timesteps say what in a joint solution

Shape legend
    B      images;  K  eigenvectors, sorted by eigenvalue, largest first (index 0: the near-constant trivial one)
    (h, w) the eigenvectors' grid;  N = h*w pixels, flattened row-major (n = y*w + x)
    (H, W) an image's size in pixels
    F      feature width per pixel (K-1 with `skip_first`);  T  regression targets;  k  clusters;  M  instance masks

Everything random takes a `seed`: the same inputs and seed give the same outputs. Arithmetic is float64 inside
(k-means: float32 runs on centred data, float64 centres and inertia);
functions returning continuous maps say their dtype. scipy is needed for connected components (`instance_masks`)
and the Hungarian matching (`miou_hungarian`); it is imported where used.
"""

from spectral_jax.analysis.layerwise import Attribution, eigengap, principal_angles
from spectral_jax.analysis.cluster import AutoK, KMeans, auto_k, cluster_embedding, kmeans, segment
from spectral_jax.analysis.features import pca_rgb, spectral_features
from spectral_jax.analysis.grid import grid_coords, upsample
from spectral_jax.analysis.masks import bipartition, instance_masks
from spectral_jax.analysis.metrics import iou, miou_hungarian
from spectral_jax.analysis.probe import Probe, linear_probe
from spectral_jax.analysis.views import View, describe

__all__ = [
    "spectral_features", "pca_rgb", "KMeans", "kmeans", "AutoK", "auto_k", "cluster_embedding", "segment", "bipartition",
    "instance_masks", "iou", "miou_hungarian", "upsample", "grid_coords", "Probe", "linear_probe", "View", "describe",
    "Attribution", "eigengap", "principal_angles",
]
