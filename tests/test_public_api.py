"""d3s_core's public API: every submodule declares `__all__`, the package exposes exactly the
union (imported lazily), and the tests use only public names of d3s_core."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import d3s_core

ROOT = Path(__file__).resolve().parents[1]


def test_every_submodule_declares_all_and_the_package_exposes_the_union():
    union = {}
    for name in d3s_core.SUBMODULES:
        mod = importlib.import_module(f"d3s_core.{name}")
        assert hasattr(mod, "__all__"), f"d3s_core.{name} has no __all__"
        for public in mod.__all__:
            assert hasattr(mod, public), f"d3s_core.{name}.__all__ names missing {public}"
            assert public not in union, f"{public} exported by {union.get(public)} and {name}"
            union[public] = name
    assert sorted(union) == d3s_core.__all__
    for public, owner in union.items():
        assert getattr(d3s_core, public) is getattr(
            importlib.import_module(f"d3s_core.{owner}"), public
        )


def test_every_public_definition_is_in_all():
    """A new public function or class must be exported (or renamed with a leading _)."""
    for name in d3s_core.SUBMODULES:
        path = ROOT / "d3s_core" / f"{name}.py"
        tree = ast.parse(path.read_text())
        defined = {
            n.name
            for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.ClassDef) and not n.name.startswith("_")
        }
        mod = importlib.import_module(f"d3s_core.{name}")
        assert defined <= set(mod.__all__), f"{path}: not in __all__: {defined - set(mod.__all__)}"


def test_importing_the_package_imports_no_submodule():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, d3s_core; print(sorted(m for m in sys.modules "
            "if m.startswith('d3s_core.') or m == 'torch'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert out.strip() == "[]"


def test_tests_use_only_public_names_of_d3s_core():
    pattern = re.compile(r"from d3s_core(?:\.\w+)? import ([^\n(]+|\([^)]*\))")
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for m in pattern.finditer(path.read_text()):
            names = [n.strip().split(" as ")[0] for n in m.group(1).strip("()").split(",")]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("_")]
    assert not offenders, offenders
