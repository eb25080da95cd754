"""pyproject.toml declares what the code imports, and imports what it declares."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("llava_train", "kernels", "data_tools")
# Declared for a reader that another branch is adding; drop from here once the code imports it.
NOT_YET_IMPORTED = {"webdataset"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(required distributions, optional ones from the extras), normalised."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda specs: {_normalise(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in specs}  # noqa: E731
    optional = set().union(*(names(specs) for specs in project["optional-dependencies"].values()))
    return names(project["dependencies"]), optional


def _imports() -> set[str]:
    """Third-party modules imported anywhere in the packages (lazy imports included)."""
    found = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - set(PACKAGES)


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # module -> installed distributions (a slow scan)


def _distributions(module: str) -> set[str]:
    """The installed distributions that provide `module` (a module not installed maps to its own name)."""
    return {_normalise(d) for d in _providers().get(module, [module])}


def test_every_import_is_declared():
    required, optional = _declared()
    # Extras (flash-attn, triton) are imported lazily; liger-kernel is documented as never required.
    undeclared = {m for m in _imports() if not _distributions(m) & (required | optional)} - {"liger_kernel"}
    assert not undeclared, f"imported but declared nowhere in pyproject.toml: {sorted(undeclared)}"


def test_every_declared_dependency_is_imported():
    required, _ = _declared()
    provided = set().union(*(_distributions(module) for module in _imports()))
    unused = required - provided - NOT_YET_IMPORTED
    assert not unused, f"declared in pyproject's dependencies but imported nowhere: {sorted(unused)}"
