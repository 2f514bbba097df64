"""CLI conventions every command shares: ``avatar --version`` (one version, pyproject's) and
``list --json``."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

import avatar
from avatar.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_is_pyprojects(capsys):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert avatar.__version__ == version
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"avatar {version}"


def test_list_json(tmp_path, capsys):
    assert main(["list", "--json", "--store", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []
