"""Each benchmark starts the way its docstring says, from the repository root, with nothing on
PYTHONPATH (a fresh checkout after `docker/install.sh`): `--help` must parse and exit 0."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(
    p
    for folder in ("benchmarks", "experiments")
    for p in (ROOT / folder).glob("*.py")
    if p.name not in ("__init__.py", "common.py")
)
COMMAND = re.compile(r"python3? (-m (?:benchmarks|experiments)\.\w+|(?:benchmarks|experiments)/\w+\.py)")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_starts_as_its_docstring_says(script):
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    commands = set(COMMAND.findall(doc))
    assert commands, f"{script.name}: its docstring shows no `python ...` command"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for command in commands:
        proc = subprocess.run(
            [sys.executable, *command.split(), "--help"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, f"`python {command} --help`: {proc.stderr[-1500:]}"
        assert "usage:" in proc.stdout
