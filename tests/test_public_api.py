"""The public face: `spectral_jax.__all__` and `spectral_jax.models.__all__` are the chosen short lists; every name
in every `__all__` of the package resolves and star-imports; no package attribute hides a submodule of the same
name (`spectral_jax.solvers.exact.DENSE_MAX`), and no public function shares its name with a module; the small
random test models stay out of the registry unless SPECTRAL_JAX_TEST_MODELS=1 (the suite's conftest sets it)."""

import importlib
import os
import pkgutil
import subprocess
import sys
import types

import numpy as np
import pytest

import spectral_jax as sj
from spectral_jax.errors import InputError
from spectral_jax.models import registry, testing

FACE = ["Attribution", "Backbone", "ExactSpec", "GdSpec", "GraphSpec", "InputError", "LayerTap", "LayerWeights",
        "Result", "Taps", "View", "analysis", "analyze",
        "attribution", "dataset", "describe", "graphs", "io", "load_backbone", "models", "solve", "solvers", "sweep",
        "viz"]
MODELS_FACE = ["Backbone", "FAMILIES", "Family", "ModelSpec", "PreprocessSpec", "dinov3", "dit", "family", "get_spec",
               "load_backbone", "names", "parse_layers", "sd", "siglip2", "vit"]


def _modules():
    """Every module of the installed package (spectral_jax and spectral_jax.models with their subpackages), but
    `spectral_jax.__main__` (the command line itself)."""
    import spectral_jax.models as models          # its folder is not under spectral_jax/ (package-dir): walk it too

    walks = [pkgutil.walk_packages(sj.__path__, "spectral_jax."), pkgutil.walk_packages(models.__path__, "spectral_jax.models.")]
    return ["spectral_jax", "spectral_jax.models",
            *(info.name for walk in walks for info in walk if not info.name.endswith(".__main__"))]


MODULES = _modules()


def test_the_faces_are_the_chosen_names():
    """A name joins (or leaves) a face by editing this list, with the package docstring saying why."""
    assert sj.__all__ == FACE
    assert sj.models.__all__ == MODELS_FACE
    assert len([n for n in FACE if isinstance(getattr(sj, n), types.ModuleType)]) == 7


def test_the_walk_reaches_the_models_and_the_families():
    assert {"spectral_jax.models", "spectral_jax.models.registry", "spectral_jax.models.testing",
            "spectral_jax.models.sd.modeling", "spectral_jax.solvers.exact", "spectral_jax.cli.analyze"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_resolves_and_star_imports(name):
    module = importlib.import_module(name)
    public = getattr(module, "__all__", None)
    if public is None:
        return
    assert len(public) == len(set(public)), f"{name}.__all__ repeats a name"
    for n in public:
        assert getattr(module, n) is not None, f"{name}.{n}"
    namespace = {}
    exec(f"from {name} import *", namespace)
    assert set(public) <= set(namespace), sorted(set(public) - set(namespace))
    if isinstance(getattr(module, "__getattr__", None), types.FunctionType):      # a lazy package: dir() = its table
        assert set(public) <= set(dir(module))
        assert not [n for n in dir(module) if n.startswith("_") and not n.startswith("__")]
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope  # noqa: B018


def test_the_faces_resolve_to_their_definitions():
    from spectral_jax.models.registry import load_backbone
    from spectral_jax.pipeline import analyze, attribution
    from spectral_jax.solvers.result import Result
    from spectral_jax.taps import Taps

    assert sj.analyze is analyze and sj.attribution is attribution and sj.Result is Result and sj.Taps is Taps
    assert sj.load_backbone is load_backbone and sj.models.load_backbone is load_backbone
    assert sj.InputError is InputError and sj.graphs.__name__ == "spectral_jax.graphs"


@pytest.mark.parametrize("name", [m for m in MODULES if hasattr(importlib.import_module(m), "__path__")])
def test_no_attribute_hides_a_submodule(name):
    """A package attribute named like one of its submodules is that submodule (it was the function `exact` in
    `solvers`, so `spectral_jax.solvers.exact.DENSE_MAX` raised)."""
    package = importlib.import_module(name)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "__main__":
            continue
        sub = importlib.import_module(f"{name}.{info.name}")
        assert getattr(package, info.name, sub) is sub, f"{name}.{info.name} is not the module"


def test_solver_modules_keep_their_names():
    import spectral_jax.solvers.exact as exact_module
    import spectral_jax.solvers.gd as gd_module

    assert sj.solvers.exact is exact_module and sj.solvers.gd is gd_module
    assert sj.solvers.exact.DENSE_MAX == exact_module.DENSE_MAX == 8192
    assert callable(sj.solvers.exact.exact) and callable(sj.solvers.gd.gd)


def test_no_public_function_is_named_like_a_public_module():
    """One name, one meaning on the face: `sj.attribution` (a function) once met `spectral_jax.analysis.attribution`
    (a module). No function or type of `spectral_jax.__all__` is named like a module of the public subpackages
    (the command line's subcommand modules, `spectral_jax.cli.analyze`, are not among them)."""
    subpackages = [n for n in sj.__all__ if isinstance(getattr(sj, n), types.ModuleType)]
    public = {m.rsplit(".", 1)[-1] for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in subpackages}
    assert {"layerwise", "exact", "gd", "registry", "modeling"} <= public
    for n in sj.__all__:
        if not isinstance(getattr(sj, n), types.ModuleType):
            assert n not in public, f"spectral_jax.{n} is not a module, but a public module is named {n}"


# ---------------------------------------------------------------------------------------------------------------
# The test models


def test_test_models_are_not_registered_names():
    assert testing.enabled()                                   # conftest
    assert set(testing.MODELS) == {"sd_tiny", "pixart_tiny", "sd3_tiny", "flux_tiny"}
    assert not set(registry.names()) & set(testing.MODELS)
    for name in testing.MODELS:
        assert registry.get_spec(name) is testing.MODELS[name] and registry.get_spec(name).repo_id is None
    with pytest.raises(InputError) as e:
        registry.get_spec("nope")
    assert not [n for n in testing.MODELS if n in str(e.value)]


def test_test_models_need_the_variable(monkeypatch):
    monkeypatch.delenv(testing.ENV)
    for name in testing.MODELS:
        with pytest.raises(InputError, match=rf"model '{name}': is a test model .* set {testing.ENV}=1"):
            registry.get_spec(name)
    with pytest.raises(InputError, match="is a test model"):
        sj.load_backbone("sd_tiny", "random")
    testing.enable()
    assert os.environ[testing.ENV] == "1" and registry.get_spec("sd_tiny").family == "sd"


def test_console_script_refuses_a_test_model_without_the_variable(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "img.png")
    exe = os.path.join(os.path.dirname(sys.executable), "spectral-jax")
    env = {k: v for k, v in os.environ.items() if k != testing.ENV}
    r = subprocess.run([exe, "extract", "img.png", "--model", "sd_tiny", "--weights", "random", "--out", "a.npz"],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(env, SPECTRAL_JAX_COMPILE_CACHE="0"),
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("spectral-jax extract: error: model 'sd_tiny': is a test model") and \
        f"set {testing.ENV}=1" in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == ["img.png"]
