"""The rooms of docs/architecture.md import one way, checked by import-linter (contract in pyproject.toml).

qkv's rooms are top-level folders installed under one namespace (``model/`` → ``qkv.model``), a layout
import-linter cannot walk from the installed package. The test lays the sources out as they are
installed — ``qkv/`` with ``model/``, ``train/``... inside — in a temporary folder and runs
``lint-imports`` there with the project's own contract.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"model": "model", "train": "train", "data": "data", "inference": "inference", "tools": "tools",
         "launch": "launch"}


def installed_layout(dest: Path) -> Path:
    """Copy every package's .py files into ``dest/qkv/...`` as pip installs them; returns dest."""
    (dest / "qkv").mkdir(parents=True)
    for f in (ROOT / "qkv").glob("*.py"):
        shutil.copy(f, dest / "qkv" / f.name)
    for name, folder in ROOMS.items():
        (dest / "qkv" / name).mkdir()
        for f in (ROOT / folder).glob("*.py"):
            shutil.copy(f, dest / "qkv" / name / f.name)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.argv = ['lint-imports', " \
           "'--no-cache', 'pyproject.toml']; lint_imports_command()"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_layout_covers_every_package_folder():
    declared = re.findall(r'"qkv\.(\w+)" = "(\w+)"', (ROOT / "pyproject.toml").read_text())
    assert {k: v for k, v in declared if k != "configs"} == ROOMS


def test_rooms_import_downwards_only(tmp_path):
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, forbidden", [
    ("model/layers.py", "from qkv.train import config"),   # the model may not know training
    ("data/corpus.py", "import qkv.model"),                 # data and model are independent
    ("train/loop.py", "from qkv.inference import decode"),  # training may not reach up into inference
    ("tools/plan.py", "from qkv.cli import main"),          # nothing below the CLI imports it
])
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, forbidden):
    tree = installed_layout(tmp_path)
    target = tree / "qkv" / module
    target.write_text(target.read_text() + f"\n{forbidden}\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    importer = "qkv." + module[:-3].replace("/", ".")
    assert importer in result.stdout, result.stdout


def test_no_private_names_are_imported_from_other_packages():
    """A library's underscore modules and names are not its API and change without notice (optax moved Muon's
    width scaling into a private ``optax.contrib._muon.scale_by_shape``): qkv imports only public names, even
    inside functions."""
    import ast

    private = []
    for folder in ("qkv", *ROOMS.values()):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                           else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                if any(p.startswith("_") and not p.startswith("__") for m in modules for p in m.split(".")) or \
                        any(n.startswith("_") and not n.startswith("__") for n in names):
                    private.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not private, private
