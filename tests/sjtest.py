"""Helpers shared by the tests (a uniquely named module: `conftest` names collide across test folders)."""

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
BENCH = os.path.join(ROOT, "benchmarks")
# The XLA flags the suite compiles with (tests/conftest.py puts them in XLA_FLAGS): LLVM at -O0, and XLA:CPU's
# older loop emitters for fusions instead of its fusion emitters. A child process given XLA_FLAGS of its own (fake
# devices) takes them through `xla_flags`, so that what it computes is compared, bit for bit where a test does,
# with results compiled the same way: levels and emitters differ in float rounding (fused multiply-adds).
XLA_LEVEL = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a test's child process: the suite's level and `extra` flags."""
    return " ".join([XLA_LEVEL, *extra])


def bench_module(name: str):
    """The benchmark script benchmarks/NAME.py as a module (its functions tested, its `main` not run)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def planted_qk(rng, grid=(12, 12), groups=3, layers=2, heads=2, dim=16, strength=3.0, noise=0.5):
    """q/k whose attention has a planted partition of the grid into `groups` vertical bands (plus noise)."""
    h, w = grid
    labels = (np.arange(w)[None, :].repeat(h, 0) * groups // w).reshape(-1)       # [N]
    centers = rng.normal(size=(groups, dim))
    q = strength * centers[labels] + noise * rng.normal(size=(layers, heads, h * w, dim))
    k = strength * centers[labels] + noise * rng.normal(size=(layers, heads, h * w, dim))
    return q.astype(np.float32), k.astype(np.float32), labels


def subspace_alignment(u, v):
    """Mean cosine of the principal angles between span(u) and span(v), u, v `[N, K]`."""
    qu, _ = np.linalg.qr(np.asarray(u, np.float64))
    qv, _ = np.linalg.qr(np.asarray(v, np.float64))
    return float(np.linalg.svd(qu.T @ qv, compute_uv=False).mean())


def perturb(model, seed):
    """A random-init torch reference moved off its initialisation (0.05·N(0, 1) on every parameter, from `seed`):
    zero-initialised layers (diffusers' output convs, LayerNorm biases) would otherwise hide mapping bugs."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def close_to_ref(ours, ref, tol, what):
    """max |ours − ref| ≤ tol · max |ref|, shapes equal, and the reference not ~0 (else the check tests nothing)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0.05, f"{what}: reference is ~0 (max {scale}); the comparison would test nothing"
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} × {scale:.3g}"


def shared_data(name: str) -> str:
    """The benchmark set ../shared/data/NAME (beside the checkout: a developer's machine and CI have it, a user's
    clone does not), or skip the calling test saying so (CI's SPECTRAL_JAX_REQUIRE_ALL=1 turns the skip into a
    failure)."""
    import pytest

    path = os.path.normpath(os.path.join(SHARED_DATA, name))
    if not os.path.isdir(path):
        pytest.skip(f"benchmark data {path} is not present (it lives in ../shared/data beside the checkout, which a "
                    "clone of the project alone does not have)")
    return path


# Categories of the generated COCO-format set: COCO's own ids, names and supercategories (ids not contiguous, two
# categories in one supercategory, as in COCO).
SHAPE_CATEGORIES = ({"id": 1, "name": "person", "supercategory": "person"},
                    {"id": 3, "name": "car", "supercategory": "vehicle"},
                    {"id": 18, "name": "dog", "supercategory": "animal"},
                    {"id": 21, "name": "cow", "supercategory": "animal"})


def _shape_photo(rng, labels, colours):
    """An RGB uint8 `[H, W, 3]` image of the int map `labels` `[H, W]` (0 background): a smooth background, each
    label value its own colour from `colours` {value: (r, g, b)} with stripes of its own period, pixel noise."""
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([90 + 60 * yy, 110 + 40 * xx, 100 + 30 * (xx - yy)], -1)
    for value, colour in colours.items():
        m = labels == value
        stripes = 25 * np.sin(2 * np.pi * (xx + yy) * max(h, w) / (5 + value % 7))
        img[m] = np.asarray(colour, np.float64) + stripes[m, None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(rng, box):
    """A random convex-ish polygon (flat COCO list x0, y0, x1, y1, …) inside box (x0, y0, x1, y1), 5–9 vertices."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    t = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 10)))
    r = rng.uniform(0.6, 0.95, t.size)
    return [round(float(v), 2) for p in zip(cx + r * rx * np.cos(t), cy + r * ry * np.sin(t)) for v in p]


def coco_like(folder, ann_name: str, n: int = 6, hw=(96, 128), seed: int = 0) -> dict:
    """Write `n` generated images with COCO instance annotations in coco-mini's layout: folder/images/NNNNNNNNNNNN.jpg
    and folder/ann_name (COCO format: `SHAPE_CATEGORIES`, one polygon object in each half of every image, and in
    the first image a crowd region as an uncompressed RLE — the formats `eval_where_what.label_map` reads).
    Objects never overlap, so the painting order does not matter. Returns {file name: `[H, W]` int32 map of
    category ids, 0 background}: the ground truth the annotations describe (polygons rasterised by PIL)."""
    import json

    from PIL import Image, ImageDraw

    h, w = hw
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = {c["id"]: tuple(int(v) for v in rng.integers(0, 256, 3)) for c in SHAPE_CATEGORIES}
    images, anns, truth = [], [], {}
    for i in range(n):
        image_id, name = 1000 + i, f"{1000 + i:012d}.jpg"
        lab = np.zeros((h, w), np.int32)
        halves = ((1, 1, w // 2 - 1, h - 1), (w // 2 + 1, 1, w - 2, h - 1))
        if i == 0:      # leave a strip at the bottom for the crowd region
            halves = tuple((x0, y0, x1, 2 * h // 3) for x0, y0, x1, _ in halves)
        for box in halves:
            cat = int(SHAPE_CATEGORIES[rng.integers(len(SHAPE_CATEGORIES))]["id"])
            poly = _polygon(rng, box)
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon(list(zip(poly[::2], poly[1::2])), fill=1)
            m = np.asarray(canvas, bool)
            lab[m] = cat
            xs, ys = poly[::2], poly[1::2]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "segmentation": [poly], "area": float(m.sum()),
                         "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]})
        if i == 0:
            crowd = np.zeros((h, w), bool)
            crowd[h - h // 4:h - 2, w // 4:3 * w // 4] = True
            flat = crowd.T.reshape(-1)      # COCO RLE: column-major runs, starting with a run of 0
            edges = np.flatnonzero(np.diff(np.r_[0, flat.astype(np.int8), 0]))
            counts = np.diff(np.r_[0, edges, flat.size]).tolist()
            lab[crowd] = 1
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 1,
                         "segmentation": {"counts": counts, "size": [h, w]}, "area": float(crowd.sum()),
                         "bbox": [w // 4, h - h // 4, w // 2, h // 4 - 2]})
        Image.fromarray(_shape_photo(rng, lab, colours)).save(os.path.join(folder, "images", name), quality=92)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        truth[name] = lab
    with open(os.path.join(folder, ann_name), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": list(SHAPE_CATEGORIES)}, f)
    return truth


def horse_like(folder, n: int = 2, hw=(90, 120), seed: int = 0) -> dict:
    """Write `n` generated images with figure-ground masks in horse-dev's layout: folder/images/horseNNN.jpg and
    folder/masks/horseNNN.jpg (greyscale JPEG, 255 foreground; at 2/3 of the image's resolution, the same aspect
    ratio — horse-dev's masks are not always at the image's size either). Returns {file name: `[H, W]` bool}, the
    foreground at the image's resolution."""
    from PIL import Image, ImageDraw

    h, w = hw
    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for i in range(n):
        name = f"horse{i + 1:03d}.jpg"
        poly = _polygon(rng, (w * 0.2, h * 0.2, w * 0.8, h * 0.9))
        small = Image.new("L", (2 * w // 3, 2 * h // 3), 0)
        ImageDraw.Draw(small).polygon([(x * 2 / 3, y * 2 / 3) for x, y in zip(poly[::2], poly[1::2])], fill=255)
        small.save(os.path.join(folder, "masks", name), quality=95)
        fg = np.asarray(small.resize((w, h), Image.Resampling.NEAREST)) > 127
        Image.fromarray(_shape_photo(rng, fg.astype(np.int32), {1: (150, 90, 40)})).save(
            os.path.join(folder, "images", name), quality=92)
        truth[name] = fg
    return truth
