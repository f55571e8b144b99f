"""The package's floors hold: no module imports from a floor above its own, and the small planes import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "localsgd_ft"

# Lowest first. A module may import from its own floor and the floors below it, never from one above.
FLOORS = ["config", "contract", "storage", "results", "launch", "training"]
ENTRY = len(FLOORS)  # the modules at the top level: the command lines, above every floor
TORCH_FREE = ["config", "contract", "storage", "results", "launch"]


def _floor(module: str) -> int:
    """The floor of a dotted module name inside the package."""
    parts = module.split(".")
    assert parts[0] == "localsgd_ft", module
    if len(parts) == 1:
        return -1  # the package itself: only its docstring
    return FLOORS.index(parts[1]) if parts[1] in FLOORS else ENTRY


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue  # runs the command line when executed; importing it would run it
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _imports(module: str, path: Path):
    """Every module of the package that ``path`` imports, anywhere in it (functions too)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        yield from (n for n in names if n == "localsgd_ft" or n.startswith("localsgd_ft."))


def test_every_module_sits_on_a_known_floor():
    tops = {m.split(".")[1] for m, p in _modules() if "." in m and p.parent != PACKAGE}
    assert tops == set(FLOORS), tops


def test_no_module_imports_from_a_floor_above_its_own():
    upward = []
    for module, path in _modules():
        own = _floor(module)
        for imported in _imports(module, path):
            if _floor(imported) > own:
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above would catch a launch module that imports the trainer."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from localsgd_ft.training.trainer import train\n")
    assert [_floor(m) for m in _imports("localsgd_ft.launch.x", bad)] == [FLOORS.index("training")]


@pytest.mark.parametrize("plane", TORCH_FREE)
def test_plane_imports_no_torch(plane):
    modules = [m for m, _ in _modules() if m.startswith(f"localsgd_ft.{plane}")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith(('torch.', 'torchft'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert modules and res.stdout.strip() == "[]", f"{plane} imports {res.stdout.strip()[:300]}"


def test_a_torchrun_worker_arms_its_death_signal_before_any_heavy_import():
    """train_localsgd.py imports lifecycle first: neither torch nor pydantic may come with it."""
    code = ("import sys\nimport localsgd_ft.launch.lifecycle\n"
            "print(sorted(k.split('.')[0] for k in sys.modules if k.split('.')[0] in ('torch', 'pydantic', 'yaml')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_the_contract_exports_every_record_it_defines():
    """`from localsgd_ft.contract import X` works for each public name its modules define (the list is by hand)."""
    import importlib
    import inspect

    import localsgd_ft.contract as contract

    missing = []
    for name in ("names", "records", "summary", "reading"):
        module = importlib.import_module(f"localsgd_ft.contract.{name}")
        for attr, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            if not attr.startswith("_") and defined_here and (inspect.isclass(value) or inspect.isfunction(value)):
                if attr not in contract.__all__:
                    missing.append(f"{module.__name__}.{attr}")
    assert not missing, missing
    assert all(getattr(contract, name) is not None for name in contract.__all__)
