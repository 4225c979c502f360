"""A dataset run's inputs checked before any work (one `InputError` line naming the input and the fix): OUT
against FOLDER and the disk, K and k against the graph of a batch, a folder without a readable image.
Imports no JAX.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from spectral_jax import folder as F
from spectral_jax.dataset.settings import Settings
from spectral_jax.errors import InputError

OUTPUT_NAMES = {"eigvecs.npz": "file", "eigvecs.png": "file", "segments.npz": "file", "segments.png": "file",
                "summary.json": "file", "checkpoints": "folder"}


def check_out(folder: str, out: str) -> None:
    """Refuse, before any work, an OUT the run could not fill or that would mix with its input.

    OUT must be outside FOLDER (not equal, not inside: a later scan of FOLDER would read the run's eigvecs.png as an
    image); not an existing file or link to nothing; not under a regular file; writable (a probe file is created
    and removed in OUT, or in its nearest existing parent when OUT is new); and the names the run writes
    (`OUTPUT_NAMES`) must not exist there as the other kind (a folder named summary.json, a file named checkpoints).
    """
    if not out.strip():
        raise InputError(f"--out {out!r}", "is empty", "pass the path of a folder for the results")
    real_out, real_in = os.path.realpath(out), os.path.realpath(folder)
    if real_out == real_in or F._inside(real_out, real_in):
        raise InputError(f"--out {out}", "is the input folder" if real_out == real_in else
                         f"is inside the input folder {folder}",
                         "choose an --out outside FOLDER (the next run would scan this run's outputs as images)")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}", "exists and is not a folder", "pass a new or existing folder for --out")
    here = os.path.abspath(out)
    while not os.path.lexists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise InputError(f"--out {out}", f"{here} is a file, so no folder can be made under it",
                         "choose an --out whose parent folders are folders")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spectral-jax-probe-", dir=here)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--out {out}", f"cannot write in {here} ({e.strerror or e})",
                         "choose a folder you can write to for --out") from None
    for name, kind in OUTPUT_NAMES.items():
        path = os.path.join(out, name)
        if os.path.lexists(path) and os.path.isdir(path) != (kind == "folder"):
            raise InputError(path, f"exists and is not a {kind}", "remove it, or choose another --out")


def check_layer_weights(settings: Settings, tapped) -> None:
    """{layer: weight} pairs must name tapped layers (`tapped`: their indices; None skips the check): a weight on a
    layer the run does not tap would be dropped silently."""
    if tapped is None or settings.layer_weights is None or isinstance(settings.layer_weights, str):
        return
    tapped = sorted(int(i) for i in tapped)
    bad = [layer for layer, _ in settings.layer_weights if layer not in tapped]
    if bad:
        raise InputError(f"--layer-weights {','.join(f'{l}:{w:g}' for l, w in settings.layer_weights)}",
                         f"names layer{'s' * (len(bad) > 1)} {', '.join(map(str, bad))}, which the run does not tap",
                         f"weigh tapped layers only ({', '.join(map(str, tapped))}), or add them to --layers")


def no_images(folder: str, files: list[str], example: str) -> InputError:
    """The error of a folder none of whose image files can be read."""
    return InputError(folder, f"has no readable images: none of its {len(files)} image files can be read "
                      f"(e.g. {example})", "check the files (complete JPEG/PNG/WebP images?) or pass another folder")


def check_graph_size(settings: Settings, tokens: int, num_images: int, k_effective: tuple[int, int]) -> None:
    """K and k against one graph — the whole dataset's (exact) or one batch's, min(B, images) images (gd) — of
    `tokens` per image (N of the coarsest tapped grid).

    K < the whole graph's nodes (exact), K ≤ the batch graph's nodes (gd) (a graph has no more eigenvectors than nodes); a given k_intra ≤ N, a given k_inter
    ≤ the tokens of the other images of a batch (defaults are capped instead); and some edge must remain.
    """
    per = tokens
    exact = settings.method == "exact"
    imgs = num_images if exact else min(settings.batch_size, num_images)
    nodes, others = imgs * per, (imgs - 1) * per
    shape = f"{imgs} image{'s' if imgs > 1 else ''} × {per} tokens"
    where = "the whole dataset's graph" if exact else "a batch's graph"
    if exact and settings.num_eigs >= nodes:
        raise InputError("--num-eigs", f"{settings.num_eigs} is not below the {nodes} nodes of {where} ({shape})",
                         f"pass --num-eigs < {nodes}, or give the graph more nodes (more images or a larger --size)")
    if settings.num_eigs > nodes:
        raise InputError("--num-eigs", f"{settings.num_eigs} is more than the {nodes} nodes of {where} "
                         f"({shape})", f"pass --num-eigs ≤ {nodes}, or give the graph more nodes (more images, a "
                         "larger --batch-size or --size)")
    if settings.k_intra is not None and settings.k_intra > per:
        raise InputError("--k-intra", f"{settings.k_intra} is more than the {per} tokens of an image",
                         f"pass --k-intra ≤ {per}")
    if settings.k_inter is not None and settings.k_inter > others:
        raise InputError("--k-inter", f"{settings.k_inter} is more than the {others} tokens of the other images in "
                         f"{'the dataset' if exact else 'a batch'} ({shape})", f"pass --k-inter ≤ {others}" + (
                             "" if others else " (more images or a larger --batch-size give it some)"))
    if min(k_effective[0], per) + min(k_effective[1], others) == 0:
        raise InputError("--k-intra/--k-inter", f"leave the graph no edges (k_intra {settings.k[0]}, and {others} "
                         f"tokens in other images of a batch: {shape})", "pass --k-intra ≥ 1")


def discard(path: str | None, process_index: int = 0) -> None:
    """Remove a folder this run made (process 0 only; on a shared disk the others see it go)."""
    if path is not None and process_index == 0:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["OUTPUT_NAMES", "check_graph_size", "check_out", "discard", "no_images"]
