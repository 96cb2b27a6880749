"""One place holds the pins (pyproject.toml); environment.yml must list the same set for conda users."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(requirements):
    pins = {}
    for requirement in requirements:
        name, _, exact = requirement.partition("==")
        assert exact and re.fullmatch(r"[\w.]+", exact), f"{requirement} is not pinned to an exact version"
        pins[name.lower()] = exact
    return pins


def test_every_dependency_is_pinned_exactly_and_torch_is_the_cpu_build_on_disk():
    project = pyproject()["project"]
    pins = pinned(project["dependencies"] + project["optional-dependencies"]["dev"])
    assert pins["torch"] == "2.13.0"


def test_environment_yml_lists_the_same_pins():
    project = pyproject()["project"]
    expected = pinned(project["dependencies"] + project["optional-dependencies"]["dev"])
    text = (ROOT / "environment.yml").read_text()
    listed = pinned(re.findall(r"^\s+- ([\w.-]+==[\w.]+)\s*$", text, re.M))
    assert listed == expected
    assets = pyproject()["tool"]["course"]["no-deps-assets"]
    no_deps_line = re.search(r"pip install --no-deps (?!-e)(.+)$", text, re.M).group(1).split()
    assert no_deps_line == assets


def test_the_installed_environment_matches_the_pins():
    project = pyproject()["project"]
    for name, exact in pinned(project["dependencies"] + project["optional-dependencies"]["dev"]).items():
        assert version(name).split("+")[0] == exact, f"{name} {version(name)} is installed, {exact} is pinned"
