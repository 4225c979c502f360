"""A folder of images as a dataset: a deterministic file list and a streamed, bounded-prefetch batch reader.

    files, ignored = scan("photos/")                  # relative paths, sorted; non-image files with reasons
    with Prefetcher(produce, steps=range(10, 30), depth=2) as batches:
        for step, item in batches: ...                 # item = produce(step), made ahead on a background thread

`scan` walks the folder recursively and keeps .jpg/.jpeg/.png/.webp files (any case), sorted by relative path so
that every process and every run sees the same list (image i is `files[i]`); hidden files and folders (a leading
dot) are skipped silently, everything else is listed in `ignored` with the reason. Links to folders are followed,
but each folder is walked once (a second link to it, or a link cycle, is listed in `ignored`). `read_slots` decodes
and resizes the images of some batch slots; one that cannot be read becomes an invalid slot carrying the reason,
never an exception; `first_readable` finds one image that decodes (a folder without any is refused up front).

Shape legend
    n  slots read by this process    (H, W)  the fixed model-input size    idx  image index into `files` (-1: pad)
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Iterable, Iterator

import numpy as np

from spectral_jax.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def scan(folder: str, exclude: Iterable[str] = ()) -> tuple[list[str], list[dict]]:
    """(image files relative to `folder`, sorted; ignored files `[{"file", "reason"}]`).

    Paths under any of `exclude` (e.g. the run's own output folder) are left out. Raises `InputError` when the
    folder does not exist or holds no image file.
    """
    if not os.path.isdir(folder):
        raise InputError(folder, "no such folder", "pass a folder of .jpg/.jpeg/.png/.webp images")
    root = os.path.abspath(folder)
    skip = [os.path.abspath(e) for e in exclude]
    files, ignored = [], []
    seen = {_dir_id(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            path = os.path.join(dirpath, d)
            if d.startswith(".") or any(_inside(path, s) for s in skip):
                continue
            key = _dir_id(path)
            if key in seen:                 # a linked folder already walked (or a link cycle): once only
                ignored.append({"file": os.path.relpath(path, root) + os.sep,
                                "reason": "a link to a folder already scanned (each folder is read once)"})
                continue
            seen.add(key)
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(rel)
            else:
                ignored.append({"file": rel, "reason": f"not an image file (extension {os.path.splitext(name)[1]!r}; "
                                                       f"taken: {', '.join(IMAGE_EXTENSIONS)})"})
    if not files:
        raise InputError(folder, "holds no image files", f"put {'/'.join(IMAGE_EXTENSIONS)} files in it "
                         "(sub-folders are searched too)")
    files.sort()
    ignored.sort(key=lambda d: d["file"])
    return files, ignored


def _dir_id(path: str) -> tuple:
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), folder]) == folder


def first_readable(root: str, files: list[str]) -> tuple[int | None, str]:
    """(index of the first of `files` that decodes, in order, or None; the reason the first failure gave, or "").

    Decodes files until one succeeds (one read for a healthy folder, all of them when none can be read): a folder
    with no readable image is refused before any model work.
    """
    from spectral_jax import io

    why = ""
    for i, name in enumerate(files):
        try:
            io.load_image(os.path.join(root, name))
            return i, why
        except InputError as e:
            why = why or f"{name}: {e.problem}"
    return None, why


def read_image(path: str, size: tuple[int, int], pre) -> np.ndarray:
    """One file → float32 `[H, W, 3]` model input: resized to exactly `size` with the model's filter, then
    normalised, as `pre` (the backbone's `PreprocessSpec`: patch_size, mean, std, resample) says.

    Raises `InputError` (naming the file) when it cannot be read.
    """
    from spectral_jax import io

    return io.preprocess(io.load_image(path), tuple(size), pre.patch_size, pre.mean, pre.std, pre.resample,
                         name=path)


def read_slots(root: str, files: list[str], idx: np.ndarray, size: tuple[int, int], pre
               ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Read the images `files[idx]` of some batch slots: (x float32 `[n, H, W, 3]`, valid bool `[n]`,
    {image index: reason} for files that could not be read). Padding slots (idx < 0) and unreadable files give
    zero pixels and valid = False."""
    x = np.zeros((len(idx), *size, 3), np.float32)
    valid = np.zeros(len(idx), bool)
    failed: dict[int, str] = {}
    for s, i in enumerate(np.asarray(idx)):
        if i < 0:
            continue
        try:
            x[s] = read_image(os.path.join(root, files[i]), size, pre)
            valid[s] = True
        except InputError as e:
            failed[int(i)] = f"{e.problem}"
    return x, valid, failed


class Prefetcher:
    """Run `produce(step)` for each step of `steps`, in order, on a background thread, at most `depth` ahead.

    Iterating yields (step, item). An exception in `produce` is re-raised in the consumer at that step. Leaving the
    `with` block (or `close()`) stops the thread.
    """

    _END = object()

    def __init__(self, produce: Callable[[int], object], steps: Iterable[int], depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be ≥ 1, got {depth}")
        self._produce, self._steps = produce, list(steps)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="spectral-jax-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        for step in self._steps:
            try:
                item = (step, self._produce(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self._put((step, None, e))
                return
            if not self._put(item):
                return
        self._put(self._END)

    def __iter__(self) -> Iterator[tuple[int, object]]:
        while True:
            got = self._queue.get()
            if got is self._END:
                return
            step, item, err = got
            if err is not None:
                raise err
            yield step, item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["IMAGE_EXTENSIONS", "Prefetcher", "first_readable", "read_image", "read_slots", "scan"]
