"""The API reference builds: pdoc over `spectral_jax` (the README's `pdoc spectral_jax -o docs/api`), on the CPU,
with every warning pdoc raises a failure — a module that does not import, an annotation that does not resolve.

One pdoc limitation is let through, narrowly: it cannot resolve the postponed annotations (`from __future__ import
annotations`) of a NamedTuple's generated `__init__` (its functions live in a module `namedtuple_<Name>` that does not
exist; mitmproxy/pdoc#765), so "Error parsing type annotation ... for X.__init__" passes only where X is a NamedTuple."""

import json
import os
import subprocess
import sys

# The child: pdoc's own API, its warnings recorded (those issued by pdoc's modules only) and each NamedTuple-__init__
# annotation warning checked against the class it names.
CHILD = r"""
import importlib, json, os, re, sys, warnings
from pathlib import Path
import pdoc

def namedtuple_init(message):
    m = re.match(r"Error parsing type annotation ForwardRef\('[^']*'\) for ([\w.]+)\.__init__\. ", message)
    if not m:
        return False
    parts = m.group(1).split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
    return False

here = os.path.dirname(pdoc.__file__)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pdoc.pdoc("spectral_jax", output_directory=Path(sys.argv[1]))
msgs = [str(w.message) for w in caught if w.filename.startswith(here)]
print(json.dumps({"errors": [m for m in msgs if not namedtuple_init(m)], "namedtuple": len(msgs)}))
"""


def test_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "api"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["errors"] == [], "\n\n".join(report["errors"])
    # the face and what it reaches: the package, its subpackages, the model families, the solver modules
    for page in ["spectral_jax.html", "spectral_jax/models.html", "spectral_jax/models/sd.html",
                 "spectral_jax/solvers/exact.html", "spectral_jax/analysis.html", "spectral_jax/dataset.html"]:
        assert (out / page).is_file(), page
    index = (out / "spectral_jax.html").read_text()
    for name in ("analyze", "attribution", "load_backbone", "InputError"):
        assert f'id="{name}"' in index, name
    assert not (out / "spectral_jax/models/testing.html").exists()      # not part of the face
