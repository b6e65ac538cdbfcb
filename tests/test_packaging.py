"""What ``pip install .`` puts into the ``trivit`` package."""
from __future__ import annotations

from distutils.core import run_setup
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_folder_is_installed():
    packages = set(run_setup(str(ROOT / "setup.py"), stop_after="init").packages)
    folders = {"trivit." + ".".join(init.parent.relative_to(ROOT).parts)
               for name in ("engine", "sparse", "datasets") for init in (ROOT / name).rglob("__init__.py")}
    assert "trivit.engine.backends" in folders
    assert folders <= packages, f"missing from setup.py: {sorted(folders - packages)}"
