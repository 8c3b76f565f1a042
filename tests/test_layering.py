"""Which package may import which (../shared/DESIGN.md's layers): an AST scan of every module's
imports, top-level and inside functions alike. A package may import only packages of a lower
rank; the leaf modules (errors, config, outputs, sampling_params, pooling_params) import no
package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tokenmill"
RANK = {
    "errors": 0,
    "config": 0,
    "outputs": 0,
    "sampling_params": 0,
    "pooling_params": 0,
    "lora_request": 0,
    "core": 1,
    "kernels": 1,
    "quant": 1,
    "sample": 1,  # core: pure Python, no torch
    "layers": 2,
    "models": 3,
    "loader": 4,
    "worker": 4,
    "engine": 5,
    "server": 6,
    "bench": 6,
    "cli": 7,
    "__init__": 7,
    "__main__": 8,
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n.split(".")[1] for n in names if n.startswith("tokenmill."))
    return found


def test_every_package_imports_only_lower_layers():
    violations, seen = [], set()
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        pkg = rel[0]
        seen.add(pkg)
        assert pkg in RANK, f"{pkg} has no layer: add it to RANK (and to DESIGN.md)"
        for target in _imports(path) - {pkg}:
            if RANK[target] >= RANK[pkg]:
                violations.append(f"{'/'.join(rel)}.py imports tokenmill.{target}")
    assert not violations, "\n".join(violations)
    assert seen >= {"core", "engine", "server", "worker", "models", "layers", "quant"}


def test_the_scan_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    from tokenmill.engine.llm import LLM\n    import tokenmill.core.x\n"
    )
    assert _imports(f) == {"engine", "core"}
