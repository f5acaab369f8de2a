"""The documentation holds: README.md stays short and points at the topic pages in ``docs/``;
every relative link lands on a file (and heading); every command the pages show is one the tools
accept as written; the recipe reference lists every recipe key.

Commands are taken from fenced code blocks (``bash``, ``sh``, ``console`` or no language) of
README.md and docs/*.md: ``distill SUB ...`` and ``python train.py ...`` are parsed by the very
parser the CLI builds (captured from :func:`distill.cli.main` / :func:`distill.cli.train_main`
before it parses anything), so a wrong flag or a missing argument fails here; the recipes they
name must exist and load with their ``--set`` overrides; comparison recipes must load; ``make X``
must be a Makefile target; ``bench/X.py`` flags must be ones the script declares. The cheap ones
(``distill list``, ``distill inspect`` of a registered model, ``--help``) are run. Commands in
inline code (```distill export RUN_DIR --fp16```) are checked for their subcommand and flags.
Nothing trains.
"""
import argparse
import ast
import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import typing
from unittest import mock

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 300
TOPIC_PAGES = ("README.md", "recipes.md", "losses.md", "pruning.md", "int8.md", "export.md",
               "compare.md", "data.md", "troubleshooting.md", "run-folder.md")

# placeholder tokens of the pages -> a value the parsers and checks accept
PLACEHOLDERS = {
    "RECIPE.yaml": "recipes/teacher_mnist.yaml", "RECIPE": "recipes/teacher_mnist.yaml",
    "my.yaml": "recipes/quickstart.yaml", "COMPARE.yaml": "recipes/compare_mnist.yaml",
    "RUN_DIR": "runs/quickstart", "RUN": "runs/quickstart", "MODEL": "mobilenetv2_0.5",
    "PREFIX": "models/mynet", "W": "2", "S": "1", "N": "1", "F": "0.5", "LAYER": "conv0",
}
SHELL_LANGS = ("", "bash", "sh", "shell", "console")


def pages():
    """README.md and every docs/*.md, as paths."""
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def rel(path):
    return os.path.relpath(path, ROOT)


def split_fences(text):
    """``(prose, blocks)``: the text outside fenced code blocks (fenced lines blanked, so line
    numbers hold) and ``[(language, first line number, [lines])]`` for each block."""
    prose, blocks, block = [], [], None
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
        if m and block is None:
            block = (m.group(2).lower(), i + 1, [])
            prose.append("")
        elif m and block is not None and not line.strip().strip("`~"):
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block[2].append(line)
            prose.append("")
        else:
            prose.append(line)
    assert block is None, "an unclosed code fence"
    return "\n".join(prose), blocks


# -- (a) length, pages, links -------------------------------------------------------------------

def test_readme_at_most_300_lines():
    with open(README) as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the limit is {README_MAX_LINES}: move detail to docs/"


@pytest.mark.parametrize("page", TOPIC_PAGES)
def test_topic_page_exists_and_is_linked(page):
    path = os.path.join(DOCS, page)
    assert os.path.isfile(path), f"docs/{page} is missing"
    with open(README) as f:
        readme = f.read()
    if page != "README.md":
        assert f"](docs/{page}" in readme, f"README.md does not link docs/{page}"
        with open(os.path.join(DOCS, "README.md")) as f:
            assert f"]({page})" in f.read(), f"docs/README.md does not list {page}"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation other than ``-``/``_`` dropped,
    spaces to hyphens."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def anchors(path):
    with open(path) as f:
        prose, _ = split_fences(f.read())
    seen, out = {}, set()
    for line in prose.splitlines():
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(2))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path):
    """``[(line number, target)]`` of every markdown link outside code."""
    with open(path) as f:
        prose, _ = split_fences(f.read())
    out = []
    for i, line in enumerate(prose.splitlines(), 1):
        line = re.sub(r"`[^`]*`", lambda m: "" if "](" not in m.group(0) else m.group(0), line)
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):
            out.append((i, m.group(1)))
    return out


@pytest.mark.parametrize("page", pages(), ids=rel)
def test_relative_links_resolve(page):
    bad = []
    for line, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):            # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(dest):
            bad.append(f"line {line}: {target} (no {rel(dest)})")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"line {line}: {target} (no heading #{anchor} in {rel(dest)})")
    assert not bad, f"{rel(page)}: broken links:\n  " + "\n  ".join(bad)


# -- the run-folder layout and the recipe keys, where the docs keep them ------------------------

def _yaml_blocks(path):
    with open(path) as f:
        _, blocks = split_fences(f.read())
    return [(start, "\n".join(lines)) for lang, start, lines in blocks if lang in ("yaml", "yml")]


def _schema_paths(cls, prefix=""):
    """Every key path of the recipe schema (``pruning.target.latency``, ``distillation.loss``)."""
    from distill.recipe import _yaml_key
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == getattr(cls, "_EXTRA", None):
            continue
        path = f"{prefix}.{_yaml_key(f.name)}" if prefix else _yaml_key(f.name)
        yield path
        tp = hints[f.name]
        while typing.get_origin(tp) in (typing.Union, list, typing.List):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
        if tp is not None and dataclasses.is_dataclass(tp):
            yield from _schema_paths(tp, path)


def _doc_paths(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path
            yield from _doc_paths(v, path)
    elif isinstance(node, list):
        for item in node:
            yield from _doc_paths(item, prefix)


def _flat(obj, prefix=""):
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            out.update(_flat(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name))
        return out
    return {prefix: obj}


def test_recipe_reference_lists_every_key():
    """docs/recipes.md: its first YAML block is a whole recipe that loads, with every key at its
    default except the few a run must name; the page's YAML blocks together hold every key of the
    schema (:class:`distill.recipe.Recipe`)."""
    from distill.recipe import Recipe, recipe_from_dict
    path = os.path.join(DOCS, "recipes.md")
    blocks = _yaml_blocks(path)
    assert blocks, "docs/recipes.md has no yaml block"
    reference = yaml.safe_load(blocks[0][1])
    recipe = recipe_from_dict(reference, "docs/recipes.md reference block")
    named = ("name", "data.mean", "data.std", "teacher.recipe", "student.model", "distillation")
    defaults, shown = _flat(Recipe()), _flat(recipe)
    differ = sorted(k for k in defaults if defaults[k] != shown[k] and not k.startswith(named))
    assert not differ, f"docs/recipes.md's reference block is not at the defaults for: {differ}"
    documented = set()
    for _, text in blocks:
        documented |= set(_doc_paths(yaml.safe_load(text)))
    missing = sorted(set(_schema_paths(Recipe)) - documented)
    assert not missing, f"recipe keys missing from docs/recipes.md's yaml blocks: {missing}"
    unknown = sorted(p for p in documented - set(_schema_paths(Recipe))
                     if not p.startswith("distillation."))      # loss options: docs/losses.md
    assert not unknown, f"docs/recipes.md shows keys the schema does not have: {unknown}"


def test_loss_terms_and_their_options_are_documented():
    from distill.losses import LOSSES
    with open(os.path.join(DOCS, "losses.md")) as f:
        text = f.read()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    for name in LOSSES.names():
        assert name in rows, f"docs/losses.md's table has no row for loss `{name}`"
        for option in LOSSES.get(name).OPTIONS:
            assert f"`{option}`" in rows[name], f"docs/losses.md: option `{option}` of `{name}` missing"
    assert "## Measured on Fashion-MNIST" in text


def test_comparison_recipe_keys_and_export_formats_are_documented():
    from distill.compare import spec
    from distill.recipe import EXPORT_FORMATS
    with open(os.path.join(DOCS, "compare.md")) as f:
        compare = f.read()
    missing = [k for k in (*spec._TOP_KEYS, *spec._VARIANT_KEYS) if f"`{k}`" not in compare]
    assert not missing, f"comparison-recipe keys missing from docs/compare.md: {missing}"
    with open(os.path.join(DOCS, "export.md")) as f:
        export = f.read()
    assert all(f"`{fmt}`" in export for fmt in EXPORT_FORMATS)


# -- (b) commands --------------------------------------------------------------------------------

class _Parser(Exception):
    def __init__(self, parser):
        super().__init__("captured")
        self.parser = parser


def _captured(entry):
    """The ArgumentParser ``entry`` (``distill.cli.main`` or ``train_main``) builds, taken at the
    moment it would parse: nothing runs."""
    def grab(self, args=None, namespace=None):
        raise _Parser(self)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            entry([])
        except _Parser as p:
            return p.parser
    raise AssertionError(f"{entry.__name__} parsed nothing")


@pytest.fixture(scope="module")
def parsers():
    from distill import cli
    distill = _captured(cli.main)
    sub = next(a for a in distill._actions if isinstance(a, argparse._SubParsersAction))
    return {"distill": distill, "train.py": _captured(cli.train_main), "sub": sub.choices}


def _makefile_targets():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", f.read(), re.M)}


def _bench_flags(script):
    """The option strings ``bench/SCRIPT`` declares (read with ``ast``; ``_smoke``'s when used)."""
    def flags(path):
        with open(path) as f:
            tree = ast.parse(f.read())
        found, smoke = {"-h", "--help"}, False
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "add_argument":
                    found |= {a.value for a in node.args if isinstance(a, ast.Constant)
                              and isinstance(a.value, str) and a.value.startswith("-")}
                elif node.func.attr == "add_arguments" and getattr(node.func.value, "id", "") == "_smoke":
                    smoke = True
        return found | (flags(os.path.join(ROOT, "bench", "_smoke.py")) if smoke else set())
    return flags(os.path.join(ROOT, script))


def _tokens(line):
    """A command line's words, placeholders replaced, ``$ `` and ``VAR=value`` prefixes gone."""
    line = re.sub(r"^\s*\$\s+", "", line)
    words = shlex.split(line, comments=True)
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    out = []
    for w in words:
        if w in ("...", "…"):
            continue
        w = PLACEHOLDERS.get(w, w)
        w = re.sub(r"<[^>]*>", "x", w.replace("RUN_DIR", "runs/quickstart"))
        out.append(w)
    return out


def _kind(words):
    """``(kind, arguments)`` of a command this test knows, else ``(None, words)``."""
    if not words:
        return None, words
    head = words[0]
    if head in ("distill", ".venv/bin/distill"):
        return "distill", words[1:]
    if head in ("python", "python3", ".venv/bin/python") and len(words) > 1:
        if words[1] in ("train.py", "./train.py"):
            return "train.py", words[2:]
        if words[1].startswith("bench/"):
            return "bench", words[1:]
        if words[1:3] == ["-m", "pytest"]:
            return "pytest", words[3:]
        if words[1:3] == ["-m", "distill.cli"]:
            return "distill", words[3:]
    if head == "make":
        return "make", words[1:]
    return None, words


def fenced_commands():
    """``[(where, line)]``: every command line of a shell block of the pages."""
    out = []
    for page in pages():
        with open(page) as f:
            _, blocks = split_fences(f.read())
        for lang, start, lines in blocks:
            if lang not in SHELL_LANGS:
                continue
            joined, first = "", None
            for i, line in enumerate(lines):
                first = start + i if first is None else first
                if line.rstrip().endswith("\\"):
                    joined += line.rstrip()[:-1] + " "
                    continue
                joined += line
                try:
                    kind, _ = _kind(_tokens(joined))
                except ValueError:                  # not shell (a table row in a plain block)
                    kind = None
                if kind:
                    out.append((f"{rel(page)}:{first}", joined.strip()))
                joined, first = "", None
    return out


def inline_commands():
    """``[(where, span)]``: inline code spans that are ``distill``, ``train.py`` or ``make`` commands."""
    out = []
    for page in pages():
        with open(page) as f:
            prose, _ = split_fences(f.read())
        for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
            span = " ".join(m.group(1).split())
            if re.match(r"(distill|python train\.py|make) \S", span):
                line = prose.count("\n", 0, m.start()) + 1
                out.append((f"{rel(page)}:{line}", span))
    return out


FENCED = fenced_commands()
INLINE = inline_commands()


def _parse(parser, args, text):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"`{text}` does not parse (exit {e.code}): {err.getvalue().strip()}")


def _check_recipe(path, overrides, text):
    from distill.errors import UserError
    from distill.recipe import load_recipe
    assert os.path.isfile(os.path.join(ROOT, path)), f"`{text}`: recipe {path} does not exist"
    try:
        load_recipe(os.path.join(ROOT, path), list(overrides))
    except UserError as e:
        pytest.fail(f"`{text}`: the recipe does not load: {e}")


def check_command(words, text, parsers):
    """Fail unless the command ``words`` is accepted as written (nothing runs)."""
    kind, args = _kind(words)
    for w in words:                               # every bundled recipe a command names exists
        if re.match(r"recipes/[\w.-]+\.ya?ml$", w):
            assert os.path.isfile(os.path.join(ROOT, w)), f"`{text}`: {w} does not exist"
    if kind == "make":
        targets = _makefile_targets()
        bad = [a for a in args if not a.startswith("-") and "=" not in a and a not in targets]
        assert args and not bad, f"`{text}`: {bad or 'no target'} not a Makefile target ({sorted(targets)})"
    elif kind == "bench":
        script, *rest = args
        assert os.path.isfile(os.path.join(ROOT, script)), f"`{text}`: {script} does not exist"
        known = _bench_flags(script)
        bad = [a.split("=")[0] for a in rest if a.startswith("-") and a.split("=")[0] not in known]
        assert not bad, f"`{text}`: {script} has no option {bad} (it has {sorted(known)})"
        if script == "bench/run_all.py":
            names = [a for a in rest if not a.startswith("-")]
            missing = [n for n in names if not os.path.isfile(os.path.join(ROOT, "bench", n + ".py"))]
            assert not missing, f"`{text}`: no bench script {missing}"
    elif kind == "pytest":
        paths = [a.split("::")[0] for a in args if a.startswith("tests/")]
        missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
        assert not missing, f"`{text}`: {missing} do not exist"
    elif kind == "train.py":
        check_flags(words, text, parsers)         # exact option names (argparse takes prefixes)
        if "-h" in args or "--help" in args:
            return
        ns = _parse(parsers["train.py"], args, text)
        _check_recipe(ns.recipe, ns.overrides, text)
    elif kind == "distill":
        check_flags(words, text, parsers)
        if "-h" in args or "--help" in args:
            return
        ns = _parse(parsers["distill"], args, text)
        sub = args[0]                 # launch's worker command takes over ns.command
        if sub in ("train", "sensitivity"):
            _check_recipe(ns.recipe, ns.overrides, text)
        elif sub == "quantize" and ns.recipe:
            _check_recipe(ns.recipe, (), text)
        elif sub == "compare":
            from distill.compare.spec import load_comparison
            from distill.errors import UserError
            for target in ns.targets:
                if target.endswith((".yaml", ".yml")):
                    assert os.path.isfile(os.path.join(ROOT, target)), f"`{text}`: {target} does not exist"
                    try:
                        load_comparison(os.path.join(ROOT, target))
                    except UserError as e:
                        pytest.fail(f"`{text}`: the comparison recipe does not load: {e}")
        elif sub == "launch":
            inner = [w for w in ns.command if w != "--"]
            assert _kind(inner)[0], f"`{text}`: the worker command {inner} is not a command"
            check_command(inner, text, parsers)
    else:
        pytest.fail(f"`{text}` is not a command this test knows")


def check_flags(words, text, parsers):
    """Inline commands may be partial: the subcommand must exist and every flag must be one of its
    parser's (a launch's worker command checked against ``train.py``'s)."""
    kind, args = _kind([w.strip("[]") for w in words])
    if kind == "make":
        return check_command(words, text, parsers)
    if kind not in ("distill", "train.py"):
        return
    worker = []
    if "--" in args:
        args, worker = args[:args.index("--")], args[args.index("--") + 1:]
    if kind == "distill":
        assert args and args[0] in parsers["sub"], f"`{text}`: no subcommand {args[:1]}"
        parser, args = parsers["sub"][args[0]], args[1:]
    else:
        parser = parsers["train.py"]
    known = set(parser._option_string_actions)
    bad = [a.split("=")[0] for a in args
           if a.startswith("-") and not re.match(r"^-\d", a) and a.split("=")[0] not in known]
    assert not bad, f"`{text}`: no option {bad} for {parser.prog}"
    if worker:
        check_flags(worker, text, parsers)


@pytest.mark.parametrize("where,line", FENCED, ids=[w for w, _ in FENCED])
def test_fenced_command_is_accepted(where, line, parsers):
    check_command(_tokens(line), line, parsers)


@pytest.mark.parametrize("where,span", INLINE, ids=[w for w, _ in INLINE])
def test_inline_command_flags_exist(where, span, parsers):
    try:
        words = _tokens(span)
    except ValueError:
        words = span.split()
    check_flags(words, span, parsers)


def test_the_pages_show_commands():
    kinds = {_kind(_tokens(line))[0] for _, line in FENCED}
    assert {"distill", "train.py", "make"} <= kinds
    assert len(FENCED) >= 40 and len(INLINE) >= 20


def test_a_wrong_flag_or_recipe_is_caught(parsers):
    """The checks above fail on a wrong flag, a misspelt recipe key or a missing recipe."""
    for bad in ("distill compare recipes/compare_mnist.yaml --seed 3",     # a prefix argparse takes
                "distill export runs/quickstart --formats onnx",
                "distill quantize runs/quickstart --exclude auto --calib-mode kl",
                "python train.py recipes/quickstart.yaml --set trainer.epoch=3",
                "python train.py recipes/no_such_recipe.yaml",
                "distill compare recipes/compare_mnist.yaml --seeds three",
                "distill launch -n 2 -- python train.py recipes/quickstart.yaml --sett a=1",
                "make demo-all",
                ".venv/bin/python bench/int8.py --no-such-flag"):
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_command(_tokens(bad), bad, parsers)
            print(f"not caught: {bad}")
    with pytest.raises(AssertionError):
        check_flags(_tokens("distill sensitivity RECIPE --target-lat 0.4"), "x", parsers)


def _cheap(words):
    kind, args = _kind(words)
    if kind == "train.py":
        return "--help" in args or "-h" in args
    if kind != "distill" or not args:
        return False
    if "--help" in args or "-h" in args or args == ["list"]:
        return True
    if args[0] == "inspect" and len(args) > 1:            # a registered model name: no files read
        from students import list_students
        return args[1] in list_students()
    return False


def test_cheap_commands_run():
    """``distill list``, ``distill inspect MODEL`` and every ``--help`` shown, run as written."""
    cheap = {}
    for where, line in FENCED:
        words = _tokens(line)
        if _cheap(words):
            cheap.setdefault(tuple(words), where)
    for cmd in ("distill --help", "python train.py --help"):
        cheap.setdefault(tuple(cmd.split()), "test")
    assert any(w[:2] == ("distill", "list") for w in cheap), "no page shows `distill list`"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for words, where in cheap.items():
        kind, args = _kind(list(words))
        exe = [sys.executable, "-m", "distill.cli"] if kind == "distill" else [sys.executable, "train.py"]
        res = subprocess.run(exe + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{where}: `{' '.join(words)}` exited {res.returncode}: {res.stderr[-2000:]}"
        if args == ["list"]:
            assert "students:" in res.stdout and "losses:" in res.stdout
