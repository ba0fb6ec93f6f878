"""The pipeline's layers: every import in `trimodal/pipeline/` (importlib's included) goes down, never up.

    datasets, info    the front doors by dataset name
    sources           one module per dataset: reads its raw layout, registers hooks
    shard, validate   jobs over what a source read (a Scan)
    download, read, synthesize
    base              samples, problems, file checks, the Scan

A unit (a package or a module directly under `trimodal/pipeline/`) imports itself and lower layers only,
and nothing in the pipeline imports the features, training or CLI code built on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trimodal.pipeline

PIPELINE = Path(trimodal.pipeline.__file__).parent
PACKAGE = "trimodal.pipeline"
LAYERS = [{"base"}, {"download", "read", "synthesize"}, {"shard", "validate"}, {"sources"}, {"datasets", "info"}]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
ABOVE_THE_PIPELINE = ("trimodal.features", "trimodal.training", "trimodal.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PIPELINE.parent.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    """`download` for trimodal.pipeline.download.fetch; None outside the pipeline or for the package itself."""
    if not module.startswith(PACKAGE + "."):
        return None
    return module[len(PACKAGE) + 1:].split(".")[0]


def imports_of(path: Path, own: str) -> list[tuple[int, str]]:
    """(line, module) for every import of the file: statements, and importlib.import_module / __import__ /
    importlib.util.find_spec calls. A dynamic name the check cannot read is reported as `?<source>`,
    except `f"{__name__}.…"` (the module's own package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = own.split(".")  # a module's package is its name less the last part
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from pkg import mod`
        elif isinstance(node, ast.Call) and _dynamic_import(node.func) and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                found.append((node.lineno, argument.value))
            elif (isinstance(argument, ast.JoinedStr) and isinstance(argument.values[0], ast.FormattedValue)
                  and isinstance(argument.values[0].value, ast.Name) and argument.values[0].value.id == "__name__"):
                found.append((node.lineno, own))
            else:
                found.append((node.lineno, "?" + ast.unparse(argument)))
    return found


def _dynamic_import(func: ast.expr) -> bool:
    name = ast.unparse(func)
    return name in ("importlib.import_module", "import_module", "__import__", "importlib.util.find_spec", "find_spec")


def violations(path: Path, own: str | None = None) -> list[str]:
    """What in `path` (the module `own`, by default the one it is) imports against the layers."""
    own = own or module_name(path)
    unit = unit_of(own)
    problems = []
    for line, module in imports_of(path, own):
        where = f"{own}:{line}"
        if module.startswith("?"):
            problems.append(f"{where}: a dynamic import of {module[1:]} (name it, or import within the package)")
        elif module.startswith(ABOVE_THE_PIPELINE):
            problems.append(f"{where}: imports {module}, which is built on the pipeline")
        elif (target := unit_of(module)) is not None and target in LAYER and unit in LAYER:
            if target != unit and LAYER[target] >= LAYER[unit]:
                problems.append(f"{where}: {unit} (layer {LAYER[unit]}) imports {module} (layer {LAYER[target]})")
    return problems


def pipeline_files() -> list[Path]:
    return sorted(PIPELINE.rglob("*.py"))


def test_every_unit_of_the_pipeline_has_a_layer():
    units = {unit_of(module_name(path)) for path in pipeline_files()} - {None}
    assert units <= set(LAYER), f"units with no layer: {sorted(units - set(LAYER))}"


def test_imports_go_down_the_layers_only():
    problems = [problem for path in pipeline_files() for problem in violations(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, expected", [
    ("from trimodal.pipeline.sources import get_source\n", "shard (layer 2) imports trimodal.pipeline.sources"),
    ("from trimodal.pipeline import sources\n", "shard (layer 2) imports trimodal.pipeline.sources"),
    ("import importlib\nimportlib.import_module('trimodal.pipeline.datasets')\n",
     "shard (layer 2) imports trimodal.pipeline.datasets"),
    ("import importlib\nname = 'x'\nimportlib.import_module(name)\n", "a dynamic import of name"),
    ("from trimodal.training.data import TrimodalDataset\n", "imports trimodal.training.data"),
    ("from .. import datasets\n", "imports trimodal.pipeline.datasets"),
])
def test_the_check_sees_an_import_up_the_layers(tmp_path, source, expected):
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    found = violations(planted, own="trimodal.pipeline.shard.planted")
    assert any(expected in problem for problem in found), found
