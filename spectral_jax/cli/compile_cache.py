"""JAX's persistent compilation cache for `spectral-jax` runs, so a repeated command does not compile again.

Where it lives: `$XDG_CACHE_HOME/spectral-jax/jax`, or `~/.cache/spectral-jax/jax` when XDG_CACHE_HOME is unset.
`SPECTRAL_JAX_COMPILE_CACHE=0` turns it off; `SPECTRAL_JAX_COMPILE_CACHE=/some/dir` moves it there. A JAX cache the
user set up directly (`JAX_COMPILATION_CACHE_DIR`, or `jax_compilation_cache_dir` set before the command runs) is
left as it is. A folder that cannot be created or written never stops a command: it runs without the cache (with
one warning line only when the folder was named in SPECTRAL_JAX_COMPILE_CACHE). JAX warns (two lines) for every entry
it cannot read (a damaged file, which it then compiles again but never replaces) or write: with the cache turned on
here, those become at most one line per run and kind on stderr, naming the folder and the fix (`report_entries`).

Only the command line turns the cache on (`spectral_jax.cli.main` run as the process's command); importing
`spectral_jax` or calling its functions leaves JAX's global configuration as the caller set it. The cache is
trusted code: JAX loads executables from it, so keep it in a folder only you can write.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path

ENV = "SPECTRAL_JAX_COMPILE_CACHE"
_OFF = {"0", "off", "false", "no"}
_ON = {"", "1", "on", "true", "yes"}


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The cache folder the environment asks for, or None when SPECTRAL_JAX_COMPILE_CACHE turns it off."""
    value = environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value.lower() not in _ON:
        return Path(value).expanduser()
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path(environ.get("HOME") or Path.home()) / ".cache"
    return base / "spectral-jax" / "jax"


def settings(path: Path) -> dict[str, str | float | int]:
    """JAX config for caching at `path`: every compile (CPU compiles take well under JAX's 1 s default), any size."""
    return {"jax_compilation_cache_dir": str(path),
            "jax_persistent_cache_min_compile_time_secs": 0.0,
            "jax_persistent_cache_min_entry_size_bytes": -1}


def enable(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Turn the persistent compilation cache on for this process; returns its folder, or None when it is off.

    Before JAX is imported the settings go into `environ` (JAX reads `JAX_*` variables at import), so commands that
    fail on their arguments still do not import JAX; once it is imported they go through `jax.config.update`.
    """
    try:
        path = cache_dir(environ)
    except (OSError, RuntimeError):  # no home folder to put it in
        return None
    if path is None or _user_configured(environ):
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        if environ.get(ENV, "").strip():
            print(f"spectral-jax: warning: compile cache {path}: {e.strerror or e} — running without it "
                  f"(set {ENV} to a writable folder, or to 0)", file=sys.stderr)
        return None
    report_entries(path)
    if "jax" in sys.modules:
        import jax

        for name, value in settings(path).items():
            jax.config.update(name, value)
    else:
        for name, value in settings(path).items():
            environ.setdefault(name.upper(), str(value))
    return path


def _user_configured(environ: Mapping[str, str]) -> bool:
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return True
    jax = sys.modules.get("jax")
    return jax is not None and bool(jax.config.jax_compilation_cache_dir)


# JAX's warning for one cache entry it could not read or write (jax/_src/compiler.py).
_ENTRY_WARNING = re.compile(r"Error (reading|writing) persistent compilation cache entry for '([^']*)': (.*)", re.S)


def report_entries(path: Path) -> None:
    """From now on, JAX's per-entry warnings about the cache (an entry it cannot read or write) print at most one
    line per run and kind on stderr, naming `path` and the fix; every other warning prints as before.

    An unreadable entry is compiled again but never replaced (JAX leaves an existing file alone), so without this a
    damaged cache printed two lines per entry on every run. Installed once per process (`warnings.showwarning`);
    a `-W`/`filterwarnings` setting that ignores or raises these warnings still applies first.
    """
    previous = warnings.showwarning
    if getattr(previous, "_spectral_jax_cache", False):
        return
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        m = _ENTRY_WARNING.match(str(message))
        if m is None:
            return previous(message, category, filename, lineno, file, line)
        kind = m.group(1)
        if kind in shown:
            return None
        shown.add(kind)
        why = " ".join(m.group(3).split())
        why = why if len(why) <= 100 else why[:97] + "..."
        what = (f"an entry could not be read and is compiled again on every run ({m.group(2)}: {why})"
                if kind == "reading" else f"an entry could not be written ({m.group(2)}: {why})")
        fix = (f"delete the folder to rebuild it, or set {ENV}=0" if kind == "reading" else
               f"free space or make the folder writable, or set {ENV}=0")
        try:
            print(f"spectral-jax: warning: compile cache {path}: {what}; further ones this run are not reported — "
                  f"{fix}", file=sys.stderr if file is None else file)
        except (OSError, ValueError):   # stderr closed: nothing to tell
            pass
        return None

    show._spectral_jax_cache = True
    warnings.showwarning = show
