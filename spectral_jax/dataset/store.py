"""The on-disk feature store of a method="exact" run: each batch's merged features, written as they are computed.

    OUT/checkpoints/features/images-000000000-000000004/      one shard: the images [first, first + count)
        meta.json      {"key", "first", "count", "valid" [count], "failed" {image: why}, "arrays" {name: {shape,
                        dtype, crc32}}}
        a0.npy b0.npy  per layer group g: `[L_g, count·h·w, F]` float32, or bfloat16 stored as uint16 bits (b{g}
                        only for knn-qk); plain .npy files, read back memory-mapped

A shard is built in a hidden folder (`.tmp-p{process}-…`) and renamed into place once complete (one rename), so a
run killed at any moment (kill -9 included) leaves either a whole shard or none; a later `--resume` reads the
finished shards and computes only the batches without one. A shard names its images by index; its `key` is the
features cache key of the run that wrote it (`whole.cache_key`: settings and the image files' content digests), so a
shard made from other images or settings is refused in one line naming what changed (`checkpoint.check_same`), and
one whose files are unreadable, of the wrong shape or dtype, changed since written (CRC-32 of each array) or
non-finite is refused in one line naming the shard (`checkpoint.damaged`) — never used. Several processes: each
writes and reads the shards of its own images; the folder holds them side by side.

Nothing here knows a model family or a graph: arrays come in by name and go out as memory-mapped rows
(`FeatureStore.rows`).

Shape legend
    L  layers of a group    F  feature width    (h, w)  a group's grid    m  images of a shard
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from typing import NamedTuple

import numpy as np

FOLDER = "features"
_PREFIX = "images-"


class Shard(NamedTuple):
    """One finished shard: images [first, first + count), their valid flags `[count]` and reasons, and its arrays
    {name: memory-mapped `[L, count·h·w, F]`}."""

    path: str
    first: int
    count: int
    valid: np.ndarray
    failed: dict
    arrays: dict


def folder(ckdir: str) -> str:
    """Where the shards of the run with checkpoints folder `ckdir` live."""
    return os.path.join(ckdir, FOLDER)


def shard_name(first: int, count: int) -> str:
    return f"{_PREFIX}{first:09d}-{first + count:09d}"


def finished(ckdir: str) -> list[str]:
    """The finished shards' folder names in `ckdir`'s store, sorted (none or no store: [])."""
    root = folder(ckdir)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith(_PREFIX) and os.path.isdir(os.path.join(root, d)))


def span(name: str) -> tuple[int, int]:
    """The images [first, stop) of the shard folder `name` (`shard_name`)."""
    lo, hi = name[len(_PREFIX):].split("-")
    return int(lo), int(hi)


def plan(ckdir: str, batches: list[tuple[int, int]]) -> tuple[list[str], list[bool]]:
    """Which finished shards to read for the `batches` [(first, stop)] of images of a run, and which batches they
    cover: (shard names, covered per batch). A batch is covered when every one of its images lies in a shard that
    lies within covered batches (so shards written with another batch size or process count are used where they
    fit); overlapping shards (of two layouts) are taken first come in image order; an empty batch (padding only)
    counts as covered."""
    lo_all = min((a for a, _ in batches), default=0)
    hi_all = max((b for _, b in batches), default=0)
    picked, end = [], -1
    for name in finished(ckdir):
        lo, hi = span(name)
        if lo_all <= lo < hi <= hi_all and lo >= end:
            picked.append((lo, hi, name))
            end = hi
    covered = np.zeros(max(hi_all - lo_all, 0), bool)
    for lo, hi, _ in picked:
        covered[lo - lo_all:hi - lo_all] = True
    done = [bool(covered[a - lo_all:b - lo_all].all()) for a, b in batches]
    in_done = np.zeros_like(covered)
    for (a, b), d in zip(batches, done):
        in_done[a - lo_all:b - lo_all] |= d
    return [name for lo, hi, name in picked if in_done[lo - lo_all:hi - lo_all].all()], done


def remove_unfinished(ckdir: str, process: int) -> None:
    """Remove the hidden folders of shards that process `process` began and did not finish (a killed run's)."""
    root = folder(ckdir)
    if os.path.isdir(root):
        for d in os.listdir(root):
            if d.startswith(f".tmp-p{process}-"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _bits(x: np.ndarray) -> np.ndarray:
    """x as stored: bfloat16 as its uint16 bits (plain .npy cannot name bfloat16), else as it is."""
    return x.view(np.uint16) if x.dtype.name == "bfloat16" else x


def _crc(x: np.ndarray, chunk: int = 1 << 24) -> int:
    """CRC-32 of x's bytes, read in slices of `chunk` values (no copy of the whole array)."""
    flat, c = x.reshape(-1), 0
    for i in range(0, flat.size, chunk):
        c = zlib.crc32(np.ascontiguousarray(flat[i:i + chunk]).data, c)
    return c


def write_shard(ckdir: str, key: dict, first: int, valid: np.ndarray, failed: dict, arrays: dict,
                process: int = 0, within: tuple[int, int] | None = None) -> str:
    """Write one shard (images [first, first + len(valid)), `arrays` {name: `[L, m·h·w, F]`}) atomically: built
    in a hidden folder, renamed into place. Returns its path. A shard of the same images already there is
    replaced, and so are finished shards of another batch layout that overlap these images and lie within the
    images `within` (first, stop) (this process's share, which no other process reads; default the shard's own),
    so that an image range keeps one layout."""
    root, count = folder(ckdir), len(valid)
    tmp = _write_tmp(root, {"key": key, "first": int(first), "count": count, "valid": [bool(v) for v in valid],
                            "failed": {str(int(i)): w for i, w in failed.items()}}, arrays, process)
    final = os.path.join(root, shard_name(first, count))
    lo, hi = within or (first, first + count)
    for name in finished(ckdir):
        a, b = span(name)
        if a < first + count and first < b and lo <= a and b <= hi:
            shutil.rmtree(os.path.join(root, name))
    os.rename(tmp, final)
    return final


def _write_tmp(root: str, meta: dict, arrays: dict, process: int) -> str:
    """A hidden folder in `root` holding `arrays` as .npy files and `meta` (plus each array's shape, dtype and
    CRC-32, "arrays") as meta.json; the caller renames it into place."""
    for tries in range(3):          # another process may remove the emptied parts folder in between (`release_parts`)
        os.makedirs(root, exist_ok=True)
        try:
            tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-p{process}-")
            break
        except FileNotFoundError:
            if tries == 2:
                raise
    info = {}
    for name, x in arrays.items():
        x = np.ascontiguousarray(_bits(np.asarray(x)))
        np.save(os.path.join(tmp, name + ".npy"), x)
        info[name] = {"shape": list(x.shape), "dtype": x.dtype.name, "crc32": _crc(x)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "arrays": info}, f, sort_keys=True)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


PARTS = "graph-parts"


def write_part(ckdir: str, name: str, key: dict, arrays: dict, process: int = 0) -> str:
    """Write one part of a result being built (OUT/checkpoints/graph-parts/`name`: `arrays` and `key`)
    atomically, as a shard is written. Returns its path."""
    root = os.path.join(ckdir, PARTS)
    tmp = _write_tmp(root, {"key": key}, arrays, process)
    final = os.path.join(root, name)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def read_part(ckdir: str, name: str, key: dict, out: str, expect: dict) -> dict | None:
    """The arrays of part `name` (None when it is not there), checked as a shard's are (`read_shard`: its key,
    then each array's presence, shape, dtype, CRC-32 and finite values against `expect` {name: (dtype, shape)});
    memory-mapped. A part made with other graph settings only: the refusal's fix says that deleting the parts
    folder keeps the cached features (`checkpoint.check_same`)."""
    from spectral_jax.dataset import checkpoint

    path = os.path.join(ckdir, PARTS, name)
    if not os.path.isdir(path):
        return None
    meta = _meta(path)
    checkpoint.check_same(out, meta["key"], json.loads(json.dumps(key, sort_keys=True)),
                          graph=os.path.join(ckdir, PARTS))
    why, arrays = _arrays_problem(path, meta.get("arrays"), expect)
    if why:
        raise checkpoint.damaged(path, why)
    return arrays


def remove_parts(ckdir: str) -> None:
    """Remove the parts folder (once the result they were for is saved whole)."""
    shutil.rmtree(os.path.join(ckdir, PARTS), ignore_errors=True)


def sharded_part(g: int, layer: int, process: int, processes: int) -> str:
    """The part name of process `process` of `processes` for layer `layer` of group g's sharded search (what
    `release_parts` reads the layout back from: the "-p{process}-of-{processes}" ending)."""
    return f"g{g}-l{layer}{_layout(process, processes)}"


def _layout(process: int, processes: int) -> str:
    return f"-p{process}-of-{processes}"


def release_parts(ckdir: str, process: int, processes: int) -> None:
    """Tidy the parts folder once process `process` of a run of `processes` processes keeps its rows of the graph
    whole (the sharded path's graph-rows): remove its own parts (`…-p{process}-of-{processes}`) and its unfinished
    ones (hidden `.tmp-p{process}-…`); process 0 also removes what no process of this run writes or reads — the
    parts of a search by another process count (`…-of-{Q}`, Q ≠ processes) or by the one-process search (names
    without "-of-"), and unfinished parts of processes ≥ `processes` —; then the folder once empty. Never touched:
    the parts of this run's other processes, finished or being written (they release their own), and anything
    outside the parts folder (the features, the graph caches)."""
    root = os.path.join(ckdir, PARTS)
    if not os.path.isdir(root):
        return
    mine = _layout(process, processes)
    for d in os.listdir(root):
        if d.startswith(".tmp-p"):
            q = d[len(".tmp-p"):].split("-", 1)[0]
            stale = q == str(process) or (process == 0 and q.isdigit() and int(q) >= processes)
        else:
            stale = d.endswith(mine) or (process == 0 and not d.endswith(f"-of-{processes}"))
        if stale:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    try:
        os.rmdir(root)              # the folder, once no process's parts are left in it (the last one out does)
    except OSError:
        pass


def _meta(path: str) -> dict:
    """The meta.json of a shard or part folder: an object with a "key" object, else one `InputError`."""
    from spectral_jax.dataset import checkpoint
    from spectral_jax.errors import InputError
    from spectral_jax.io import open_regular

    try:
        with open_regular(os.path.join(path, "meta.json"), "meta.json file") as f:   # a FIFO: refused, not waited on
            meta = json.load(f)
    except InputError as e:
        raise checkpoint.damaged(path, f"unreadable meta.json: {e.problem}") from None
    except (OSError, ValueError) as e:
        raise checkpoint.damaged(path, f"unreadable meta.json: {type(e).__name__}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), dict):
        raise checkpoint.damaged(path, "its meta.json is not an object with the run's key")
    return meta


def _umask() -> int:
    from spectral_jax.files import umask

    return umask()


def read_shard(path: str, key: dict, out: str, expect: dict) -> Shard:
    """The shard at `path`, checked: its meta a JSON object naming `key` (else `checkpoint.check_same`'s line,
    naming `out`), images [first, first + count) as its name says, `count` valid flags and reasons for invalid
    images only, and exactly the arrays `expect` {name: (dtype name, shape)} — each one `np.load`-able memory-mapped,
    of that shape and dtype, with the CRC-32 written and finite values. Anything else: one `InputError` naming the
    shard (`checkpoint.damaged`). The arrays come back memory-mapped (read-only)."""
    from spectral_jax.dataset import checkpoint

    meta = _meta(path)
    checkpoint.check_same(out, meta["key"], json.loads(json.dumps(key, sort_keys=True)))
    why, arrays = _problem(path, meta, expect)
    if why:
        raise checkpoint.damaged(path, why)
    return Shard(path, meta["first"], meta["count"], np.array(meta["valid"], bool),
                 {int(i): w for i, w in meta["failed"].items()}, arrays)


def _problem(path: str, meta: dict, expect) -> tuple[str | None, dict]:
    """(What is wrong with shard `path` (None: nothing), its arrays memory-mapped)."""
    first, count = meta.get("first"), meta.get("count")
    name = os.path.basename(path)
    if not (isinstance(first, int) and isinstance(count, int) and count >= 1 and name == shard_name(first, count)):
        return f"its meta names other images than its folder ({first!r}, {count!r})", {}
    valid, failed = meta.get("valid"), meta.get("failed")
    if not (isinstance(valid, list) and len(valid) == count and all(isinstance(v, bool) for v in valid)):
        return f"valid is not {count} booleans", {}
    try:
        bad = {int(i): w for i, w in failed.items()}
    except (AttributeError, ValueError, TypeError):
        return "failed is not an object of image: reason", {}
    if not all(first <= i < first + count and not valid[i - first] and isinstance(w, str) for i, w in bad.items()):
        return "failed names images outside the shard or read", {}
    return _arrays_problem(path, meta.get("arrays"), expect(count) if callable(expect) else expect)


def _arrays_problem(path: str, info, want: dict) -> tuple[str | None, dict]:
    """(What is wrong with the .npy files of folder `path` against `want` {name: (dtype name, shape; None for a
    free last axis)} and their recorded `info` {name: {crc32, …}} (None: nothing), the arrays memory-mapped)."""
    if not isinstance(info, dict) or sorted(info) != sorted(want):
        return f"it holds arrays {sorted(info) if isinstance(info, dict) else info!r}, not {sorted(want)}", {}
    arrays = {}
    for a, (dtype, shape) in want.items():
        try:
            x = np.load(os.path.join(path, a + ".npy"), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            return f"{a}.npy unreadable: {type(e).__name__}", {}
        if x.dtype.name != dtype or tuple(x.shape[:-1]) != tuple(shape[:-1]) or x.shape[-1] < 1 or (
                shape[-1] is not None and x.shape[-1] != shape[-1]):
            return f"{a}.npy is {x.dtype.name} {list(x.shape)}, not {dtype} {list(shape[:-1])} + [F]", {}
        if not isinstance(info[a], dict) or info[a].get("crc32") != _crc(x):
            return f"{a}.npy changed since it was written (CRC-32)", {}
        if not finite(x):
            return f"{a}.npy holds NaN or infinite values", {}
        arrays[a] = x
    return None, arrays


def finite(x: np.ndarray, chunk: int = 1 << 24) -> bool:
    """All values finite (bfloat16 stored as uint16 bits: exponent not all ones), checked in slices of `chunk`
    values (no copy of the whole array)."""
    flat = x.reshape(-1)
    for i in range(0, flat.size, chunk):
        part = flat[i:i + chunk]
        if not (((part & 0x7F80) != 0x7F80).all() if part.dtype == np.uint16 else np.isfinite(part).all()):
            return False
    return True


def load_all(ckdir: str, name: str) -> np.ndarray:
    """Array `name` of every finished shard in `ckdir`'s store, concatenated in image order along the rows
    `[L, Σ m·h·w, F]`, as stored (bfloat16 as uint16 bits), unchecked (for inspection and benchmarks; a run reads
    shards through `read_shard`). Whole arrays in memory."""
    parts = [np.load(os.path.join(folder(ckdir), d, name + ".npy"), allow_pickle=False) for d in finished(ckdir)]
    return np.concatenate(parts, axis=1)


class FeatureStore:
    """The shards of a run's images [first, first + share) (whole batches each), for reading back: `rows` gives one
    array's rows of a range of images, memory-mapped from the shards that hold them (zeros for images without one:
    padding). `valid` `[share]`, `failed` {image: why} of those images."""

    def __init__(self, shards: list[Shard], first: int, share: int, per: dict):
        self.shards = sorted(shards, key=lambda s: s.first)
        self.first, self.share, self.per = first, share, per       # per: {array name: rows per image}
        self.valid = np.zeros(share, bool)
        self.failed = {}
        for s in self.shards:
            self.valid[s.first - first:s.first - first + s.count] = s.valid
            self.failed.update(s.failed)

    def width(self, name: str) -> int:
        """F of array `name` (0 when no shard holds one)."""
        return next((s.arrays[name].shape[-1] for s in self.shards), 0)

    def rows(self, name: str, layer: int, start: int, stop: int, dtype=None) -> np.ndarray:
        """Rows of array `name`, layer `layer`, of the images [start, stop) (global indices) `[(stop − start)·h·w,
        F]`, as stored (bfloat16 as uint16 bits unless `dtype`); images without a shard are zero rows."""
        per, f = self.per[name], self.width(name)
        first = self.shards[0].arrays[name] if self.shards else None
        out = np.zeros(((stop - start) * per, f), first.dtype if first is not None else np.float32)
        for s in self.shards:
            lo, hi = max(start, s.first), min(stop, s.first + s.count)
            if lo < hi:
                out[(lo - start) * per:(hi - start) * per] = s.arrays[name][layer, (lo - s.first) * per:
                                                                           (hi - s.first) * per]
        return out if dtype is None else out.view(dtype) if out.dtype == np.uint16 else out.astype(dtype)

    def nbytes(self) -> int:
        """Bytes of all arrays of the shards (on disk, as stored)."""
        return sum(x.nbytes for s in self.shards for x in s.arrays.values())


__all__ = ["FOLDER", "FeatureStore", "Shard", "finished", "finite", "folder", "load_all", "plan", "read_part",
           "read_shard", "release_parts", "remove_parts", "remove_unfinished", "shard_name", "sharded_part", "span",
           "write_part", "write_shard"]
