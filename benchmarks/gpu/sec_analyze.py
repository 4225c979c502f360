"""Section `analyze`: single-image `spectral_jax.analyze` (exact, K = 20) on DINOv2-B with random weights, images/s
and where the time goes, and a batch of images through one `analyze` call — the batched exact path (every image's
A, eigensolver, residuals and quotients in one compiled program per chunk, `solvers.exact.exact_batch`) against the
per-image loop (`batch_images=0`) on the same images, interleaved — the GPU version of `benchmarks/bench_analyze.py`, whose breakdown it repeats with the
library's own pieces in the order `pipeline.solve` → `solvers.exact` → `result.finish` runs them:

    forward   `Backbone.taps` (all layers' q/k/v)         graphs   `graphs.from_taps`
    dense A   `objective.dense_operators` (mean of sym(P) over all layers × heads, N × N)
    eigh      the exact solver's dense top-K eigensolver   finish   `solvers.result.finish` (signs, per-graph RQs)

End to end is `analyze(image, backbone=bb)` on a seeded random uint8 image (content does not change the work), after
one warm-up call that compiles; medians of interleaved repeats. Batch rows: `analyze(images, backbone=bb)` on
`batch` seeded random images at the first size (one forward of the whole batch, then the solve), images/s batched
and looped; run after the first size's single-image rows, before the larger size's.

Shape legend
    S  image side (pixels)   N  patch tokens ((S/14)²)   K  eigenvectors
"""

from __future__ import annotations

import importlib
import time

import numpy as np

from timing import Section, jax_blocking, medians

# shrink: None, or the DINOv2 preset's (hidden size, layers, heads) replaced by a toy architecture (tiny mode: the
# same ViT code and DINOv2 layout, compiled in a second instead of ten)
FULL = dict(model="dinov2_vitb14", shrink=None, sizes=(448, 896), num_eigs=20, graphs=("qk", "vv"), runs=5, warmup=1,
            batch=32, batch_runs=3)
TINY = dict(model="dinov2_vits14", shrink=(32, 2, 2), sizes=(42,), num_eigs=4, graphs=("qk", "vv"), runs=2,
            warmup=1, batch=3, batch_runs=1)

STAGES = ("forward", "graphs", "dense A", "eigh", "finish")
COLUMNS = [("model", "model"), ("image", "image"), ("graph", "graph"), ("images", "images per call"),
           ("images_per_s", "images/s"), ("analyze_s", "analyze (s)"), *[(f"{s}_s", f"{s} (s)") for s in STAGES],
           ("loop_images_per_s", "per-image loop: images/s"), ("speedup", "batched / loop"),
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


def backbone(name: str, shrink: tuple[int, int, int] | None):
    """The registry's ViT `name` with seeded random weights, its architecture shrunk to (hidden size, layers, heads)
    if `shrink` is given (MLP 4× the hidden size; everything else, and the loader, as the preset)."""
    import dataclasses

    from spectral_jax.models import registry
    from spectral_jax.models.vit.backbone import load_backbone

    spec = registry.get_spec(name)
    if shrink is not None:
        c, layers, heads = shrink
        cfg = dataclasses.replace(spec.config, hidden_size=c, num_layers=layers, num_heads=heads, mlp_dim=4 * c)
        spec = dataclasses.replace(spec, name=f"{name} ({c}, {layers} layers, {heads} heads)", config=cfg)
    return load_backbone(spec, "random")


def run(st: Section) -> None:
    plan = TINY if st.tiny else FULL
    bb = backbone(plan["model"], plan["shrink"])
    rng = np.random.default_rng(0)
    for i, size in enumerate(plan["sizes"]):
        _single(st, plan, bb, rng, size)
        if i == 0:
            _batch(st, plan, bb, rng, size)


def _single(st: Section, plan: dict, bb, rng, size: int) -> None:
    """One image per `analyze` call: images/s, first call, and the stage breakdown."""
    import spectral_jax

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
            return {"analyze_s": t, "images_per_s": 1.0 / t, "first_s": first, "images": 1,
                    **_breakdown(bb, x, graph, plan["num_eigs"], plan["runs"])}

        st.attempt(f"{bb.name} {size}² {graph}", measure, model=bb.name, image=f"{size}²",
                   graph=graph, num_eigs=plan["num_eigs"], target=not st.tiny and size == 448)


def _batch(st: Section, plan: dict, bb, rng, size: int) -> None:
    """`plan["batch"]` images in one `analyze` call: the batched exact path vs the per-image loop (`batch_images=0`),
    the same images, calls interleaved; the first (compiling) call of each is timed apart."""
    import spectral_jax

    n = plan["batch"]
    imgs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    for graph in plan["graphs"]:
        def measure():
            calls = {name: jax_blocking(lambda per=per: spectral_jax.analyze(
                imgs, graph=graph, num_eigs=plan["num_eigs"], size=(size, size), backbone=bb,
                batch_images=per).eigvecs) for name, per in (("batched", None), ("loop", 0))}
            t0 = time.perf_counter()
            calls["batched"]()
            first = time.perf_counter() - t0
            t = medians(calls, plan["batch_runs"], 0 if st.tiny else 1)
            return {"analyze_s": t["batched"], "images_per_s": n / t["batched"], "loop_images_per_s": n / t["loop"],
                    "speedup": t["loop"] / t["batched"], "first_s": first}

        st.attempt(f"{bb.name} {size}² {graph} × {n} images", measure, model=bb.name, image=f"{size}²",
                   graph=graph, images=n, num_eigs=plan["num_eigs"], target=False)
