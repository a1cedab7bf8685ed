"""pyproject.toml lists every package and every entry point resolves (a wheel ships exactly
what `packages` names, whatever an editable install happens to find)."""

from __future__ import annotations

import importlib
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_is_listed():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for package, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "third_party" in rel or "build" in rel:
                continue
            found.add(".".join((package, *rel)))
    assert found <= listed, f"not in [tool.setuptools] packages: {sorted(found - listed)}"


def test_every_entry_point_resolves():
    groups = _pyproject()["project"]["entry-points"]
    assert set(groups) == {"seif.converters", "seif.conformance_backends"}
    for group in groups.values():
        for target in group.values():
            module, _, attr = target.partition(":")
            assert callable(getattr(importlib.import_module(module), attr)), target
