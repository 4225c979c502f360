"""Image input: read any common image file as 8-bit RGB, resize it to a patch-multiple size, normalise it.

`load_image(path)` → uint8 `[H, W, 3]` (EXIF orientation applied; alpha composited on white, as the
`transformers` processors' `convert_rgb` does; 16-bit scaled to 8-bit; CMYK/palette/greyscale converted).
`target_size((H, W), size, patch)` → output (H', W'): `size=S` makes the shorter side S rounded down to a multiple
of `patch` and keeps the aspect ratio (the longer side is rounded down to a multiple of `patch` too);
`size=(H', W')` is taken as it is (each a multiple of `patch`).
`parse_size(size)` is the one reader of a size, for the API and every CLI command: an int S, "S", "HxW", or (H, W).
Sizes are capped: an image whose patch grid would exceed `max_tokens()` tokens (default 16384 = a 128×128 grid,
e.g. 1792² pixels at patch 14; set SPECTRAL_JAX_MAX_TOKENS to change it) is refused before it is resized, since a
ViT's attention at N tokens holds heads·N² floats (6.4 GB per layer for DINOv2-S at the cap).
`open_regular(path, what, fix)` opens an input file for reading, refusing (without blocking) anything that is not a
regular file: a FIFO, a device such as /dev/urandom, a socket.
`preprocess(img, size, patch, mean, std, resample)` → float32 `[H', W', 3]` = (resize(img)/255 − mean)/std, the
resize PIL's `resample` filter on the 8-bit image (one of `RESAMPLE_FILTERS`; default "bicubic"), as the reference
image processors do: transformers' PIL processors resize the uint8 image with PIL's filter (antialiased when
shrinking), diffusers' `VaeImageProcessor` with PIL's Lanczos. Each model's filter is `PreprocessSpec.resample`.
Every problem a user's file can cause raises `InputError` naming the file; an image with a side of 0 pixels is one.
A small image is enlarged as any other (results for it do not change), but `preprocess` says so in one
`UpscaleWarning` line naming the file, its size and the factor, where the resize enlarges a side more than
`UPSCALE_WARN` (4) times or the image is smaller than one patch on a side: the model then sees interpolated pixels,
not detail. (Once a file; the first `UPSCALE_NAMED` files so warned are named, the rest of a process's share a line.)
"""

from __future__ import annotations

import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from spectral_jax.errors import InputError, is_integer

Size = int | tuple[int, int]

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "chelsea.png")
SAMPLE_CREDIT = "Chelsea the cat — Stefan van der Walt, CC0 (scikit-image sample data)"

DEFAULT_MAX_TOKENS = 16384

UPSCALE_WARN = 4.0   # `preprocess` warns where the resize enlarges a side more than this many times ...
UPSCALE_NAMED = 5    # ... naming at most this many images a process (a folder of thumbnails: not one line each)


class UpscaleWarning(UserWarning):
    """`preprocess` enlarged an image many-fold (more than `UPSCALE_WARN` times) or one smaller than a patch: the
    model sees interpolated pixels. Silence it with `warnings.simplefilter("ignore", io.UpscaleWarning)`."""


_NAMED: set[str | None] = set()   # the images an UpscaleWarning has named; None once it said the rest are not named

# The resize filters a model's preprocessing may name (`PreprocessSpec.resample`) → PIL's.
RESAMPLE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                    "lanczos": Image.Resampling.LANCZOS}


def check_resample(resample, what: str = "resample") -> str:
    """`resample` if it names one of `RESAMPLE_FILTERS`, else `InputError`."""
    if not isinstance(resample, str) or resample not in RESAMPLE_FILTERS:
        raise InputError(f"{what} {resample!r}", "is not a resize filter",
                         f"use one of: {', '.join(RESAMPLE_FILTERS)}")
    return resample


def max_tokens() -> int:
    """The token cap: SPECTRAL_JAX_MAX_TOKENS if set (a positive integer), else `DEFAULT_MAX_TOKENS`."""
    return env_cap("SPECTRAL_JAX_MAX_TOKENS", DEFAULT_MAX_TOKENS, 65536)


def env_cap(name: str, default: int, example: int) -> int:
    """A cap the environment may change: variable `name` if set (a positive integer), else `default`; any other
    value is an `InputError` naming it (`example`: a value the fix suggests)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        n = int(text)
        if n < 1:
            raise ValueError
    except ValueError:
        raise InputError(f"{name}={text!r}", "is not a positive integer",
                         f"unset it (default {default}) or set e.g. {example}") from None
    return n


def parse_size(size, what: str = "size") -> Size:
    """An int S / "S" (shorter side) or (H, W) / "HxW" → S or (H, W), checked to be positive integers."""
    fix = "pass e.g. 448 (shorter side) or 448x672 / (448, 672)"
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", size)
        if not m:
            raise InputError(f"{what} {size!r}", "is not S or HxW", fix)
        size = int(m.group(1)) if m.group(2) is None else (int(m.group(1)), int(m.group(2)))
    if isinstance(size, (bool, np.bool_)):
        raise InputError(f"{what} {size!r}", "is not S or HxW", fix)
    if isinstance(size, (int, np.integer)):
        if size < 1:
            raise InputError(f"{what} {size}", "must be positive", fix)
        return int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            is_integer(s) for s in size):
        if min(size) < 1:
            raise InputError(f"{what} {tuple(size)}", "must be positive", fix)
        return (int(size[0]), int(size[1]))
    raise InputError(f"{what} {size!r}", "is not S or HxW", fix)


# What a path that is not a regular file is, by its stat mode (`open_regular`'s message).
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _article(what: str) -> str:
    """`what` with its indefinite article: "an ACTS .npz file", "a .npy file", "an image"."""
    return f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"


def open_regular(path: str, what: str = "file", fix: str = "pass a regular file"):
    """`path` opened for binary reading if it is a regular file (or a link to one); `InputError` naming `path` and
    `fix` otherwise: "no such file", or "is not a regular file but a FIFO (named pipe)" / a character device / ... .

    Never blocks: the file is opened non-blocking and checked with fstat on the descriptor it opened (so a FIFO with
    no writer, or a path swapped for one after a check, is refused at once, and /dev/urandom is never read).
    `what` names what the file should be ("image", ".npy file"), for the message. The caller closes the file.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise InputError(path, "no such file", "check the path") from None
    except OSError as e:
        if os.path.isdir(path):  # some systems refuse to open a folder at all
            raise InputError(path, f"is a folder, not {_article(what)}", fix) from None
        raise InputError(path, f"cannot be opened ({e.strerror or type(e).__name__})", fix) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a file")
            raise InputError(path, f"is a folder, not {_article(what)}" if stat.S_ISDIR(mode) else
                             f"is not a regular file but {kind}", fix)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def digest(path: str, what: str = "file") -> bytes:
    """The first 128 bits of the sha256 of the bytes of the regular file `path` (read through `open_regular`, in
    1 MiB chunks): what a run records to tell a file changed under the same path. Raises `open_regular`'s
    InputError or the OSError of a failed read; does not cache."""
    import hashlib

    h = hashlib.sha256()
    with open_regular(path, what) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()[:16]


def load_image(path: str) -> np.ndarray:
    """Read `path` as uint8 RGB `[H, W, 3]`, EXIF orientation applied. A path that is not a regular file (a folder,
    a FIFO, a device) is refused without reading it (`open_regular`); so is a file PIL cannot identify as an image,
    and an image of more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (its decompression-bomb guard, 89478485 unless
    the caller changed it), which is not decoded: the error says how many pixels it has and how to shrink it."""
    fix = "pass a readable JPEG/PNG/TIFF/WebP/BMP image"
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(path, "is a folder, not an image", "pass image files (for a folder: spectral-jax dataset)")
    with open_regular(path, "image", fix) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    im.load()  # decode now, so a truncated file fails here
                    rgb = pil_to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _too_many_pixels(path, str(e)) from None
        except UnidentifiedImageError:
            raise InputError(path, "cannot read the image (not in a format PIL can identify: not an image, or "
                             "damaged)", fix) from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(path, f"cannot read the image ({type(e).__name__}: {e})", fix) from None
    _check_sides(rgb.shape[:2], path)
    return rgb


def _check_sides(hw, name: str) -> None:
    """`InputError` naming `name` if an image of (H, W) = `hw` has a side of 0 pixels (it has nothing to resize)."""
    if min(hw) < 1:
        raise InputError(name, f"is {hw[0]}x{hw[1]} pixels (HxW), a side of 0 pixels: nothing to resize",
                         "pass an image at least one pixel high and wide")


def _too_many_pixels(path: str, message: str) -> InputError:
    """The error of an image over PIL's pixel limit; `message`: PIL's, which holds the image's pixel count."""
    limit = Image.MAX_IMAGE_PIXELS
    m = re.search(r"\((\d+) pixels\)", message)
    has = f"has {int(m.group(1))} pixels" if m else "has more pixels than allowed"
    return InputError(path, f"{has}, over PIL's limit of {limit} (its guard against decompression bombs), so it is "
                      "not decoded; downscale it", f"shrink it to at most {limit} pixels, e.g. ImageMagick's convert "
                      f"IN -resize {limit}@ OUT (the model input is far smaller anyway)")


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image → uint8 RGB `[H, W, 3]`, EXIF orientation applied (see the module docstring)."""
    return _to_rgb(ImageOps.exif_transpose(im))


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit (or 32-bit int) greyscale
        a = np.asarray(im, np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        raise ValueError("floating-point images are not supported")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.asarray(im.convert("RGB"), np.uint8)


def target_size(hw: tuple[int, int], size: Size, patch: int, cap: int | None = None) -> tuple[int, int]:
    """Output (H', W') for an image of (H, W): see the module docstring. Raises `InputError` if below one patch,
    or if the patch grid would exceed `cap` tokens (default `max_tokens()`), or if H or W is 0."""
    _check_sides(hw, "image")
    out = _target_size(hw, parse_size(size), patch)
    cap = max_tokens() if cap is None else cap
    tokens = (out[0] // patch) * (out[1] // patch)
    if tokens > cap:
        raise InputError(f"size {out[0]}x{out[1]}", f"gives {tokens} tokens ({out[0] // patch}x{out[1] // patch} "
                         f"patches of {patch}), over the cap of {cap}", "pass a smaller --size (or HxW for a very "
                         "wide/tall image), or raise the cap with SPECTRAL_JAX_MAX_TOKENS")
    return out


def _target_size(hw: tuple[int, int], size: Size, patch: int) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        out = (int(size[0]), int(size[1]))
        if out[0] % patch or out[1] % patch or min(out) < patch:
            near = "x".join(str(max(1, s // patch) * patch) for s in out)
            raise InputError(f"size {out[0]}x{out[1]}", f"each side must be a positive multiple of the patch size "
                             f"{patch}", f"use e.g. {near}")
        return out
    h, w = hw
    short = int(size) // patch * patch
    if short < patch:
        raise InputError(f"size {size}", f"is smaller than one patch ({patch} pixels)", f"use a size >= {patch}")
    long = max(round(max(h, w) * short / min(h, w)) // patch * patch, patch)
    return (short, long) if h <= w else (long, short)


def preprocess(img: np.ndarray, size: Size, patch: int, mean, std, resample: str = "bicubic", *,
               name: str | None = None) -> np.ndarray:
    """uint8 `[H, W, 3]` → float32 `[H', W', 3]`: PIL resize with filter `resample` (a `RESAMPLE_FILTERS` name) to
    `target_size`, then (x/255 − mean)/std. An image already at the target size is not resampled.

    An image with a side of 0 pixels is an `InputError`. One enlarged more than `UPSCALE_WARN` times on a side, or
    smaller than one patch on a side, is resized all the same, with an `UpscaleWarning` (see the module docstring)
    naming it (`name`: the file or the caller's name for it; None: by its size alone)."""
    pil_filter = RESAMPLE_FILTERS[check_resample(resample)]
    _check_sides(img.shape[:2], name or "image")
    th, tw = target_size(img.shape[:2], size, patch)
    if (th, tw) != img.shape[:2]:
        _warn_upscale(img.shape[:2], (th, tw), patch, name)
        img = np.asarray(Image.fromarray(img).resize((tw, th), pil_filter))
    x = img.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def named_so_far(restore: frozenset | None = None) -> frozenset:
    """The images an `UpscaleWarning` has named in this process (a frozen copy); restore: put that record back
    first — a run refused before it gave its warnings (`pipeline.prepare`) names its images again when rerun."""
    if restore is not None:
        _NAMED.clear()
        _NAMED.update(restore)
    return frozenset(_NAMED)


def _warn_upscale(hw: tuple[int, int], out: tuple[int, int], patch: int, name: str | None) -> None:
    """The `UpscaleWarning` of `preprocess`, if resizing (H, W) = `hw` to `out` calls for one: once a process for a
    named image (a dataset reads each file once an epoch), for the first `UPSCALE_NAMED` names; then one line for
    the rest. (Python's own once-per-message rule cannot be relied on: `load_image` changes the warning filters,
    which clears what Python remembers.) An image with no name is warned about every time."""
    factor = max(out[0] / hw[0], out[1] / hw[1])     # how many times a side is enlarged (< 1: it shrinks)
    tiny = min(hw) < patch
    if factor <= UPSCALE_WARN and not tiny:
        return
    if name is not None:
        if name in _NAMED:
            return
        if len(_NAMED - {None}) >= UPSCALE_NAMED:
            if None not in _NAMED:
                _NAMED.add(None)
                warnings.warn(f"more images are enlarged over {UPSCALE_WARN:g}x (or are smaller than a {patch}-pixel "
                              f"patch) than the {UPSCALE_NAMED} named above; the rest are not named", UpscaleWarning,
                              stacklevel=3)
            return
        _NAMED.add(name)
    what = f"{name}: {hw[0]}x{hw[1]} pixels" if name else f"an image of {hw[0]}x{hw[1]} pixels"
    why = f"smaller than one {patch}-pixel patch on a side" if tiny else f"over {UPSCALE_WARN:g}x"
    warnings.warn(f"{what} (HxW) enlarged {factor:.3g}x to {out[0]}x{out[1]} ({why}): the model sees interpolated "
                  "pixels, not detail; pass a larger image or a smaller --size / size", UpscaleWarning, stacklevel=3)


def load_images(paths, size: Size, patch: int, mean, std, resample: str = "bicubic") -> np.ndarray:
    """Several files → one float32 `[B, H', W', 3]` batch (`preprocess`); they must all resize to the same
    (H', W')."""
    xs = [preprocess(load_image(p), size, patch, mean, std, resample, name=os.fspath(p)) for p in paths]
    shapes = {x.shape for x in xs}
    if len(shapes) > 1:
        raise InputError(", ".join(paths), f"resize to different sizes {sorted(s[:2] for s in shapes)}",
                         "pass --size HxW to give them one size, or process them one at a time")
    return np.stack(xs)
