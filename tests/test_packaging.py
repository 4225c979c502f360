"""A wheel holds every package: each folder with an `__init__.py` under spectral_jax/ and models/ is listed in
pyproject's `packages` with the right directory (an editable install finds unlisted ones; `pip install .` would
not)."""

import os
import tomllib

from sjtest import ROOT


def test_every_package_folder_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        st = tomllib.load(f)["tool"]["setuptools"]
    dirs = st.get("package-dir", {})

    def folder(pkg):                        # the directory setuptools uses for `pkg`
        parts = pkg.split(".")
        for i in range(len(parts), 0, -1):
            head = ".".join(parts[:i])
            if head in dirs:
                return os.path.join(dirs[head], *parts[i:])
        return os.path.join(*parts)

    listed = {os.path.normpath(folder(p)) for p in st["packages"]}
    found = set()
    for top in ("spectral_jax", "models"):
        for d, sub, files in os.walk(os.path.join(ROOT, top)):
            sub[:] = [s for s in sub if s != "__pycache__"]
            if "__init__.py" in files:
                found.add(os.path.normpath(os.path.relpath(d, ROOT)))
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject lists folders that are not packages: {sorted(listed - found)}"


def test_models_comes_from_the_install_not_from_a_hook():
    """`spectral_jax.models` is the install's mapping of the checkout's `models/` (setuptools `package-dir`), found
    by the import system as any subpackage; `import spectral_jax` registers nothing. From a bare checkout on
    sys.path (`python -S` skips site-packages and so the editable install's finder) it does not exist: running
    without `pip install -e .` is unsupported (README)."""
    import subprocess
    import sys

    bare = ("import sys; sys.path.insert(0, sys.argv[1]); import spectral_jax; "
            "print('spectral_jax.models' in sys.modules); import spectral_jax.models")
    out = subprocess.run([sys.executable, "-S", "-c", bare, ROOT], capture_output=True, text=True, cwd="/")
    assert out.stdout.split() == ["False"], out.stderr
    assert out.returncode == 1 and "No module named 'spectral_jax.models'" in out.stderr, out.stderr

    installed = "import spectral_jax.models as m, spectral_jax.models.vit as v; print(m.__file__); print(v.__file__)"
    out = subprocess.run([sys.executable, "-c", installed], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [os.path.join(ROOT, "models", "__init__.py"),
                                  os.path.join(ROOT, "models", "vit", "__init__.py")]
