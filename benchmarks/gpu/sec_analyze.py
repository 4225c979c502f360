"""Section `analyze`: single-image `spectral_jax.analyze` (exact, K = 20) on DINOv2-B with random weights, images/s
and where the time goes — the GPU version of `benchmarks/bench_analyze.py`, whose breakdown it repeats with the
library's own pieces in the order `pipeline.solve` → `solvers.exact` → `result.finish` runs them:

    forward   `Backbone.taps` (all layers' q/k/v)         graphs   `graphs.from_taps`
    dense A   `objective.dense_operators` (mean of sym(P) over all layers × heads, N × N)
    eigh      the exact solver's dense top-K eigensolver   finish   `solvers.result.finish` (signs, per-graph RQs)

End to end is `analyze(image, backbone=bb)` on a seeded random uint8 image (content does not change the work), after
one warm-up call that compiles; medians of interleaved repeats.

Shape legend
    S  image side (pixels)   N  patch tokens ((S/14)²)   K  eigenvectors
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from timing import Section, jax_blocking, medians

FULL = dict(model="dinov2_vitb14", sizes=(448, 896), num_eigs=20, graphs=("qk", "vv"), runs=5, warmup=1)
TINY = dict(model="dinov2_vits14", sizes=(42, 56), num_eigs=4, graphs=("qk", "vv"), runs=2, warmup=1)

STAGES = ("forward", "graphs", "dense A", "eigh", "finish")
COLUMNS = [("model", "model"), ("image", "image"), ("graph", "graph"), ("images_per_s", "images/s"),
           ("analyze_s", "analyze (s)"), *[(f"{s}_s", f"{s} (s)") for s in STAGES],
           ("first_s", "first call incl. compile (s)")]


def _breakdown(bb, x, graph: str, k: int, runs: int) -> dict[str, float]:
    """Median seconds of each stage, each stage's output feeding the next (as `pipeline.solve` runs them)."""
    import jax

    from spectral_jax import graphs as G
    from spectral_jax import objective as O
    from spectral_jax.solvers.result import finish

    E = importlib.import_module("spectral_jax.solvers.exact")
    times: dict[str, list[float]] = {s: [] for s in STAGES}

    def timed(stage, fn, *a):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a))
        times[stage].append(time.perf_counter() - t0)
        return out

    for _ in range(runs + 1):                   # the first pass compiles every piece and is dropped
        taps = timed("forward", bb.taps, x[None])
        gs = timed("graphs", lambda: G.from_taps(taps, graph, image=0))
        ws = O.normalised_weights(gs, None)
        base, nimg = O.check_graphs(gs)
        a, b = timed("dense A", O.dense_operators, gs, ws, base, nimg)
        vals, vecs = timed("eigh", E._dense_eig, a, b, k, True)
        vals, vecs = np.asarray(vals), np.asarray(vecs)
        order = np.argsort(-vals)
        timed("finish", lambda: finish(gs, ws, vecs[:, order], vals[order], nimg, base, steps=0, seconds=0.0,
                                       method="exact-dense").eigvecs)
    return {f"{s}_s": float(np.median(v[1:])) for s, v in times.items()}


def run(st: Section) -> None:
    import spectral_jax
    from spectral_jax.models import load_backbone

    plan = TINY if st.tiny else FULL
    bb = load_backbone(plan["model"], "random")
    rng = np.random.default_rng(0)
    for size in plan["sizes"]:
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x = bb.preprocess_image(img, (size, size))
        for graph in plan["graphs"]:
            def measure():
                call = lambda: spectral_jax.analyze(img, graph=graph, num_eigs=plan["num_eigs"], size=(size, size),
                                                    backbone=bb).eigvecs
                t0 = time.perf_counter()
                jax_blocking(call)()
                first = time.perf_counter() - t0
                t = medians({"analyze": jax_blocking(call)}, plan["runs"], plan["warmup"])["analyze"]
                return {"analyze_s": t, "images_per_s": 1.0 / t, "first_s": first,
                        **_breakdown(bb, x, graph, plan["num_eigs"], plan["runs"])}

            st.attempt(f"{plan['model']} {size}² {graph}", measure, model=plan["model"], image=f"{size}²",
                       graph=graph, num_eigs=plan["num_eigs"], target=not st.tiny and size == 448)
