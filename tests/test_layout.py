"""The layout DESIGN.md fixes: a command module is imported by cli/main.py alone; model/ imports no CLI."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (`from cli import x` counts as cli.x)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_command_modules_are_imported_by_main_alone():
    files = {f"cli.{p.stem}": p for p in (ROOT / "cli").glob("*.py")}
    # A command module is one that registers commands on the app.
    commands = {name for name, p in files.items() if name != "cli.main" and "cli.main.app" in imported_modules(p)}
    assert {"cli.generate", "cli.inspect", "cli.explain", "cli.heads", "cli.bench", "cli.weights_cmds"} <= commands
    for name, p in files.items():
        if name != "cli.main":
            assert not imported_modules(p) & commands, f"{p.name} imports a command module: {sorted(imported_modules(p) & commands)}"


def test_model_imports_no_cli_library():
    for p in (ROOT / "model").rglob("*.py"):
        bad = {m for m in imported_modules(p) if m.split(".")[0] in ("typer", "rich", "click", "cli")}
        assert not bad, f"{p.relative_to(ROOT)} imports {sorted(bad)}"
