"""Section `dataset`: the exact dataset solve at COCO scale on synthetic features — 5 000 images × 16² tokens
(N = 1.28 M nodes, COCO val2017's image count at 224²), one layer, heads concatenated (F = 384, DINOv2-S's width),
bfloat16 features — through the public API only: `graphs.knn` (k_intra + k_inter cosine neighbours, blockwise) then
`solvers.exact` (matrix-free top-K on the sparse operator; `dense_max=0` so tiny mode takes the same path).

Features: each image mixes a few of `clusters` random centres (its "objects") plus noise, so the graph has the
intra- and inter-image structure of real taps without any download. Timed once each (a single long call):
the kNN build (incl. compile) and the exact solve, with the solver's convergence report.

Second row: the dataset-wide segments' k-means (`analysis.kmeans`, the jitted program) of N = 1.28 M tokens × F = 19
(the embedding of K = 20 eigenvectors), k = 20, n_init = 10, on the same synthetic mixture at F = 19, rows
unit-length: the first call (incl. compile) and a second one (seed 1, compiled).

Shape legend
    I  images   n  tokens per image   N = I·n nodes   F  feature dim   k  neighbours per node   K  eigenvectors
"""

from __future__ import annotations

import time

import numpy as np

from timing import Section

FULL = dict(images=5000, grid=(16, 16), dim=384, clusters=80, k_intra=10, k_inter=10, num_eigs=20, block=4096)
TINY = dict(images=8, grid=(4, 4), dim=16, clusters=4, k_intra=4, k_inter=4, num_eigs=4, block=64)
KMEANS = dict(full=dict(images=5000, grid=(16, 16), dim=19, clusters=80, k=20, n_init=10),
              tiny=dict(images=8, grid=(16, 16), dim=19, clusters=6, k=6, n_init=2))

COLUMNS = [("n", "N nodes"), ("edges", "edges (N·k)"), ("knn_s", "kNN graph (s, incl. compile)"),
           ("solve_s", "exact solve (s)"), ("method", "method"), ("iterations", "iterations"),
           ("max_residual", "max residual"), ("converged", "converged"), ("k", "k-means k"),
           ("kmeans_first_s", "k-means first call (s, incl. compile)"), ("kmeans_s", "k-means (s, compiled)")]


def features(images: int, per: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Synthetic tokens `[I·n, F]` float32: each image picks 3 of `clusters` unit centres, each token one of its
    image's centres plus Gaussian noise (σ = 0.5/√F per coordinate)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    own = rng.integers(0, clusters, (images, 3))
    pick = own[np.arange(images)[:, None], rng.integers(0, 3, (images, per))]         # [I, n]
    x = centres[pick.reshape(-1)]
    return x + rng.standard_normal(x.shape).astype(np.float32) * (0.5 / np.sqrt(dim))


def run(st: Section) -> None:
    import jax
    import jax.numpy as jnp

    from spectral_jax import graphs as G
    from spectral_jax import solvers

    plan = TINY if st.tiny else FULL
    per = plan["grid"][0] * plan["grid"][1]
    n = plan["images"] * per
    fields = dict(n=n, edges=n * (plan["k_intra"] + plan["k_inter"]))

    def measure():
        x = jnp.asarray(features(plan["images"], per, plan["dim"], plan["clusters"]), jnp.bfloat16)[None]
        t0 = time.perf_counter()
        graph = jax.block_until_ready(G.knn(x, x, plan["grid"], plan["images"], k_intra=plan["k_intra"],
                                            k_inter=plan["k_inter"], block=plan["block"]))
        knn_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = solvers.exact.exact([graph], plan["num_eigs"], dense_max=0)
        jax.block_until_ready(res.eigvecs)
        return {"knn_s": knn_s, "solve_s": time.perf_counter() - t0, "method": res.method,
                "iterations": res.convergence.iterations, "max_residual": res.convergence.max_residual,
                "converged": res.convergence.converged}

    st.attempt(f"{plan['images']} images × {per} tokens, F={plan['dim']}, kNN-vv", measure, **fields)

    km = KMEANS["tiny" if st.tiny else "full"]
    km_n = km["images"] * km["grid"][0] * km["grid"][1]

    def kmeans():
        from spectral_jax import analysis as A

        x = features(km["images"], km["grid"][0] * km["grid"][1], km["dim"], km["clusters"]).astype(np.float64)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t0 = time.perf_counter()
        A.kmeans(x, km["k"], seed=0, n_init=km["n_init"])
        t1 = time.perf_counter()
        A.kmeans(x, km["k"], seed=1, n_init=km["n_init"])
        return {"kmeans_first_s": t1 - t0, "kmeans_s": time.perf_counter() - t1}

    st.attempt(f"k-means {km_n} tokens × F={km['dim']}, k={km['k']}, n_init={km['n_init']}", kmeans, n=km_n,
               k=km["k"])
