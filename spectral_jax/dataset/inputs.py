"""A dataset run's inputs checked before any work (one `InputError` line naming the input and the fix): OUT
against FOLDER and the disk, the image files against what the run writes in OUT, K and k against the graph of a
batch, a folder without a readable image, the multi-process options.
Imports no JAX.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from spectral_jax import folder as F
from spectral_jax.dataset.settings import Settings
from spectral_jax.errors import InputError, is_integer

OUTPUT_NAMES = {"eigvecs.npz": "file", "eigvecs.png": "file", "segments.npz": "file", "segments.png": "file",
                "summary.json": "file", "checkpoints": "folder"}


def check_out(folder: str, out: str) -> None:
    """Refuse, before any work, an OUT the run could not fill or that would mix with its input.

    OUT must be outside FOLDER (not equal, not inside: a later scan of FOLDER would read the run's eigvecs.png as an
    image); FOLDER may lie in OUT, but not in (or be) an entry the run writes there (`written`: OUT/checkpoints,
    the exported files); OUT must not be an existing file or link to nothing; not under a regular file; writable (a
    probe file is created and removed in OUT, or in its nearest existing parent when OUT is new); and the names the
    run writes (`OUTPUT_NAMES`) must not exist there as the other kind (a folder named summary.json, a file named
    checkpoints). The image files themselves, once listed, are checked by `check_files`.
    """
    if not out.strip():
        raise InputError(f"--out {out!r}", "is empty", "pass the path of a folder for the results")
    real_out, real_in = os.path.realpath(out), os.path.realpath(folder)
    if real_out == real_in or F._inside(real_out, real_in):
        raise InputError(f"--out {out}", "is the input folder" if real_out == real_in else
                         f"is inside the input folder {folder}",
                         "choose an --out outside FOLDER (the next run would scan this run's outputs as images)")
    for path in written(out):
        if _under(real_in, os.path.realpath(path)):
            raise InputError(f"--out {out}", f"would write into the input folder {folder} (the run writes {path})",
                             "choose another --out, or move the images out of it")
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


def written(out: str) -> list[str]:
    """What a run writes in OUT (`OUTPUT_NAMES`: OUT/checkpoints and the exported files), as given."""
    return [os.path.join(out, name) for name in OUTPUT_NAMES]


def _under(real: str, target: str) -> bool:
    """Whether the real path `real` is the real path `target` or lies in it."""
    return real == target or real.startswith(target.rstrip(os.sep) + os.sep)


def check_files(folder: str, files: list[str], out: str) -> None:
    """No image file of FOLDER (`files`, relative to it, as `folder.scan` lists them) may be, through a link, an
    entry the run writes in OUT (`written`) or lie in one: the run would read it, then replace it (an earlier run's
    eigvecs.png linked into FOLDER). One `InputError` line naming the file, before any work."""
    targets = [(path, os.path.realpath(path)) for path in written(out)]
    for name in files:
        real = os.path.realpath(os.path.join(folder, name))
        for path, target in targets:
            if _under(real, target):
                raise InputError(f"--out {out}", f"would overwrite the input {os.path.join(folder, name)} (it is "
                                 f"{real}, and the run writes {path})", "choose another --out, or take the link "
                                 "out of FOLDER")


def no_images(folder: str, files: list[str], example: str) -> InputError:
    """The error of a folder none of whose image files can be read."""
    return InputError(folder, f"has no readable images: none of its {len(files)} image files can be read "
                      f"(e.g. {example})", "check the files (complete JPEG/PNG/WebP images?) or pass another folder")


def check_graph_size(settings: Settings, grids, num_images: int, base: tuple[int, int] | None = None) -> None:
    """K and k against one graph — the whole dataset's (exact) or one batch's, min(B, images) images (gd) — whose
    layer groups sit on `grids` [(h, w), ...] (one per group), with `base` the table's grid (the finest; None: the
    largest of `grids`).

    K < the nodes of the table over the whole dataset (exact), K ≤ over a batch (gd) (no more eigenvectors than
    nodes: the groups on coarser grids see the table pooled, `objective`). k is capped per group by that group's
    own tokens (`Geometry.k_of`, as `graphs.from_taps` caps it), so a given k above a coarse grid's tokens is
    taken there as all of them; a given k_intra above the tokens of an image on the finest grid, or a given
    k_inter above the other images' tokens there, fits no group and is refused (the defaults are capped
    instead); and every group's graph must keep some edge.
    """
    grids = [tuple(int(x) for x in g) for g in grids]
    fine = max(grids, key=lambda hw: hw[0] * hw[1])
    base = fine if base is None else tuple(base)
    per, nbase = fine[0] * fine[1], base[0] * base[1]
    exact = settings.method == "exact"
    imgs = num_images if exact else min(settings.batch_size, num_images)
    nodes, others = imgs * nbase, (imgs - 1) * per
    several = len(set(grids)) > 1
    of = f"an image on the finest tapped grid {fine[0]}×{fine[1]}" if several else "an image"
    kshape = f"{imgs} image{'s' if imgs > 1 else ''} × {per} tokens" + (
        f" on the finest grid {fine[0]}×{fine[1]}" if several else "")
    shape = f"{imgs} image{'s' if imgs > 1 else ''} × {nbase} table nodes"
    where = "the whole dataset's graph" if exact else "a batch's graph"
    if exact and settings.num_eigs >= nodes:
        raise InputError("--num-eigs", f"{settings.num_eigs} is not below the {nodes} nodes of {where} ({shape})",
                         f"pass --num-eigs < {nodes}, or give the graph more nodes (more images or a larger --size)")
    if settings.num_eigs > nodes:
        raise InputError("--num-eigs", f"{settings.num_eigs} is more than the {nodes} nodes of {where} "
                         f"({shape})", f"pass --num-eigs ≤ {nodes}, or give the graph more nodes (more images, a "
                         "larger --batch-size or --size)" if not exact else f"pass --num-eigs ≤ {nodes}, or give the "
                         "graph more nodes (more images or a larger --size)")
    if settings.k_intra is not None and settings.k_intra > per:
        raise InputError("--k-intra", f"{settings.k_intra} is more than the {per} tokens of {of}",
                         f"pass --k-intra ≤ {per}" + (" (coarser grids take all of their own tokens at most)"
                                                      if several else ""))
    if settings.k_inter is not None and settings.k_inter > others:
        raise InputError("--k-inter", f"{settings.k_inter} is more than the {others} tokens of the other images in "
                         f"{'the dataset' if exact else 'a batch'} ({kshape})", f"pass --k-inter ≤ {others}" + (
                             "" if others else " (more images give it some)" if exact
                             else " (more images or a larger --batch-size give it some)"))
    k_intra, k_inter = settings.k
    if any(min(k_intra, h * w) + min(k_inter, (imgs - 1) * h * w) == 0 for h, w in grids):
        raise InputError("--k-intra/--k-inter", f"leave the graph no edges (k_intra {k_intra}, and {others} "
                         f"tokens in other images of a batch: {kshape})", "pass --k-intra ≥ 1")


def check_cluster(coordinator, num_processes, process_id) -> None:
    """The multi-process options, before `jax.distributed` starts (its own failures are tracebacks, or a wait for
    peers): none of them (JAX finds the cluster itself, e.g. SLURM), or all three; coordinator HOST:PORT;
    num_processes ≥ 1; 0 ≤ process_id < num_processes; and for process 0, which starts the coordinator service on
    PORT (every interface), a PORT free to bind here. One `InputError` line each. Does not check that HOST is this
    machine (for process 0) or reachable (for the others)."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        return
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise InputError(" ".join(f"{flag} {v}" for flag, v in given.items() if v is not None),
                         f"needs {' and '.join(missing)} too",
                         "pass all three, --coordinator HOST:PORT --num-processes N --process-id I (process 0 on "
                         "HOST), or none of them where JAX finds the cluster itself (e.g. SLURM)")
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--coordinator {coordinator}", "is not HOST:PORT (a port in 1–65535)",
                         "pass e.g. --coordinator 10.0.0.1:1234")
    for flag, v in (("--num-processes", num_processes), ("--process-id", process_id)):
        if not is_integer(v):
            raise InputError(flag, f"must be an integer, got {v!r}", f"pass e.g. {flag} 0")
    if num_processes < 1:
        raise InputError("--num-processes", f"must be ≥ 1, got {num_processes}", "pass e.g. --num-processes 2")
    if not 0 <= process_id < num_processes:
        raise InputError("--process-id", f"must be in [0, {num_processes}) for --num-processes {num_processes}, got "
                         f"{process_id}", "number the processes 0 … N−1")
    if process_id == 0:
        _check_port_free(coordinator, int(port))


def _check_port_free(coordinator: str, port: int) -> None:
    """Bind PORT on every interface, as the coordinator service will (IPv6 `::`, dual-stack, else IPv4), and let
    it go: taken, it is one line here instead of gRPC's log line and a traceback."""
    import errno
    import socket

    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC: TIME_WAIT is no conflict
                s.bind((address, port))
            return
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise InputError(f"--coordinator {coordinator}", f"port {port} cannot be bound here "
                                 f"({e.strerror or e}), so process 0 cannot start the coordinator on it",
                                 "choose a free port (the same on every process)") from None
            # no IPv6 here (or not this address family): try the next


def discard(path: str | None, process_index: int = 0) -> None:
    """Remove a folder this run made (process 0 only; on a shared disk the others see it go)."""
    if path is not None and process_index == 0:
        shutil.rmtree(path, ignore_errors=True)


__all__ = ["OUTPUT_NAMES", "check_cluster", "check_files", "check_graph_size", "check_out", "discard", "no_images",
           "written"]
