"""The package's shape: dependencies without cycles (lazy imports included), an errors module
that knows nothing above it, modules of a readable size, a short README and docs/ that show
every verb."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_mmprolong"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _owner(name: str) -> str | None:
    """The package module that `name` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """Package modules that `module` imports anywhere in its body, functions included."""
    path = MODULES[module]
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_owner(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            found |= {_owner(f"{base}.{alias.name}") for alias in node.names}
    return {m for m in found if m and m != module}


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph = {m: imports(m) for m in MODULES}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return groups


def test_the_cycle_finder_sees_lazy_imports():
    assert "megatron_mmprolong.runtime" in imports("megatron_mmprolong.training.loop")  # module level
    # MegatronGenerator.from_checkpoint imports the builder inside the method
    assert "megatron_mmprolong.model.builder" in imports("megatron_mmprolong.eval.megatron_generate")


def test_no_import_cycle_in_the_package():
    assert cycles() == []


def test_errors_imports_nothing_from_the_package():
    assert imports("megatron_mmprolong.errors") == set()


def test_module_sizes():
    lines = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in lines.items() if m.startswith("megatron_mmprolong.cli") and n > 500} == {}
    assert {m: n for m, n in lines.items() if n > 600} == {}


def _shown_verbs(text: str) -> set[str]:
    """Command paths ("eval needle", "train") that example lines of `text` run: lines that start
    with `mmprolong` or run `-m megatron_mmprolong.cli` (torchrun on several ranks)."""
    shown = set()
    for line in text.splitlines():
        match = re.match(r"\s*(?:mmprolong|.*-m megatron_mmprolong\.cli) ([a-z][\w-]*)(?: ([a-z][\w-]*))?", line)
        if match:
            shown |= {match[1], f"{match[1]} {match[2]}"}
    return shown


def test_readme_is_short_and_docs_show_every_verb():
    from megatron_mmprolong.cli import build_parser
    from tests.test_cli_help import _verbs

    assert len((ROOT / "README.md").read_text()) < 20_000
    docs = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    verbs = {" ".join(path) for path in _verbs(build_parser()) if path}
    leaves = {v for v in verbs if not any(other.startswith(v + " ") for other in verbs)}
    assert len(leaves) >= 18 and "convert verify" in leaves and "eval score" in leaves
    assert sorted(leaves - _shown_verbs(docs)) == []
