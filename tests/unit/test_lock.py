"""The lock files (requirements/*.txt) agree with pyproject.toml and with this venv.

A branch that adds a library to pyproject.toml without refreshing the locks fails here,
saying what to run: `scripts/upgrade --keep` (the locked versions stay, the new library is
added), then commit requirements/.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "requirements"
REFRESH = "run scripts/upgrade --keep and commit requirements/"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins(name: str) -> dict[str, tuple[str, Requirement, int]]:
    """Package -> (version, its requirement line, how many hashes) of a lock file."""
    text = re.sub(r"\\\n", " ", (LOCKS / name).read_text())
    found = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line.partition(" --hash=")[0].strip())
        (version,) = [s.version for s in requirement.specifier if s.operator == "=="]
        hashes = line.count("--hash=sha256:")
        found[canonicalize_name(requirement.name)] = (version, requirement, hashes)
    return found


def applies(requirement: Requirement, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate({"extra": extra})


def declared(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in wanted if applies(r)]


BUILD = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]


@pytest.mark.parametrize(("lock", "wanted"), [
    ("test.txt", declared("test", "fast") + BUILD),
    ("runtime.txt", declared("fast")),
    ("build.txt", BUILD),
])
def test_each_lock_pins_what_pyproject_asks_within_its_range(
        lock: str, wanted: list[Requirement]) -> None:
    locked = pins(lock)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in locked, (f"pyproject.toml asks for {requirement}, which "
                                f"requirements/{lock} lacks: {REFRESH}")
        version = locked[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{lock} pins {name}=={version}, outside pyproject.toml's "
            f"{requirement}: {REFRESH}")


def test_every_pin_has_hashes_and_the_sets_agree() -> None:
    everything = pins("test.txt")
    for lock in ("test.txt", "runtime.txt", "build.txt"):
        for name, (version, _, hashes) in pins(lock).items():
            assert hashes, f"requirements/{lock}: {name} has no hash"
            assert everything.get(name, (version,))[0] == version, (
                f"requirements/{lock} pins {name}=={version}, test.txt "
                f"{everything[name][0]}: {REFRESH}")
            assert name in everything, f"requirements/{lock}: {name} is not in test.txt"


def test_the_build_input_is_pyprojects_build_system() -> None:
    lines = (LOCKS / "build.in").read_text().splitlines()
    listed = [Requirement(line) for line in lines if line and not line.startswith("#")]
    assert sorted(map(str, listed)) == sorted(map(str, BUILD)), (
        "requirements/build.in must list pyproject.toml's [build-system] requires")


def test_this_venv_has_the_locked_versions() -> None:
    for name, (version, requirement, _) in pins("test.txt").items():
        if not applies(requirement):
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name}=={version} is locked but not installed: run scripts/install test")
        assert installed == version, (f"{name} {installed} is installed, the lock says "
                                      f"{version}: run scripts/install test")
