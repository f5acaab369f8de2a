"""The house's structure: no import cycles, run-folder names owned by one module, the run-folder
layout in docs/run-folder.md generated from the code, no oversized classes.

Parsed with ``ast`` (nothing is imported), imports inside functions included: a hidden import
closes a cycle as surely as a top-level one.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("distill", "students")


def _modules():
    """``{dotted name: path}`` of every module of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _resolve(mod, is_pkg, node):
    """Dotted names a ``from``/``import`` node refers to (absolute)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module
    return [stem] + [f"{stem}.{a.name}" for a in node.names]


def import_graph():
    """``{module: set of project modules it imports}`` (anywhere in the file)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _resolve(mod, path.endswith("__init__.py"), node)
                subs = [n for n in names[1:] if n in mods]
                # `from pkg import submodule` imports the submodule; `from pkg import name`, the package
                for name in (subs if subs and isinstance(node, ast.ImportFrom) else names):
                    if name in mods and name != mod:
                        deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or ``None``."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50                      # the walk saw the whole project
    assert "distill.graphio" in graph["distill.teacher"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_teacher_does_not_import_the_training_run():
    graph = import_graph()
    assert "distill.run" not in graph["distill.teacher"]


RUN_FOLDER_NAMES = ("-symbol.json", "metrics.json", "recipe.yaml", "pruning-plan.json",
                    "-0000.params")
OWNERS = {"distill/runfolder.py", "distill/graphio.py"}


def _code_strings(path):
    """String constants of a module outside docstrings (f-string parts included)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_run_folder_names_spelled_only_by_their_owners():
    spelled = {}
    for mod, path in _modules().items():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        hits = sorted({name for s in _code_strings(path) for name in RUN_FOLDER_NAMES if name in s})
        if hits:
            spelled[rel] = hits
    assert set(spelled) <= OWNERS, f"run-folder file names outside their owners: " \
        f"{ {k: v for k, v in spelled.items() if k not in OWNERS} }"


def test_docs_layout_is_the_run_folders():
    from distill.runfolder import LAYOUT
    with open(os.path.join(ROOT, "docs", "run-folder.md")) as f:
        page = f.read()
    m = re.search(r"<!-- run-folder-layout -->\n```\n(.*?)```", page, re.S)
    assert m, "docs/run-folder.md lacks the generated run-folder layout block"
    listed = [line.split()[0] for line in m.group(1).splitlines() if line.strip()]
    assert listed == [name for name, _ in LAYOUT]


def _class_lengths():
    for mod, path in _modules().items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                yield f"{mod}.{node.name}", node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("limit", [250])
def test_no_class_over_limit(limit):
    big = {name: n for name, n in _class_lengths() if n > limit}
    assert not big, f"classes over {limit} lines: {big}"
