"""Docstring form: an ``Args:`` section names one argument per line.

``lr, betas, eps: ...`` or ``lr: x. momentum: y.`` on one line hides arguments from a reader
scanning the left margin (and from Sphinx's Napoleon, which parses one name per entry).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_optim"
# An entry: optional */** (varargs), a name, an optional "(type)", then a colon.
ENTRY = re.compile(r"^\*{0,2}[A-Za-z_]\w*( \([^)]*\))?:")


def args_entries(doc: str) -> list[str]:
    """The lines of ``doc``'s ``Args:`` section at entry indentation (continuations skipped)."""
    lines = doc.split("\n")
    if "Args:" not in lines:
        return []
    entries = []
    for line in lines[lines.index("Args:") + 1:]:
        if not line.strip():
            break
        if line.startswith("    ") and not line.startswith("     "):
            entries.append(line[4:])
    return entries


def problems(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        for entry in args_entries(doc or ""):
            head = entry.split(":", 1)[0]
            if not ENTRY.match(entry) or ". " in entry.split(": ", 1)[1] and ENTRY.search(
                    entry.split(": ", 1)[1].split(". ", 1)[-1]):
                found.append(f"{getattr(node, 'name', 'module')}: {head!r}")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_args_sections_name_one_argument_per_line(path):
    assert problems(path.read_text()) == [], f"{path.name}: Args entries naming several arguments"


@pytest.mark.parametrize("doc, bad", [
    ("f.\n\nArgs:\n    lr: the step size.\n    betas: the EMA rates.\n", False),
    ("f.\n\nArgs:\n    lr: the step size,\n        continued here.\n", False),
    ("f.\n\nArgs:\n    lr, betas: as torch.\n", True),
    ("f.\n\nArgs:\n    lr: x. momentum: y.\n", True),
    ("f.\n\nArgs:\n    As :class:`AdamW`, plus coupled.\n", True),
])
def test_the_check_tells_one_from_several(doc, bad):
    source = f"def f():\n    {doc!r}\n"
    assert bool(problems(source)) is bad
