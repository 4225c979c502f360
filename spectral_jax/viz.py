"""Pictures of eigenvectors and segments, as uint8 RGB arrays, and an atomic PNG writer. PIL only.

Shape legend
    (H, W)  an image's size in pixels; images are uint8 `[H, W, 3]` (RGB) or `[H, W]` (grey)
    K       eigenvectors `[K, h, w]` on the grid (h, w); labels `[h, w]` int; masks `[h, w]` bool
    M       instance masks

Maps on the (h, w) grid are resized to the image with `analysis.upsample`: nearest for labels and masks,
bilinear for continuous maps. Colours: `palette(n)` gives segment i the colour i (the same label gets the same
colour in every picture); `colormap(name)` is a 256-entry lookup table.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from spectral_jax import analysis
from spectral_jax.files import write_atomic
from spectral_jax.errors import InputError

__all__ = [
    "palette", "colormap", "overlay_segments", "pca_image", "eigvec_grid", "eigvec_titles", "instance_image",
    "side_by_side", "dataset_figure", "save_png", "dataset_segments_figure", "attribution_figure",
]

# 20 well-separated colours (RGB); segments beyond 20 get golden-ratio hues (`palette`).
_BASE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
], np.uint8)

# Anchors of the diverging map at positions 0, ¼, ½, ¾, 1: dark blue, blue, near-white, red, dark red.
_DIVERGING = np.array([(20, 40, 120), (60, 120, 200), (245, 245, 245), (210, 80, 60), (120, 10, 20)], np.float64)


def palette(n: int) -> np.ndarray:
    """`[n, 3]` uint8 distinct colours; entry i is fixed whatever n is."""
    if n <= len(_BASE):
        return _BASE[:n].copy()
    extra = []
    for i in range(n - len(_BASE)):
        hue = (0.13 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.55 + 0.4 * (i % 2), 0.95 - 0.3 * ((i // 2) % 2))
        extra.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.concatenate([_BASE, np.array(extra, np.uint8)])


def colormap(name: str = "diverging") -> np.ndarray:
    """`[256, 3]` uint8 lookup table. "diverging": blue (0) → white (½) → red (1), symmetric about the middle, for
    signed maps scaled so that 0 sits at ½; "gray": black → white."""
    pos = np.linspace(0.0, 1.0, 256)
    if name == "diverging":
        anchors = np.linspace(0.0, 1.0, len(_DIVERGING))
        lut = np.stack([np.interp(pos, anchors, _DIVERGING[:, c]) for c in range(3)], 1)
    elif name == "gray":
        lut = np.repeat(255.0 * pos[:, None], 3, 1)
    else:
        raise InputError("cmap", f"unknown colour map {name!r}", "use 'diverging' or 'gray'")
    return np.rint(lut).astype(np.uint8)


def _image(image, name: str = "image") -> np.ndarray:
    """Validate a uint8 `[H, W, 3]` or `[H, W]` image; returns `[H, W, 3]`."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise InputError(name, f"must be uint8, got {a.dtype}",
                         "convert with np.clip(x * 255, 0, 255).astype(np.uint8)")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, 2)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(name, f"must be [H, W, 3] RGB or [H, W] grey, got shape {a.shape}",
                         "drop alpha: image[..., :3]")
    return a


def _boundaries(labels: np.ndarray, width: int) -> np.ndarray:
    """`[H, W]` bool: pixels whose right or lower neighbour has another label, thickened to `width` pixels."""
    b = np.zeros(labels.shape, bool)
    dx = labels[:, :-1] != labels[:, 1:]
    dy = labels[:-1, :] != labels[1:, :]
    b[:, :-1] |= dx
    b[:-1, :] |= dy
    for _ in range(max(width, 1) - 1):  # dilate by one pixel right and down per step
        b[:, 1:] |= b[:, :-1].copy()
        b[1:, :] |= b[:-1, :].copy()
    return b


def overlay_segments(image, labels, alpha: float = 0.5, boundary_color=(255, 255, 255),
                     boundary_width: int = 1) -> np.ndarray:
    """Segments painted over an image: uint8 `[H, W, 3]`.

    labels `[h, w]` int (any grid; resized to the image by nearest neighbour): label i ≥ 0 gets `palette` colour i,
    blended as (1 − alpha)·image + alpha·colour; negative labels are left unpainted. Pixels where the label changes
    are drawn in `boundary_color`, `boundary_width` pixels wide (0: none).
    """
    img = _image(image)
    lab = np.asarray(labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise InputError("labels", f"must be an int [h, w] map, got {lab.dtype} {lab.shape}", "pass segment()'s output")
    if not 0.0 <= alpha <= 1.0:
        raise InputError("alpha", f"must be in [0, 1], got {alpha}", "e.g. alpha=0.5")
    H, W = img.shape[:2]
    lab = analysis.upsample(lab, (H, W), mode="nearest")
    colours = palette(max(int(lab.max()) + 1, 1)).astype(np.float64)
    out = img.astype(np.float64)
    valid = lab >= 0
    out[valid] = (1.0 - alpha) * out[valid] + alpha * colours[lab[valid]]
    if boundary_width > 0:
        out[_boundaries(lab, boundary_width)] = boundary_color
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _size(size, default: tuple[int, int]) -> tuple[int, int]:
    if size is None:
        return default
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(s) for s in size)
    return h, w


def pca_image(eigvecs, size=None, skip_first: bool = True, resample: str = "bilinear", *, eigvals=None,
              t: float = 1.0) -> np.ndarray:
    """Eigenvectors 2–4 of `[K, h, w]` as RGB (`analysis.pca_rgb`: weighted by eigvals^t when given, one shared
    scale) as uint8 `[H, W, 3]`, resized to `size` = (H, W) (or an int for a square; None keeps (h, w)) with
    `resample` ("bilinear", "bicubic" or "nearest")."""
    rgb = analysis.pca_rgb(eigvecs, skip_first, eigvals=eigvals, t=t)
    H, W = _size(size, rgb.shape[:2])
    up = analysis.upsample(rgb, (H, W), mode=resample)
    return np.rint(np.clip(up, 0.0, 1.0) * 255.0).astype(np.uint8)


def _font():
    return ImageFont.load_default()


def _text_height(font) -> int:
    bottom = font.getbbox("0123456789#.:-")[3]
    return int(bottom) + 3


_TITLE_GAP = 6  # pixels of white at least between one tile's title and the next


def eigvec_titles(K: int, eigvals=None) -> list[str]:
    """The titles `eigvec_grid` writes over K eigenvectors: "#1" … "#K", counted from 1 (the README's numbering:
    eigenvector 1 is the trivial one, `pca_image` shows 2–4), with eigenvalue i as "#i: 0.9731" when `eigvals` `[K]`
    is given. A colon, not a bare space, separates the two numbers, so "#1: 0.5902" cannot read as "#10.5902"."""
    lam = None if eigvals is None else np.asarray(eigvals, np.float64).reshape(-1)
    return [f"#{i + 1}" if lam is None else f"#{i + 1}: {lam[i]:.4f}" for i in range(K)]


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` broken at spaces into lines each at most `width` pixels long in `font` (a word longer than a line is
    broken between characters); " ".join of the lines gives `text` back when no word had to be broken."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        cand = word if not line else f"{line} {word}"
        if font.getlength(cand) <= width:
            line = cand
            continue
        if line:
            lines.append(line)
        line = ""
        for ch in word:  # the word alone: break it where it must
            if line and font.getlength(line + ch) > width:
                lines.append(line)
                line = ""
            line += ch
    lines.append(line)
    return lines


def eigvec_grid(eigvecs, size_per_tile=64, cols: int | None = None, cmap: str = "diverging", eigvals=None,
                titles: bool = True, pad: int = 2, resample: str = "bilinear") -> np.ndarray:
    """Every eigenvector of `[K, h, w]` as a coloured tile, in a grid: uint8 `[rows·(th + title + pad) + pad,
    cols·(tw + pad) + pad, 3]` on white.

    size_per_tile: int or (th, tw). cols: tiles per row (default min(K, 8)). Each tile v is scaled by its own
    max|v| so that 0 is the middle of `cmap` ("diverging": negative blue, positive red; "gray") — a sign flip of
    v mirrors its colours. With `titles`, each tile is headed by `eigvec_titles` ("#1", "#2", … counted from 1 as
    in the README, the first being the trivial vector; "#2: 0.9731" with `eigvals`) in PIL's default font. Titles
    are never cut or run together: where the widest title (plus a 6-pixel gap) is wider than tw — narrow tiles of
    tall images — every cell is widened to fit it (tw + pad becomes that width + pad) and the tile sits at the
    cell's left; the tiles themselves keep their size.
    """
    e = np.asarray(eigvecs)
    if e.ndim != 3 or not np.issubdtype(e.dtype, np.floating) or not np.all(np.isfinite(e)):
        raise InputError("eigvecs", f"must be finite float [K, h, w], got {e.dtype} {e.shape}",
                         "pass result.eigvecs[b]")
    K = e.shape[0]
    th, tw = _size(size_per_tile, e.shape[1:])
    cols = min(K, 8) if cols is None else int(cols)
    if cols < 1 or th < 1 or tw < 1 or pad < 0:
        raise InputError("cols/size_per_tile/pad", f"need cols, tile size >= 1 and pad >= 0, got {cols}, "
                         f"{(th, tw)}, {pad}", "e.g. cols=5, size_per_tile=64, pad=2")
    lam = None if eigvals is None else np.asarray(eigvals, np.float64).reshape(-1)
    if lam is not None and lam.shape[0] != K:
        raise InputError("eigvals", f"must hold {K} values, got {lam.shape[0]}", "pass the matching eigvals")
    lut = colormap(cmap)
    font = _font() if titles else None
    title_h = _text_height(font) if titles else 0
    texts = eigvec_titles(K, lam) if titles else []
    text_w = max((int(np.ceil(font.getlength(t))) + 1 + _TITLE_GAP for t in texts), default=0)
    rows = -(-K // cols)
    cell_h, cell_w = th + title_h + pad, max(tw, text_w) + pad
    canvas = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, np.uint8)
    for i in range(K):
        v = e[i].astype(np.float64)
        scale = np.abs(v).max()
        up = analysis.upsample(v, (th, tw), mode=resample)
        x = 0.5 + 0.5 * up / scale if scale > 0 else np.full((th, tw), 0.5)
        idx = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.int64)
        r, c = divmod(i, cols)
        y0, x0 = r * cell_h + pad + title_h, c * cell_w + pad
        canvas[y0 : y0 + th, x0 : x0 + tw] = lut[idx]
    if titles:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for i, text in enumerate(texts):
            r, c = divmod(i, cols)
            draw.text((c * cell_w + pad + 1, r * cell_h + pad), text, fill=(0, 0, 0), font=font)
        canvas = np.asarray(img).copy()
    return canvas


def instance_image(image, masks: Sequence, alpha: float = 0.5, boundary_color=(255, 255, 255),
                   boundary_width: int = 1) -> np.ndarray:
    """Instance masks painted over an image: uint8 `[H, W, 3]`.

    masks: M bool `[h, w]` arrays (any grid; resized by nearest neighbour), best first — mask m gets `palette`
    colour m + 1 (colour 0 is left for background) and is painted over the masks after it; each outline is drawn in
    `boundary_color`. Pixels in no mask keep the image.
    """
    img = _image(image)
    H, W = img.shape[:2]
    owner = np.full((H, W), -1, np.int64)
    for m in range(len(masks) - 1, -1, -1):
        mk = np.asarray(masks[m])
        if mk.ndim != 2 or mk.dtype != bool:
            raise InputError(f"masks[{m}]", f"must be a bool [h, w] mask, got {mk.dtype} {mk.shape}",
                             "pass instance_masks()'s masks")
        owner[analysis.upsample(mk, (H, W), mode="nearest")] = m
    colours = palette(len(masks) + 1)[1:].astype(np.float64)
    out = img.astype(np.float64)
    inside = owner >= 0
    out[inside] = (1.0 - alpha) * out[inside] + alpha * colours[owner[inside]]
    if boundary_width > 0 and len(masks):
        out[_boundaries(owner, boundary_width)] = boundary_color
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def side_by_side(images: Sequence, pad: int = 4, background: int = 255, titles: Sequence[str] | None = None
                 ) -> np.ndarray:
    """Images in a row, top-aligned, `pad` pixels apart and around, for a summary panel: uint8
    `[max H (+ title) + 2·pad, Σ wᵢ + (n + 1)·pad, 3]`, wᵢ the width of image i's column. Grey images become RGB.

    `titles` (one per image) are written above the images in PIL's default font, one line each, and are never cut
    or run together: a column is as wide as its image, or as its title's ink plus a 6-pixel gap where the title is
    wider (narrow images, e.g. the panel of a tall image); the image keeps its size and sits at the column's left,
    white on its right. Without titles (or with titles narrower than their images) wᵢ is the image's width."""
    imgs = [_image(im, f"images[{i}]") for i, im in enumerate(images)]
    if not imgs:
        raise InputError("images", "is empty", "pass at least one image")
    if titles is not None and len(titles) != len(imgs):
        raise InputError("titles", f"has {len(titles)} entries for {len(imgs)} images", "give one title per image")
    texts = [str(t) for t in titles] if titles else []
    font = _font() if texts else None
    boxes = [font.getbbox(t) for t in texts]                    # (left, top, right, bottom) of the ink drawn at (0, 0)
    title_h = max([_text_height(font)] + [int(np.ceil(b[3])) + 1 for b in boxes]) if texts else 0
    widths = [im.shape[1] for im in imgs]
    for i, b in enumerate(boxes):                               # a title wider than its image widens the column
        widths[i] = max(widths[i], int(np.ceil(b[2])) + max(0, -int(np.floor(b[0]))) + _TITLE_GAP)
    H = max(im.shape[0] for im in imgs) + title_h + 2 * pad
    W = sum(widths) + (len(imgs) + 1) * pad
    canvas = np.full((H, W, 3), background, np.uint8)
    x, xs = pad, []
    for im, w in zip(imgs, widths):
        canvas[pad + title_h : pad + title_h + im.shape[0], x : x + im.shape[1]] = im
        xs.append(x)
        x += w + pad
    if texts:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for x0, b, t in zip(xs, boxes, texts):  # ink left of the origin (an "s" reaches -1) goes into the pad
            draw.text((max(x0, -int(np.floor(b[0]))), pad), t, fill=(0, 0, 0), font=font)
        canvas = np.asarray(img).copy()
    return canvas


def dataset_figure(eigvecs, thumbs: Sequence[np.ndarray] | None = None, *, num_vecs: int = 15, tile: int = 48,
                   cols: int = 4, titles: bool = True) -> np.ndarray:
    """A dataset run's picture (the paper's): per image `[n, K, h, w]`, eigenvectors (1,2,3) → RGB, (4,5,6) → RGB,
    … (`num_vecs // 3` tiles), after the image itself (`thumbs`, uint8 `[tile, tile, 3]`), cells in a grid `cols`
    images wide.

    Each eigenvector is mapped to [0, 1] by its 1st and 99th percentiles over all shown images (one colour scale
    for the whole figure, so equal colours mean equal values in every image). Tiles are nearest-upsampled.
    """
    e = np.asarray(eigvecs, np.float64)
    n, k = e.shape[:2]
    groups = max(1, min(num_vecs, k) // 3)
    ch = np.zeros((n, groups * 3, *e.shape[2:]))
    ch[:, :min(k, groups * 3)] = e[:, :groups * 3]
    lo = np.percentile(ch, 1, axis=(0, 2, 3))[None, :, None, None]
    hi = np.percentile(ch, 99, axis=(0, 2, 3))[None, :, None, None]
    ch = np.clip((ch - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0)
    per = groups + (thumbs is not None)
    gap, cell_gap = 1, 6
    cell_w = per * (tile + gap) - gap
    rows = -(-n // cols)
    head = 14 if titles else 0
    canvas = np.full((head + rows * (tile + cell_gap), cols * (cell_w + cell_gap), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = head + r * (tile + cell_gap), c * (cell_w + cell_gap)
        tiles = [] if thumbs is None else [np.asarray(thumbs[i], np.uint8)]
        for g in range(groups):
            rgb = np.transpose(ch[i, 3 * g:3 * g + 3], (1, 2, 0))
            img = Image.fromarray(np.rint(rgb * 255).astype(np.uint8)).resize((tile, tile), Image.Resampling.NEAREST)
            tiles.append(np.asarray(img))
        for j, t in enumerate(tiles):
            canvas[y:y + tile, x + j * (tile + gap):x + j * (tile + gap) + tile] = t
    if titles:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        labels = (["image"] if thumbs is not None else []) + [f"{3 * g + 1}-{3 * g + 3}" for g in range(groups)]
        for c in range(min(cols, n)):
            for j, lab in enumerate(labels):
                draw.text((c * (cell_w + cell_gap) + j * (tile + gap) + 2, 1), lab, fill=(0, 0, 0), font=_font())
        canvas = np.asarray(img).copy()
    return canvas


def save_png(path: str, array) -> None:
    """Write uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` (or a bool mask, written as 0/255 grey) to `path` as PNG,
    atomically: a temporary file in the same directory, then `os.replace`, so readers never see half a file.
    zlib level 1: fast, files somewhat larger than PIL's default level 6 (benchmarks/results/history.md)."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise InputError("array", f"must be uint8 (or bool), got {a.dtype}",
                         "convert with np.clip(x * 255, 0, 255).astype(np.uint8)")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError("array", f"must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}", "check the image")
    img = Image.fromarray(np.ascontiguousarray(a))
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG", compress_level=1))


SEGMENTS_HEADING = "segment ids (one colour per segment, the same in every image):"  # dataset_segments_figure's legend


def dataset_segments_figure(labels, thumbs: Sequence[np.ndarray] | None = None, num_segments: int | None = None, *,
                            tile: int = 64, cols: int = 10, alpha: float = 0.55, gap: int = 4) -> np.ndarray:
    """Dataset-wide segments of n images in one picture: uint8 `[rows·(tile + gap) + legend, cols·(tile + gap), 3]`.

    labels `[n, h, w]` int (segment ids shared by all images, `dataset.cluster.Segments.labels`); thumbs: uint8
    `[tile, tile, 3]` per image (None: mid-grey tiles). Each image gets its segments painted over it
    (`overlay_segments`: segment j in `palette` colour j in every image, white boundaries), `cols` images per row;
    below, a legend: a heading (`SEGMENTS_HEADING`, wrapped onto as many lines as the figure's width needs, so it is
    never cut) and one swatch per segment id 0 … `num_segments` − 1 (default: the largest label + 1).
    """
    lab = np.asarray(labels)
    if lab.ndim != 3 or not np.issubdtype(lab.dtype, np.integer) or lab.shape[0] < 1:
        raise InputError("labels", f"must be int [n, h, w] with n ≥ 1, got {lab.dtype} {lab.shape}",
                         "pass dataset segments' labels")
    n = lab.shape[0]
    if thumbs is not None:
        if len(thumbs) != n:
            raise InputError("thumbs", f"has {len(thumbs)} images for {n} label maps", "give one thumbnail per image")
        tile = _image(thumbs[0], "thumbs[0]").shape[0]
    k = int(lab.max()) + 1 if num_segments is None else int(num_segments)
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    font = _font()
    text_h = _text_height(font)
    entry_w = max(30, int(font.getlength(str(max(k - 1, 0)))) + text_h + 8)
    per_line = max(1, (cols * (tile + gap)) // entry_w)
    heading = _wrap(SEGMENTS_HEADING, font, cols * (tile + gap) - 4)
    legend_h = gap + len(heading) * text_h + -(-k // per_line) * (text_h + 2)
    canvas = np.full((rows * (tile + gap) + legend_h, cols * (tile + gap), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        base = np.full((tile, tile, 3), 128, np.uint8) if thumbs is None else _image(thumbs[i], f"thumbs[{i}]")
        canvas[r * (tile + gap):r * (tile + gap) + tile, c * (tile + gap):c * (tile + gap) + tile] = \
            overlay_segments(base, lab[i], alpha=alpha, boundary_width=1)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    y0 = rows * (tile + gap) + gap
    for i, line in enumerate(heading):
        draw.text((2, y0 + i * text_h), line, fill=(0, 0, 0), font=font)
    colours = palette(max(k, 1))
    for j in range(k):
        r, c = divmod(j, per_line)
        x, y = c * entry_w + 2, y0 + len(heading) * text_h + r * (text_h + 2)
        draw.rectangle([x, y + 1, x + text_h - 3, y + text_h - 3], fill=tuple(int(v) for v in colours[j]),
                       outline=(0, 0, 0))
        draw.text((x + text_h, y), str(j), fill=(0, 0, 0), font=font)
    return np.asarray(img).copy()


NAN_FILL, NAN_HATCH = (150, 150, 150), (70, 70, 70)  # attribution_figure's missing (NaN) cells: grey, hatched
ATTRIBUTION_CAPTION = "-1 blue, 0 white, +1 red; grey hatched: missing (NaN)"


def attribution_figure(att, cell: int = 14) -> np.ndarray:
    """Heat maps of an `analysis.Attribution`, one row per layer (in `att.layers` order, index written on the left),
    side by side: the joint eigenvectors' Rayleigh quotients per layer × eigenvector (mean over heads and
    timesteps) and per layer × graph (heads, timestep-major; mean over eigenvectors 2..K), the layer's own
    eigenvalues × k, and cos² of the principal angles to the joint subspace × angle (means over timesteps). One
    diverging scale for all: −1 blue, 0 white, +1 red (every value shown lies in [−1, 1]). Missing entries (NaN: a
    layer with fewer eigenvectors or angles than K) are grey with a dark diagonal hatch (`NAN_FILL`, `NAN_HATCH`;
    neither colour is on the diverging scale), so they never read as 0; a caption under the maps says so. A map
    narrower than its title gets white on its right. uint8 `[H, W, 3]`."""
    lut = colormap("diverging")
    font = _font()
    label_w = 6 * len(str(int(np.max(att.layers)))) + 6
    hatch = (np.add.outer(np.arange(cell), np.arange(cell)) % 4) == 0  # [cell, cell] diagonal lines

    def heat(m):
        m = np.asarray(m, np.float64)
        missing = np.isnan(m)
        idx = np.rint(np.clip(0.5 + 0.5 * np.nan_to_num(m, nan=0.0), 0.0, 1.0) * 255.0).astype(np.int64)
        img = np.repeat(np.repeat(lut[idx], cell, 0), cell, 1)
        for r, c in zip(*np.nonzero(missing)):
            block = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            block[:] = NAN_FILL
            block[hatch] = NAN_HATCH
        out = np.full((img.shape[0], img.shape[1] + label_w, 3), 255, np.uint8)
        out[:, label_w:] = img
        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil)
        for r, layer in enumerate(att.layers):
            draw.text((1, r * cell + max(0, (cell - 10) // 2)), str(int(layer)), fill=(0, 0, 0), font=font)
        return np.asarray(pil)

    mean_t = analysis.layerwise.nanmean
    panels = [heat(att.layer_rq), heat(att.head_rq), heat(mean_t(att.eigvals, 1)),
              heat(mean_t(np.cos(att.angles) ** 2, 1))]
    titles = ["RQ eigvec", "RQ head", "own eigvals", "cos2 to joint"]
    fig = side_by_side(panels, titles=titles)  # a panel narrower than its title gets white on its right
    text_h = _text_height(font)
    lines = _wrap(ATTRIBUTION_CAPTION, font, fig.shape[1] - 8)
    strip = np.full((len(lines) * text_h + 4, fig.shape[1], 3), 255, np.uint8)
    pil = Image.fromarray(strip)
    draw = ImageDraw.Draw(pil)
    for i, line in enumerate(lines):
        draw.text((4, i * text_h), line, fill=(0, 0, 0), font=font)
    return np.concatenate([fig, np.asarray(pil)], 0)
