"""The README's "Code map" stays true: it lists every module under src/blindfold, each with
what it owns, and nothing that does not exist."""

from __future__ import annotations

import re

from conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "blindfold"
INDENT = 2


def code_map() -> dict[str, str]:
    """The README tree as {path relative to src/: description}; a package (a line ending
    in '/') stands for its __init__.py."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("\n## Code map\n", 1)
    assert len(section) == 2, "README.md has no '## Code map' section"
    tree = re.search(r"```\n(.*?)```", section[1], re.S)
    assert tree is not None, "the Code map section has no ``` block with the tree"
    entries: dict[str, str] = {}
    parents: list[str] = []
    for line in tree.group(1).splitlines():
        if not line.strip():
            continue
        name, _, description = line.strip().partition(" ")
        depth, odd = divmod(len(line) - len(line.lstrip()), INDENT)
        assert not odd and depth <= len(parents), f"misindented Code map line: {line!r}"
        del parents[depth:]
        path = "".join(parents) + name
        if name.endswith("/"):
            parents.append(name)
            path += "__init__.py"
        assert description.strip(), f"{path} needs a description in the Code map"
        # A package's line and its own __init__.py line may both stand for __init__.py.
        assert path not in entries or path.endswith("__init__.py"), f"{path} is listed twice"
        entries[path] = description.strip()
    return entries


def test_code_map_lists_every_module_and_nothing_else() -> None:
    listed = set(code_map())
    modules = {str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")}
    assert not modules - listed, f"add these modules to README.md's Code map: {modules - listed}"
    assert not listed - modules, f"the Code map lists modules that do not exist: {listed - modules}"
