"""The test tree shadows no real package.

pytest puts each test folder on ``sys.path``; a folder or helper module named like an installed
package (``tests/nvflare/`` once was) would be imported instead of it, as a namespace package, and
the tests that need the real one would fail with an import error instead of running or skipping.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def top_level_names_in_tests() -> set[str]:
    """What ``import NAME`` could find in the test tree: every folder and every module."""
    names = set()
    for path in TESTS.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        if path.is_dir() or path.suffix == ".py":
            names.add(path.stem)
    return names


def test_no_test_folder_or_module_is_named_like_an_installed_package() -> None:
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    installed.discard("conftest")  # pytest's own convention, never a package
    clashes = sorted(top_level_names_in_tests() & installed)
    assert not clashes, f"test folders or modules shadow installed packages: {clashes}"


def test_nvflare_resolves_to_the_installed_package() -> None:
    nvflare = pytest.importorskip(
        "nvflare", reason="NVFlare is not installed: pip install -e '.[test]' brings it"
    )
    # A folder of the test tree would import as a namespace package: no __file__, a path in tests/
    assert nvflare.__file__ is not None, f"nvflare is a namespace package: {nvflare.__path__}"
    where = Path(nvflare.__file__).resolve()
    assert not where.is_relative_to(TESTS.resolve()), where
    installed = importlib.metadata.distribution("nvflare").locate_file("nvflare/__init__.py")
    assert where == Path(str(installed)).resolve()
    spec = importlib.util.find_spec("nvflare.apis")
    assert spec is not None, "nvflare is installed without its packages"
