"""`make demo` and `make test` (README "Quickstart"), read with `make -n` (what would run) on a copy of the Makefile:
the first run creates .venv and installs torch pinned before the package; later runs install nothing until
pyproject.toml changes; CI runs the same `make test`."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


@pytest.fixture
def checkout(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def planned(checkout, target, *args):
    # Under `make test` (CI) the outer make's variables reach this one: a nested make prints "Entering directory"
    # and inherits the outer ARGS. Plan as a user's shell would.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS")}
    r = subprocess.run(["make", "-n", target, *args], cwd=checkout, capture_output=True, text=True, check=True,
                       env=env)
    return r.stdout.splitlines()


def test_first_run_creates_the_venv_and_installs_torch_first(checkout):
    assert planned(checkout, "test") == [
        "python3 -m venv .venv",
        '.venv/bin/python -m pip install --quiet "torch==2.13.0"',
        '.venv/bin/python -m pip install --quiet -e ".[test]"',
        "touch .venv/.installed-test",
        ".venv/bin/python -m pytest -q ",
    ]
    assert planned(checkout, "demo")[-1] == ".venv/bin/python -m pipeline.run "


def test_later_runs_skip_the_install_until_pyproject_changes(checkout):
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").touch()
    (checkout / ".venv" / ".installed-test").touch()
    assert planned(checkout, "demo", "ARGS=cpt.num_epochs=2") == [".venv/bin/python -m pipeline.run cpt.num_epochs=2"]
    later = time.time() + 5
    os.utime(checkout / "pyproject.toml", (later, later))  # a new dependency: install again, into the same .venv
    assert planned(checkout, "test")[:2] == ['.venv/bin/python -m pip install --quiet "torch==2.13.0"',
                                             '.venv/bin/python -m pip install --quiet -e ".[test]"']


def test_ci_runs_the_developers_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script and "\nmake test\n" in script and ".venv-ci" not in script
