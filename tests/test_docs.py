"""The documents name what exists: every file, class and function they put in backticks is in the tree, the
sampling table in docs/API.md is the code's, and imports between the top-level folders point one way."""

from __future__ import annotations

import ast
import builtins
import re
from functools import cache
from pathlib import Path

import pytest

from pipeline.sampling import SAMPLING_FIELDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/ARCHITECTURE.md", "docs/API.md")
LAYERS = ("pipeline", "workers", "cluster", "bench", "tools")
"""Lowest first: a folder may import the folders before it, never one after it (``proto`` stands apart)."""

_PATH = re.compile(r"^[\w./-]+\.(?:py|md|yaml|json|proto|txt|toml)$")
_DOTTED = re.compile(r"^([A-Z]\w+)\.(\w+)$")
_CLASS = re.compile(r"^[A-Z][a-z]+[A-Z]\w*$")  # CamelCase: SamplingParams, not ALL_CAPS or a word


@cache
def definitions() -> tuple[set[str], dict[str, set[str]]]:
    """Every class and function defined in the project's Python, and each class's members."""
    names: set[str] = set()
    members: dict[str, set[str]] = {}
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in (".venv", ".git", "build"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                found = members.setdefault(node.name, set())
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        found.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        found.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        found.update(t.id for t in item.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    names.update(re.findall(r"^(?:message|enum|service) (\w+)", (ROOT / "proto/binserve/v1/generation.proto").read_text(), re.M))
    names.update(dir(builtins))
    return names, members


def named_in(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks show commands, not names
    return [m.strip("`").rstrip("()") for m in re.findall(r"`[^`\n]+`", text)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_file_class_and_method_the_doc_names_exists(doc: str) -> None:
    names, members = definitions()
    missing = []
    for token in named_in(doc):
        if _PATH.match(token) and "/" in token and "<" not in token:
            if not (ROOT / token).exists():
                missing.append(token)
        elif match := _DOTTED.match(token):
            cls, member = match.groups()
            if cls in members and member not in members[cls]:
                missing.append(token)
        elif _CLASS.match(token) and token not in names:
            missing.append(token)
    assert not missing, f"{doc} names what the code does not have: {missing}"


def test_the_api_docs_sampling_table_is_the_codes() -> None:
    text = (ROOT / "docs/API.md").read_text()
    for field in SAMPLING_FIELDS:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{field.name}`")), None)
        if row is None:  # the penalties share a row
            row = next(line for line in text.splitlines() if f"`{field.name}`" in line and line.startswith("|"))
        allowed = field.allowed.replace("9223372036854775807", "2^63 - 1").replace(".0", "")
        assert allowed in row.replace(".0", ""), (field.name, field.allowed, row)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # inside functions too
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_imports_between_top_level_folders_point_one_way() -> None:
    wrong = []
    for rank, layer in enumerate(LAYERS):
        above = set(LAYERS[rank + 1 :])
        for path in sorted((ROOT / layer).rglob("*.py")):
            for top in _imports(path) & above:
                wrong.append(f"{path.relative_to(ROOT)} imports {top}")
    assert not wrong, wrong
