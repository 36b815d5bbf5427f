"""The protocol and the contract's names import no event loop library, at any depth: a state
machine that does no I/O cannot depend on one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent.parent / "flare_agent_async"
EVENT_LOOPS = {"anyio", "trio", "asyncio", "sniffio", "uvloop"}


def module_level_imports(path: Path) -> set[str]:
    """Absolute names a module imports when it loads (not in functions, not for type checks)."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            if not node.module:  # from . import x: x may be a module
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def source_of(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        path = PACKAGE.parent / candidate
        if path.is_file():
            return path
    return None


def test_the_protocol_and_defs_import_no_event_loop_library() -> None:
    todo = ["flare_agent_async.protocol", "flare_agent_async.defs"]
    seen: set[str] = set()
    found: dict[str, set[str]] = {}
    while todo:
        module = todo.pop()
        path = source_of(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        imports = module_level_imports(path)
        if loops := {name for name in imports if name.split(".")[0] in EVENT_LOOPS}:
            found[module] = loops
        todo.extend(
            name
            for name in imports
            if name.startswith("flare_agent_async.") and name != "flare_agent_async"
        )
    assert "flare_agent_async.protocol._agent" in seen and "flare_agent_async.exceptions" in seen
    assert not found, found
