"""Where a checkpoint is: a local path, or a Hugging Face repo id found in the hub cache (refs/main first, then the
newest snapshot) or downloaded with `huggingface_hub` when online. One lookup for every family; each family says
what a usable snapshot holds (`holds`), which files to fetch (`patterns`) and how a user gets them (`how_to_get`).
Offline (HF_HUB_OFFLINE set, or no `huggingface_hub`) a missing checkpoint is one `InputError` naming the command
that fetches it.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Callable

from spectral_jax.errors import InputError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def has_safetensors(folder: str) -> bool:
    """The default test of a snapshot: it holds *.safetensors."""
    return bool(glob.glob(os.path.join(folder, "*.safetensors")))


def cache_dir() -> str:
    """The HF hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def find_in_hub_cache(repo_id: str, holds: Callable[[str], bool] | None = None) -> str | None:
    """The snapshot directory of `repo_id` in the HF hub cache for which `holds(dir)` is true (default: it holds
    *.safetensors), refs/main first, then newest first; or None."""
    holds = holds or has_safetensors
    root = os.path.join(cache_dir(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(root, "snapshots")
    candidates = []
    ref = os.path.join(root, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            candidates.append(os.path.join(snapshots, f.read().strip()))
    candidates += sorted(glob.glob(os.path.join(snapshots, "*")), key=os.path.getmtime, reverse=True)
    return next((c for c in candidates if holds(c)), None)


def download(repo_id: str, *, patterns: list[str], holds: Callable[[str], bool], how_to_get: str,
             lacking: tuple[str, str]) -> str:
    """`huggingface_hub.snapshot_download` of the files matching `patterns`; offline, without `huggingface_hub`,
    or on any failure → `InputError` whose fix is `how_to_get`. A snapshot that does not `holds` → `lacking`
    (problem, fix)."""
    what = f"weights {repo_id!r}"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise InputError(what, "not in the HF cache and HF_HUB_OFFLINE is set", how_to_get)
    try:
        import huggingface_hub
    except ImportError:
        raise InputError(what, "not in the HF cache and huggingface_hub is not installed", how_to_get) from None
    try:
        path = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise InputError(what, f"not in the HF cache and the download failed ({type(e).__name__})",
                         how_to_get) from None
    if not holds(path):
        raise InputError(what, *lacking)
    return path


def resolve(source: str, *, local: Callable[[str], bool], local_words: str, fix: str,
            patterns: list[str], holds: Callable[[str], bool], how_to_get: str, lacking: tuple[str, str]) -> str:
    """A local path for `source`: itself if `local(path)` (e.g. `os.path.exists`; `local_words` says what that
    is, "file or directory"), else an HF repo id through the cache or a download; anything else → `InputError`
    with `fix`."""
    path = os.path.expanduser(source)
    if local(path):
        return path
    if REPO_ID.match(source):
        return find_in_hub_cache(source, holds) or download(source, patterns=patterns, holds=holds,
                                                            how_to_get=how_to_get, lacking=lacking)
    raise InputError(f"weights {source!r}", f"no such {local_words}, and not a Hugging Face repo id", fix)
