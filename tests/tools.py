"""External tools some tests drive (Debian's Prometheus and Chromium, the deployment validators): found on the PATH
(or where a package puts them), else the test skips, except where ``.ci/run`` sets the test's
``STEERSERVE_REQUIRE_*`` variable to 1: there a missing tool is a failure, never a silent skip."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

PROMETHEUS = "STEERSERVE_REQUIRE_PROMETHEUS"
BROWSER = "STEERSERVE_REQUIRE_BROWSER"
VALIDATORS = "STEERSERVE_REQUIRE_VALIDATORS"


def missing(what: str, variable: str) -> None:
    """Fail (under ``variable=1``) or skip, saying what is missing and how to get it."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{what} ({variable}=1: .ci/run installs it)")
    pytest.skip(what)


def tool(name: str, variable: str, install: str, *candidates: str) -> str:
    """The path of the program ``name`` (on the PATH, beside this Python, or one of ``candidates``)."""
    beside = Path(sys.executable).parent / name  # console scripts of the test's own environment
    found = shutil.which(name) or next((str(p) for p in (beside, *map(Path, candidates)) if p.is_file()
                                        and os.access(p, os.X_OK)), None)
    if found is None:
        missing(f"needs {name} ({install})", variable)
    assert found is not None
    return found
