"""The CI guard in tests/conftest.py: with SPECTRAL_JAX_REQUIRE_ALL=1 (set by `.ci/run`) a skipped test or test file
fails and names what is missing; without it the same tests skip. Runs the real conftest in an inner pytest."""

import os

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sjtest import ROOT

pytest_plugins = ["pytester"]

CONFTEST = os.path.join(ROOT, "tests", "conftest.py")
PINS = "constraints/py311-linux-x86_64.txt"

MODULE_SKIP = """
import pytest
pytest.importorskip("sj_ci_guard_absent_module")

def test_never_runs():
    pass
"""

TEST_SKIPS = """
import pytest

def test_passes():
    pass

def test_data_missing():
    pytest.skip("test image ../shared/data/x.jpg is not present")

def test_import_missing():
    pytest.importorskip("img_focus_ci_guard_absent")

@pytest.mark.skip(reason="marked")
def test_marked():
    pass

@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def inner(pytester):
    with open(CONFTEST) as f:
        pytester.makeconftest(f.read())
    return pytester


def test_a_skipped_test_file_fails_collection_in_ci(inner, monkeypatch):
    monkeypatch.setenv("SPECTRAL_JAX_REQUIRE_ALL", "1")
    inner.makepyfile(test_module_skip=MODULE_SKIP)
    result = inner.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED       # a collection error: nothing runs, CI fails
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert ("SPECTRAL_JAX_REQUIRE_ALL=1 (CI): test_module_skip.py was skipped (could not import "
            "'sj_ci_guard_absent_module'") in out
    assert ("the package `sj-ci-guard-absent-module` is missing: install the test extras, "
            f'pip install -c {PINS} -e ".[test]"') in out


def test_skipped_tests_fail_in_ci_and_xfail_stays(inner, monkeypatch):
    monkeypatch.setenv("SPECTRAL_JAX_REQUIRE_ALL", "1")
    inner.makepyfile(test_skips=TEST_SKIPS)
    result = inner.runpytest("-p", "no:cacheprovider", "-rfE")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # the marker skips in setup (an error); pytest.skip and importorskip inside the test fail it
    result.assert_outcomes(passed=1, failed=2, errors=1, xfailed=1)
    out = result.stdout.str()
    assert "test_skips.py::test_data_missing was skipped (test image ../shared/data/x.jpg is not present)" in out
    assert "a copy of shared/ beside the checkout" in out
    assert "the package `img-focus-ci-guard-absent` is missing" in out
    assert "test_skips.py::test_marked was skipped (marked)" in out


def test_an_allowed_skip_stays_a_skip_for_its_own_reason_only(pytester, monkeypatch):
    monkeypatch.setenv("SPECTRAL_JAX_REQUIRE_ALL", "1")
    with open(CONFTEST) as f:
        pytester.makeconftest(f.read() + '\nALLOWED_SKIPS["test_skips.py::test_data_missing"] = "test image"\n'
                              'ALLOWED_SKIPS["test_skips.py::test_import_missing"] = "test image"\n')
    pytester.makepyfile(test_skips=TEST_SKIPS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=1, xfailed=1)   # the import skip still fails
    assert "test_import_missing was skipped (could not import 'img_focus_ci_guard_absent'" in result.stdout.str()


def test_the_allowed_skips_name_existing_tests(pytestconfig):
    conftest = pytestconfig.pluginmanager.get_plugin(CONFTEST)        # registered under its path
    assert conftest is not None
    for nodeid in conftest.ALLOWED_SKIPS:
        path, name = nodeid.split("::")
        with open(os.path.join(ROOT, *path.split("/"))) as f:
            assert f"def {name.split('[')[0]}(" in f.read(), nodeid


@pytest.mark.parametrize("value", [None, "", "0"])
def test_outside_ci_the_same_tests_skip(inner, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("SPECTRAL_JAX_REQUIRE_ALL", raising=False)
    else:
        monkeypatch.setenv("SPECTRAL_JAX_REQUIRE_ALL", value)
    inner.makepyfile(test_module_skip=MODULE_SKIP, test_skips=TEST_SKIPS)
    result = inner.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert "SPECTRAL_JAX_REQUIRE_ALL=1 (CI)" not in result.stdout.str()


def test_the_pins_cover_every_dependency_and_ci_uses_them():
    """Every requirement of the package and its test/bench extras has a pin that satisfies it (a dependency added
    to pyproject.toml without refreshing the pins would float in CI), and `.ci/run` installs with that file."""
    tomllib = pytest.importorskip("tomllib")                 # Python ≥ 3.11, as the pins are
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, *PINS.split("/"))) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    pins = {}
    for ln in lines:
        name, version = ln.split("==")
        pins[canonicalize_name(name)] = version
    assert len(pins) == len(lines)
    for build in ("pip", "setuptools", "wheel"):
        assert build in pins
    wanted = project["dependencies"] + project["optional-dependencies"]["test"] \
        + project["optional-dependencies"]["bench"]
    for spec in map(Requirement, wanted):
        name = canonicalize_name(spec.name)
        assert name in pins, f"{spec} has no pin in {PINS}: refresh it (README, 'Pinned installs')"
        assert spec.specifier.contains(pins[name], prereleases=True), f"{spec} vs pinned {pins[name]}"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert f"lock={PINS}\n" in ci and '-c "$lock" --build-constraint "$lock" -e ".[test]"' in ci
    assert "export SPECTRAL_JAX_REQUIRE_ALL=1\n" in ci
