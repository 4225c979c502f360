"""JAX's persistent compilation cache for `spectral-jax` runs, so a repeated command does not compile again.

Where it lives: `$XDG_CACHE_HOME/spectral-jax/jax`, or `~/.cache/spectral-jax/jax` when XDG_CACHE_HOME is unset.
`SPECTRAL_JAX_COMPILE_CACHE=0` turns it off; `SPECTRAL_JAX_COMPILE_CACHE=/some/dir` moves it there. A JAX cache the
user set up directly (`JAX_COMPILATION_CACHE_DIR`, or `jax_compilation_cache_dir` set before the command runs) is
left as it is. A folder that cannot be created or written never stops a command: it runs without the cache (with
one warning line only when the folder was named in SPECTRAL_JAX_COMPILE_CACHE).

Only the command line turns the cache on (`spectral_jax.cli.main` run as the process's command); importing
`spectral_jax` or calling its functions leaves JAX's global configuration as the caller set it. The cache is
trusted code: JAX loads executables from it, so keep it in a folder only you can write.
"""

from __future__ import annotations

import os
import sys
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
