"""Files a run writes: reserved before the work starts, written atomically, never over an input, never empty.

Every writer of the package goes through this module:
- `OutputFile(path, inputs=...)` reserves a hidden temporary file beside `path` *before* the work starts (so a
  read-only folder, a path under a regular file, an existing folder or an output equal to an input fail in one line
  before any model run), and moves it into place on `commit()` only when the writer produced a non-empty file.
- `write_atomic(path, write)` is the same in one call; `write_json(path, data)`.
- `OutputDir(out, names, inputs=...)` / `staged_dir(...)` builds a result folder in a sibling temporary folder and
  moves it into place on success: atomically (one rename) when `out` does not exist, else entry by entry under an
  exclusive lock on `out`, so two runs writing into one folder never crash one another or leave `.tmp-*` behind.
- `FolderLock(out, ...)` holds that same lock on `out` for a whole run, refusing at once when another run holds it.
- Staging (a temporary file or folder) is held under an exclusive `flock` while its run lives; a run killed
  outright (kill -9, a lost machine) leaves its staging unlocked, and the next writer into the same place removes
  it (`_sweep`: only names of this module's own pattern, only unlocked, never a folder holding replaced entries).
- Permissions follow the umask (0644 files and 0755 folders under umask 022), as `open()` would give.
- `.npz` paths: a path that does not end in `.npz` (any case) gets `.npz` appended, as `numpy.savez` does
  (`npz_path`); callers report the path actually written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

from spectral_jax.errors import InputError

__all__ = ["FolderLock", "OutputDir", "OutputFile", "check_not_input", "flock_holder", "npz_path", "save_npz",
           "staged_dir", "sweep", "umask", "write_atomic", "write_json"]


def umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _chmod_default(path: str, directory: bool = False) -> None:
    """Give `path` the mode a plain `open()`/`mkdir()` would: 0666 (0777 for folders) less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def npz_path(path: str) -> str:
    """`path` with `.npz` appended unless it already ends in `.npz` (case-insensitive), as numpy.savez does.
    An existing folder (or a path ending in a separator) is returned as it is, for `OutputFile` to refuse."""
    p = os.fspath(path)
    if not p.strip() or p.lower().endswith(".npz") or p.endswith(os.sep) or os.path.isdir(p):
        return p                                                  # an empty path too: for `OutputFile` to refuse
    return p + ".npz"


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (after resolving links)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_not_input(out: str, inputs: Iterable[str], flag: str = "--out") -> None:
    """Refuse an output path that is one of the inputs (or, for a folder output, holds one that it would replace)."""
    for src in inputs:
        if src is not None and os.path.exists(src) and _same(out, src):
            raise InputError(f"{flag} {out}", f"is the input {src}; writing it would destroy the input",
                             "pass another output path")


def _check_given(path: str, flag: str, example: str) -> None:
    """An empty (or blank) output path is one line, not the current folder by accident."""
    if not path.strip():
        raise InputError(f"{flag} {path!r}", "is empty", f"pass an output path, e.g. {flag} {example}")


def _check_name(path: str, flag: str) -> None:
    """A last path component longer than the filesystem takes (NAME_MAX, 255 bytes on most) is one line now, not
    an ENAMETOOLONG when the result is moved into place, after the work."""
    name = os.path.basename(os.path.abspath(path))
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        most = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        most = 255
    if len(os.fsencode(name)) > most:
        raise InputError(f"{flag} {path}", f"names a file or folder of {len(os.fsencode(name))} bytes, more than "
                         f"the {most} its filesystem takes", "pass a shorter name")


def _make_parent(path: str, flag: str) -> list[str]:
    """Create the missing folders above `path`; returns those created (deepest last). A file in the way, or a
    folder that cannot be written, is one line naming `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    missing, p = [], parent
    while not os.path.exists(p):
        missing.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise InputError(f"{flag} {path}", f"lies under {p}, which is a file, not a folder",
                         "pass an output path in a folder")
    created = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
    except OSError as e:
        _remove_dirs(created)
        raise InputError(f"{flag} {path}", f"cannot create folder {d} ({e.strerror})",
                         "pass an output path in a writable folder") from None
    return created


def _remove_dirs(created: Sequence[str]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            pass


_TMP_CHARS = "[a-z0-9_]{8}"     # the random part `tempfile.mkstemp`/`mkdtemp` give a name


def _staged(make: Callable[[], str], directory: bool = False) -> tuple[str, int | None]:
    """A staging file or folder (`make()` creates it, returns its path) with an exclusive `flock` held on it: the
    fd to keep while the staging is in use (the kernel drops the lock when the process dies, however it dies), or
    None on a filesystem without flock. Made again when a `_sweep` of another run took it first (it locked the new
    name in the instant before this did, and removes it)."""
    for _ in range(10):
        path = make()
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except OSError:                                     # no flock here (ENOLCK, EOPNOTSUPP): staged unlocked
            os.close(fd)
            return path, None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return path, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the staging kept being removed as it was made")


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _sweep(folder: str, pattern: str, directory: bool = False) -> None:
    """Remove the entries of `folder` whose whole name matches `pattern` (a regular expression; a group named
    "owner", where it matched, names the staging whose lock decides — `numpy.savez`'s `.npz` appended to a staged
    name) — staging of this module that nothing holds: no run's `flock` on it (`_staged`), so its run was killed
    before it could clean up. Entries that are held, links, of the other kind (file/folder), or — folders — holding
    `.old-*` (the entries a merge replaced: `OutputDir.commit`) are kept, as is everything where flock is not
    supported."""
    try:
        found = [m for m in map(re.compile(pattern).fullmatch, os.listdir(folder)) if m]
    except OSError:
        return
    for m in found:
        path = os.path.join(folder, m.group(0))
        owner = os.path.join(folder, m.groupdict().get("owner") or m.group(0))
        if os.path.islink(path) or directory != os.path.isdir(path):
            continue
        if owner != path and not os.path.lexists(owner):        # an appended .npz whose staging is gone
            _remove(path)
            continue
        try:
            fd = os.open(owner, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0))
        except OSError:                                         # gone, a link, or not of this kind
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(fd), os.lstat(owner)):
                continue
            if directory and any(n.startswith(".old-") for n in os.listdir(path)):
                continue
            _remove(path)
        except OSError:                                         # held by a live run (or no flock here)
            continue
        finally:
            os.close(fd)


def sweep(folder: str, suffixes: Iterable[str]) -> None:
    """Remove the temporary files `OutputFile` staged in `folder` for outputs ending in one of `suffixes` (".png",
    ".npz", ...; "" for none) that a run killed outright left: `.tmp-XXXXXXXX<suffix>` (and a `.npz` numpy
    appended to one) that no live run holds (`_sweep`). Every `OutputFile` does this for its own suffix; a run
    that holds a folder's lock may do it for all it writes before it starts."""
    alts = "|".join(re.escape(x) for x in suffixes)
    _sweep(folder, r"(?P<owner>\.tmp-" + _TMP_CHARS + f"(?:{alts}))" + r"(\.npz)?")


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass


class OutputFile:
    """One output file, reserved now and written later: `with OutputFile(p) as o: write(o.tmp); o.commit()`.

    The constructor checks `path` (not a folder, not under a file, not one of `inputs`) and creates a hidden
    temporary file beside it, so an unwritable location fails before any work. `commit()` refuses an empty
    temporary file (a writer that wrote elsewhere, e.g. `np.savez` appending `.npz` to a name), sets the umask's
    permissions and renames it onto `path`. Leaving the block without `commit()` (an error, Ctrl-C) removes the
    temporary file and any folder the constructor created. The temporary file, `.tmp-XXXXXXXX<suffix>`, is held
    under a `flock` until then; those of the same suffix that a killed run left beside `path` are removed first
    (`_sweep`).
    """

    def __init__(self, path: str, inputs: Iterable[str] = (), flag: str = "--out"):
        self.path = os.fspath(path)
        _check_given(self.path, flag, "out/result.npz")
        if self.path.endswith(os.sep) or os.path.isdir(self.path):
            raise InputError(f"{flag} {self.path}", "is a folder", "pass a file path, e.g. out/result.npz")
        check_not_input(self.path, inputs, flag)
        _check_name(self.path, flag)
        self._created = _make_parent(self.path, flag)
        d = os.path.dirname(os.path.abspath(self.path))
        suffix = os.path.splitext(self.path)[1]

        def make():
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
            os.close(fd)
            return tmp

        sweep(d, [suffix])
        try:
            self.tmp, self._fd = _staged(make)
        except OSError as e:
            _remove_dirs(self._created)
            raise InputError(f"{flag} {self.path}", f"cannot write in {d} ({e.strerror})",
                             "pass an output path in a writable folder") from None
        self.committed = False

    def commit(self) -> str:
        """Move the written temporary file into place; returns the path."""
        if not os.path.isfile(self.tmp) or os.path.getsize(self.tmp) == 0:
            raise RuntimeError(f"writing {self.path} produced no data; nothing was written")
        _chmod_default(self.tmp)
        os.replace(self.tmp, self.path)
        self.committed = True
        self._fd = _unlock(self._fd)
        return self.path

    def discard(self) -> None:
        if not self.committed:
            for p in (self.tmp, self.tmp + ".npz"):
                if os.path.exists(p):
                    os.remove(p)
            _remove_dirs(self._created)
        self._fd = _unlock(self._fd)

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_atomic(path: str, write: Callable[[str], None], inputs: Iterable[str] = ()) -> str:
    """Call `write(tmp_path)`, then rename onto `path` (see `OutputFile`); returns the path written."""
    with OutputFile(path, inputs) as o:
        write(o.tmp)
        return o.commit()


def save_npz(target: "str | OutputFile", arrays: dict, inputs: Iterable[str] = ()) -> str:
    """`numpy.savez` of `arrays` to `target` exactly (written through a file object: numpy appends nothing),
    atomically; `target` is a path or an `OutputFile` reserved earlier (then committed here). Returns the path."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    if isinstance(target, OutputFile):
        write(target.tmp)
        return target.commit()
    return write_atomic(target, write, inputs)


def write_json(path: str, data) -> str:
    """`data` as indented JSON (one trailing newline) at `path`, atomically."""
    text = json.dumps(data, indent=2) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return write_atomic(path, write)


class OutputDir:
    """A result folder built in a temporary folder (`tmp`: beside `out`, or inside it where it exists — its own
    filesystem, a mount point say) and moved into `out` by `commit()`.

    Checked and created before the work starts: `out` must not be a file or lie under one, its name must fit its
    filesystem, the folder `tmp` goes in must be writable, and no input may lie in `out` itself or inside an entry
    that the run will replace (`names`, the top-level files and folders it writes). `commit()`: when `out` did not
    exist, one rename; otherwise, under an
    exclusive `flock` on `out`, each written entry replaces the one of the same name (other entries stay), so
    concurrent runs into one `out` serialise instead of racing. Leaving the block without `commit()` removes `tmp`.
    `tmp`, `.tmp-<out's name>-XXXXXXXX`, is held under a `flock` until then; those a killed run left where it goes
    are removed first (`_sweep`; one holding replaced entries, `.old-*`, is kept).
    """

    def __init__(self, out: str, names: Iterable[str] = (), inputs: Iterable[str] = (), flag: str = "--out"):
        self.out = os.fspath(out)
        _check_given(self.out, flag, "results")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise InputError(f"{flag} {self.out}", "exists and is not a folder", "pass a folder path for --out")
        inputs = [os.fspath(p) for p in inputs if p is not None]
        for src in inputs:
            if os.path.exists(src) and (_same(self.out, src) or any(_inside(src, os.path.join(self.out, n))
                                                                    for n in names)):
                raise InputError(f"{flag} {self.out}", f"would replace the input {src}",
                                 "pass an output folder that does not hold the inputs")
        _check_name(self.out, flag)
        self._created = _make_parent(self.out, flag)
        # staged where its entries go: in `out` when it exists (its own filesystem, a mount point say: a rename
        # from its parent would cross devices; and an `out` that cannot be written fails now), else beside it
        where = self.out if os.path.isdir(self.out) else os.path.dirname(os.path.abspath(self.out))
        prefix = ".tmp-" + os.path.basename(os.path.abspath(self.out))[:32] + "-"
        _sweep(where, re.escape(prefix) + _TMP_CHARS, directory=True)
        try:
            self.tmp, self._fd = _staged(lambda: tempfile.mkdtemp(dir=where, prefix=prefix), directory=True)
        except OSError as e:
            _remove_dirs(self._created)
            raise InputError(f"{flag} {self.out}", f"cannot write in {where} ({e.strerror})",
                             "pass an output folder in a writable location") from None
        self.committed = False
        self.kept = False          # a failed merge that could not be undone: tmp holds the replaced entries

    def commit(self) -> str:
        _chmod_default(self.tmp, directory=True)
        entries = os.listdir(self.tmp)
        if not entries:
            raise RuntimeError(f"the run wrote nothing into {self.out}")
        dest = os.path.abspath(self.out)   # "." or "a/..": rename(2) refuses such a name (EBUSY), not the folder
        if not _inside(self.tmp, dest):    # staged beside `out`, which did not exist then
            try:
                os.rename(self.tmp, dest)  # atomic when `out` does not exist (fails if it does, even empty)
                self.committed = True
                self._fd = _unlock(self._fd)
                return self.out
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR, errno.EBUSY):
                    raise
        os.makedirs(dest, exist_ok=True)
        fd = os.open(dest, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            trash = tempfile.mkdtemp(dir=self.tmp, prefix=".old-")
            try:
                _merge(self.tmp, dest, entries, trash)
            except _MergeStuck:
                self.kept = True
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.committed = True
        self._fd = _unlock(self._fd)
        return self.out

    def discard(self) -> None:
        if not self.committed and not self.kept:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _remove_dirs(self._created)
        self._fd = _unlock(self._fd)

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


class _MergeStuck(OSError):
    """A merge failed and could not be undone either."""


def _merge(tmp: str, out: str, entries: Sequence[str], trash: str) -> None:
    """Move each entry of `tmp` into `out`, an existing entry of the same name first into `trash` — all or nothing:
    when a move fails, the entries already moved go back to `tmp` and the replaced ones back into `out`, and the
    error is raised (so `out` is as before). Should undoing fail too, `_MergeStuck` names `tmp`, which then holds
    the replaced entries (under `trash`) and is not removed."""
    done: list[tuple[str, bool]] = []
    try:
        for name in entries:
            src, dst, old = os.path.join(tmp, name), os.path.join(out, name), os.path.join(trash, name)
            had = os.path.lexists(dst)
            if had:
                os.rename(dst, old)
            done.append((name, had))
            os.rename(src, dst)
    except OSError as e:
        try:
            for name, had in reversed(done):
                src, dst, old = os.path.join(tmp, name), os.path.join(out, name), os.path.join(trash, name)
                if not os.path.lexists(src):                    # moved (the entry whose move failed was not)
                    os.rename(dst, src)
                if had:
                    os.rename(old, dst)
        except OSError as undo:
            raise _MergeStuck(e.errno, f"merging into {out} failed ({e.strerror or e}) and so did undoing it "
                                       f"({undo.strerror or undo}): the replaced entries are kept in {trash}") from e
        raise


@contextmanager
def staged_dir(out: str, names: Iterable[str] = (), inputs: Iterable[str] = ()):
    """`with staged_dir(out) as tmp:` write into `tmp`; on leaving without error it is moved into `out`
    (`OutputDir`); on an error or Ctrl-C nothing is left behind."""
    with OutputDir(out, names, inputs) as od:
        yield od.tmp
        od.commit()


class FolderLock:
    """An exclusive `flock` on the folder `path` (the lock `OutputDir.commit` takes), taken at once or refused,
    held until `release()`.

    A missing `path` is created first, with its missing parents (`created`, outermost first; `made`: whether `path`
    itself was). When another holder has the lock: one `InputError` naming `path`, `holder` and the holder's pid
    (`flock_holder`, where the system lists it), with `fix`; nothing is removed then (a folder made here is the
    holder's now). The kernel drops the lock with its file descriptor, so a holder that is killed leaves no stale
    lock. `release(remove_empty=True)` removes the folders this lock created that are still empty (a run that failed
    before writing), before letting go of the lock. A lock taken on a folder that was removed and made again in
    between is taken again on the new one. On a filesystem without `flock` (ENOLCK, EOPNOTSUPP) the folder is used
    unlocked and `locked` is False.
    """

    def __init__(self, path: str, holder: str, fix: str, flag: str = "--out"):
        self.path = os.fspath(path)
        self.fd, self.locked, self.created, self.made = None, False, [], False
        for _ in range(10):
            if not os.path.isdir(self.path):
                self.created += _make_parent(self.path, flag)
                try:
                    os.mkdir(self.path)
                    self.created.append(self.path)
                except FileExistsError:
                    pass
                except OSError as e:
                    _remove_dirs(self.created)
                    raise InputError(f"{flag} {self.path}", f"cannot create it ({e.strerror})",
                                     "pass a folder you can write to") from None
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:                               # removed by a run that just gave up: again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = flock_holder(fd)
                os.close(fd)
                raise InputError(self.path, f"is in use by {holder}" + (f" (pid {pid})" if pid else ""),
                                 fix) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
                    os.close(fd)
                    raise
                self.fd, self.made = fd, self.path in self.created  # no flock here: used unlocked
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.locked = fd, True
                self.made = self.path in self.created
                return
            os.close(fd)                                            # locked a folder removed meanwhile: again
        raise InputError(self.path, "kept being removed and made again while this run tried to lock it",
                         "let the other run finish, or choose another --out")

    def release(self, remove_empty: bool = False) -> None:
        """Let go of the lock (once; later calls do nothing); `remove_empty`: first remove the folders this lock
        created that are still empty, innermost first."""
        if self.fd is None:
            return
        try:
            if remove_empty:
                _remove_dirs(self.created)
        finally:
            fd, self.fd = self.fd, None
            if self.locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def flock_holder(fd: int) -> int | None:
    """The pid holding a `flock` on the file open as `fd`, read from /proc/locks (Linux); None where the system
    does not list it."""
    st = os.fstat(fd)
    dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:                       # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146551 0 EOF"
                parts = line.split()
                if "->" not in parts and len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == dev_ino:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None
