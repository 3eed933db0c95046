"""The documentation's commands and links work.

Every command in README.md and docs/*.md that runs fedsparse, in a code block or an inline code
span, is dry-run without training:

- `python -m fedsparse OVERRIDES` and the `overrides="..."` of `flwr run --run-config`: the
  overrides are checked (`check_overrides`: unknown keys, unknown options of a config group or
  preset) and composed and validated (`compose_config`) once per value of every swept override;
  a command that resumes a run directory that does not exist here is skipped with the reason
  (`resume=outputs/<run>`), and one with `...` in it is a pattern, not a command;
- `python -m fedsparse.MODULE` and `python experiments/SCRIPT.py`: the module or script exists
  and knows every `--flag` the command passes (their behaviour has its own tests).

Every relative link (and image) must point to an existing file, and an anchor into a Markdown
file to one of its headings (GitHub's slugs).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from fedsparse.run import check_overrides, compose_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
SEPARATORS = {";", "&&", "||", "|", "&"}
PYTHON = re.compile(r"(^|/)python(3(\.\d+)?)?$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    where: str  # doc:line
    kind: str  # "overrides", "module" or "script"
    target: str  # the module or script ("fedsparse" for overrides)
    args: tuple[str, ...]


def _blank_fences(text: str) -> str:
    """The text with every fenced code block blanked (line numbers kept)."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), text)


def _shell_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    """A code block's logical lines (continuations joined, here-document bodies left out)."""
    lines, out, heredoc, pending, start = block.splitlines(), [], None, "", 0
    for number, line in enumerate(lines, first_line):
        if heredoc:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
        marker = HEREDOC.search(line)
        heredoc = marker[1] if marker else None
    return out


def _segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ; && || | &), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: prose in a code span, not a command
        return []
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    return [s for s in segments + [current] if s]


def _commands_in(tokens: list[str], where: str) -> list[Command]:
    if any("..." in t for t in tokens):  # `python -m fedsparse ...`: a pattern, not a command
        return []
    if len(tokens) > 2 and tokens[0].endswith("flwr") and tokens[1] == "run":
        configs = [t for i, t in enumerate(tokens) if i and tokens[i - 1] == "--run-config"]
        found = [re.fullmatch(r'overrides="(.*)"', c, re.S) for c in configs]
        return [Command(where, "overrides", "fedsparse", tuple(shlex.split(m[1]))) for m in found if m]
    if not PYTHON.search(tokens[0]) or len(tokens) < 2:
        return []
    if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] == "fedsparse":
        if tokens[2] == "fedsparse":
            return [Command(where, "overrides", "fedsparse", tuple(t for t in tokens[3:] if t[0] != "-"))]
        return [Command(where, "module", tokens[2], tuple(tokens[3:]))]
    if tokens[1].endswith(".py"):
        return [Command(where, "script", tokens[1], tuple(tokens[2:]))]
    return []


def doc_commands(doc: Path) -> list[Command]:
    """The fedsparse commands of one document: in code blocks and in inline code spans."""
    text, name = doc.read_text(), doc.relative_to(REPO).as_posix()
    found = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start(1)) + 1
        for number, line in _shell_lines(block[1], first):
            for tokens in _segments(line):
                found += _commands_in(tokens, f"{name}:{number}")
    prose = _blank_fences(text)
    for span in re.finditer(r"`([^`]+)`", prose):
        number = prose.count("\n", 0, span.start()) + 1
        for tokens in _segments(" ".join(span[1].split())):
            found += _commands_in(tokens, f"{name}:{number}")
    return found


COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


def test_the_docs_have_commands_to_check():
    """The extraction itself works: the README's and the docs' known commands are found."""
    wheres = {c.where.split(":")[0] for c in COMMANDS}
    assert {"docs/results.md", "docs/configuration.md", "docs/deployment.md", "docs/privacy.md"} <= wheres
    kinds = {c.kind for c in COMMANDS}
    assert kinds == {"overrides", "module", "script"}
    flwr = [c for c in COMMANDS if c.where.startswith("docs/deployment.md") and c.kind == "overrides"]
    assert any("output_dir=/app/results" in c.args for c in flwr)  # from flwr run --run-config


def _variants(overrides: tuple[str, ...]) -> list[list[str]]:
    """The overrides with each swept override at its first value, then at each other value in turn."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    choices = []
    for given, override in zip(overrides, parsed):
        if override.is_sweep_override() and override.is_choice_sweep():
            key = given.split("=", 1)[0]
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([given])
    first = [c[0] for c in choices]
    return [first] + [first[:i] + [v] + first[i + 1 :] for i, c in enumerate(choices) for v in c[1:]]


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where} {c.target}" for c in COMMANDS])
def test_documented_command_is_valid(command: Command):
    if command.kind == "overrides":
        for override in command.args:
            key, _, value = override.partition("=")
            if key == "resume" and not (REPO / value).is_dir():
                pytest.skip(f"resume={value}: names a run directory that does not exist here")
        check_overrides(command.args)
        for variant in _variants(command.args):
            compose_config(variant)
        return
    if command.kind == "module":
        spec = importlib.util.find_spec(command.target)
        assert spec and spec.origin, f"{command.where}: no module {command.target}"
        files = [Path(spec.origin)]
        if spec.submodule_search_locations:  # a package run by its __main__: its modules' options
            files = sorted(Path(spec.origin).parent.glob("*.py"))
    else:
        path = REPO / command.target
        assert path.is_file(), f"{command.where}: no script {command.target}"
        files = [path]
    options = set().union(*(_options(f) for f in files))
    for flag in (a.split("=", 1)[0] for a in command.args if a.startswith("--")):
        assert flag in options, f"{command.where}: {command.target} has no option {flag}"


def _options(path: Path) -> set[str]:
    """The option strings a file's argparse parsers declare (`add_argument("--x", ...)`)."""
    return {
        arg.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--")
    }


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of a document's headings; a repeated heading gets -1, -2, ..."""
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", _blank_fences(doc.read_text()), re.M):
        base = slug(heading)
        found.add(base if base not in counts else f"{base}-{counts[base]}")
        counts[base] = counts.get(base, 0) + 1
    return found


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_relative_links_point_to_existing_files_and_headings(doc: Path):
    prose = re.sub(r"`[^`]*`", "", _blank_fences(doc.read_text()))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)
