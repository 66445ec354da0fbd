"""Where megatron-core uses CUDA, read from its source files (not imported): the call sites the
CPU shims exist for, and the CUDA uses inside the functions a CPU run called."""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import cache
from typing import Iterable


@dataclass(frozen=True)
class CallSite:
    module: str
    snippet: str
    function: str | None = None  # qualified as code.co_qualname; None: anywhere in the module


@dataclass(frozen=True)
class CudaCall:
    module: str
    function: str  # qualified as code.co_qualname
    line: int
    text: str


# torch.cuda attributes that are safe on a machine without CUDA
_CUDA_QUERIES = frozenset({"is_available", "device_count", "is_initialized", "OutOfMemoryError"})


def cuda_calls_in_source(source: str, module: str = "") -> list[CudaCall]:
    """Every use of CUDA inside a function of `source`: torch.cuda.* (its queries aside),
    `.cuda()`, and the strings "cuda", "cuda:N" and "torch.cuda.*" (devices, type checks)."""
    return _walk(source, module)[1]


def _walk(source: str, module: str) -> tuple[dict[str, str], list[CudaCall]]:
    """(source of each function and class by qualified name, the CUDA uses in functions)."""
    lines = source.splitlines()
    functions, calls = {}, []

    def visit(node, scope: str, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                # named as code.co_qualname names it: Class.method, outer.<locals>.inner
                name = f"{scope}.<locals>.{child.name}" if in_function else \
                    f"{scope}.{child.name}" if scope else child.name
                functions[name] = ast.get_source_segment(source, child)
                visit(child, name, not isinstance(child, ast.ClassDef))
                continue
            if in_function and _uses_cuda(child):
                calls.append(CudaCall(module, scope, child.lineno, lines[child.lineno - 1].strip()))
            visit(child, scope, in_function)

    visit(ast.parse(source), "", False)
    return functions, calls


def _uses_cuda(node) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
        return not _is_torch(node.func.value)  # tensor.cuda(), module.cuda()
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda":
        return _is_torch(node.value.value) and node.attr not in _CUDA_QUERIES
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value == "cuda" or node.value.startswith(("cuda:", "torch.cuda."))
    return False


def _is_torch(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "torch"


@cache
def _parsed(module: str) -> tuple[str, dict[str, str], dict[str, list[CudaCall]]]:
    """A module's source, its functions' sources and its CUDA uses by function."""
    with open(importlib.util.find_spec(module).origin) as file:
        source = file.read()
    functions, calls = _walk(source, module)
    by_function: dict[str, list[CudaCall]] = {}
    for call in calls:
        by_function.setdefault(call.function, []).append(call)
    return source, functions, by_function


def moved(sites: Iterable[CallSite]) -> list[str]:
    """The sites whose function or snippet is gone."""
    problems = []
    for site in sites:
        source, functions, _ = _parsed(site.module)
        where = f"{site.module}.{site.function}" if site.function else site.module
        text = source if site.function is None else functions.get(site.function)
        if text is None:
            problems.append(f"{where} no longer exists")
        elif site.snippet not in text:
            problems.append(f"{where} no longer contains {site.snippet!r}")
    return problems


def unaccounted(functions: Iterable[tuple[str, str]], known: Iterable[CallSite]) -> list[str]:
    """The CUDA uses in these functions ((module, qualified name) pairs) that no known site
    names, as "module:line function: code"."""
    known = tuple(known)
    found = set()
    for module, function in functions:
        for call in _parsed(module)[2].get(function, []):
            if not any(site.module == module and site.function in (None, function) and site.snippet in call.text
                       for site in known):
                found.add(f"{module}:{call.line} {function}: {call.text}")
    return sorted(found)
