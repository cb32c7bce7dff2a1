"""The rules between the code's layers (docs/ARCHITECTURE.md), checked on every module's
imports: a change that breaks one fails here, with the file and the import named."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

ENTRY_POINTS = (
    "trainer.main",
    "trainer.sample",
    "trainer.register",
    "trainer.evaluate",
    "trainer.promote",
    "trainer.cli",
    "trainer.tune",
)
# room -> imports (module prefixes) it must never make
FORBIDDEN = {
    "trainer/gan": (
        "deepspeed",
        "ray",
        "mlflow",
        "hydra",
        "trainer.train",
        "trainer.services",
        *ENTRY_POINTS,
    ),
    "trainer/config": (
        "torch",
        "deepspeed",
        "ray",
        "mlflow",
        "hydra",
        "trainer.gan",
        "trainer.train",
        "trainer.services",
    ),
    "trainer/eval": (
        "deepspeed",
        "ray",
        "mlflow",
        "hydra",
        "trainer.gan",
        "trainer.train",
        "trainer.services",
        *ENTRY_POINTS,
    ),
    "trainer/train": ("mlflow", "hydra", "trainer.services", *ENTRY_POINTS),
    "trainer/services": ENTRY_POINTS,
    # The data layer reads the schema (its defaults are the data section's) and nothing else of
    # the trainer.
    "data_pipeline": (
        "trainer.gan",
        "trainer.eval",
        "trainer.train",
        "trainer.services",
        *ENTRY_POINTS,
        "deepspeed",
        "ray",
        "mlflow",
        "hydra",
    ),
}
# heavy dependency -> the only modules that import it
ONLY_IN = {
    "deepspeed": {"trainer/train/engines.py"},
    "mlflow": {"trainer/services/tracking.py"},
    "hydra": {"trainer/main.py", "trainer/services/compose.py", "trainer/services/sweep_check.py"},
    "torchmetrics": {"trainer/eval/metrics.py"},
    "prdc": set(),  # the tests' reference for trainer/eval/metrics.py's blockwise version
}


def imports(path: Path, base: Path = ROOT) -> set[str]:
    """Every module `path` imports (absolute names; relative imports resolved to the package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:
                package = ".".join(path.relative_to(base).with_suffix("").parts[: -node.level])
                module = f"{package}.{module}"
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def sources() -> list[Path]:
    return sorted(p for folder in ("trainer", "data_pipeline") for p in (ROOT / folder).rglob("*.py"))


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_rooms_exist():
    for room in FORBIDDEN:
        assert (ROOT / room / "__init__.py").is_file(), f"{room} is missing"
    assert len(sources()) > 20


def violations(base: Path, room: str) -> list[str]:
    return [
        f"{p.relative_to(base)} imports {name}"
        for p in sorted((base / room).rglob("*.py"))
        for name in sorted(imports(p, base))
        if any(matches(name, f) for f in FORBIDDEN[room])
    ]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_no_room_imports_what_it_must_not(room):
    broken = violations(ROOT, room)
    assert not broken, "layering broken: " + "; ".join(broken)


@pytest.mark.parametrize("dependency", sorted(ONLY_IN))
def test_each_heavy_dependency_is_imported_in_one_place(dependency):
    users = {str(p.relative_to(ROOT)) for p in sources() if any(matches(n, dependency) for n in imports(p))}
    assert users == ONLY_IN[dependency]


def entry_point_imports(base: Path) -> list[str]:
    """Entry points that import another entry point (they share services instead)."""
    return [
        f"{name} imports {other}"
        for name in ENTRY_POINTS
        for other in sorted(imports(base / f"{name.replace('.', '/')}.py", base))
        if any(matches(other, e) for e in ENTRY_POINTS if e != name)
    ]


def test_entry_points_import_services_not_each_other(tmp_path):
    assert entry_point_imports(ROOT) == []
    (tmp_path / "trainer").mkdir()
    for name in ENTRY_POINTS:
        (tmp_path / f"{name.replace('.', '/')}.py").write_text("import torch\n")
    (tmp_path / "trainer" / "promote.py").write_text("from trainer.evaluate import training_data\n")
    assert entry_point_imports(tmp_path) == [
        "trainer.promote imports trainer.evaluate",
        "trainer.promote imports trainer.evaluate.training_data",
    ]


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: a gan module importing deepspeed or a service is caught, a
    relative import included."""
    gan = tmp_path / "trainer" / "gan"
    gan.mkdir(parents=True)
    (gan / "bad.py").write_text("import deepspeed\nfrom ..services import tracking\nimport torch\n")
    assert violations(tmp_path, "trainer/gan") == [
        "trainer/gan/bad.py imports deepspeed",
        "trainer/gan/bad.py imports trainer.services",
        "trainer/gan/bad.py imports trainer.services.tracking",
    ]


def test_architecture_doc_names_every_module():
    """docs/ARCHITECTURE.md stays true to the tree: each package and each module of a layer is
    named there (modules of a nested package by the package's folder)."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for p in sorted((ROOT / "trainer").rglob("*.py")):
        rel = p.relative_to(ROOT / "trainer")
        if p.name == "__init__.py":
            named = len(rel.parts) == 1 or f"{rel.parent.name}/" in doc
        elif len(rel.parts) > 2:  # trainer/gan/models/dcgan.py: the folder counts
            named = f"{rel.parts[-2]}/" in doc
        else:
            named = p.name in doc
        if not named:
            missing.append(str(rel))
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {missing}"
