"""The README and docs/*.md run as written: every ``blip2 ...`` command line in their ```bash / ```text blocks is
parsed by the real parser (``blip2.cli.build_parser``), the cheap ones (``--help``, ``blip2 info PRESET``) run through
``blip2.cli.main``, and every ``blip2 train`` recipe (with its ``--set`` overrides) loads.

A command line starts with ``blip2 `` or ``$ blip2 `` (or is ``torchrun ... -m blip2.cli ...`` / ``python -m
blip2.cli ...``); backslash continuations are joined and a ``#`` comment dropped, as bash would; nothing else is
expanded for parsing (``$DATA`` stays a literal word), and placeholders such as ``M`` or ``DIR`` are fine. Only the
recipe check expands a variable, and only one assigned earlier in the same block (``DATA="data.captions=..."``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from blip2.cli import build_parser, main
from blip2.config import PRESETS
from blip2.demo.run import recipe_file
from blip2.train.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^\s*```(\w*)\s*$")
CHECKED_BLOCKS = ("bash", "text")
MODULE_LAUNCHERS = re.compile(r"^(?:torchrun|python3?)\b.*?\s-m\s+blip2\.cli(?:\s+|$)")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")  # NAME=value, a shell variable set in a block


@dataclass(frozen=True)
class DocCommand:
    file: Path
    line: int  # where the command starts (1-based)
    text: str  # as written, continuations joined
    argv: tuple[str, ...]  # what follows "blip2" (or "-m blip2.cli")
    variables: tuple[tuple[str, str], ...] = ()  # NAME=value lines before it in its block

    def expanded_argv(self) -> list[str]:
        """``argv`` with the block's variables expanded as bash would ($NAME splits into words, "$NAME" stays one)."""
        text = self.text
        for name, value in sorted(self.variables, key=lambda item: -len(item[0])):
            text = text.replace(f"${{{name}}}", value).replace(f"${name}", value)
        return blip2_arguments(text)

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.text}"


def strip_comment(line: str) -> str:
    """``line`` without a bash comment: a ``#`` that starts a word outside quotes, to the end of the line."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """The (first line number, lines) of every ```bash or ```text block."""
    blocks, current, start, language = [], None, 0, ""
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence and current is None:
            current, start, language = [], number + 1, fence.group(1)
        elif line.strip() == "```" and current is not None:
            if language in CHECKED_BLOCKS:
                blocks.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def blip2_arguments(command: str) -> list[str] | None:
    """The arguments after ``blip2`` in a shell command line, or None when it does not run blip2."""
    command = command.strip().removeprefix("$ ")
    if command.startswith("blip2 ") or command == "blip2":
        return shlex.split(command)[1:]
    launcher = MODULE_LAUNCHERS.match(command)
    if launcher:
        return shlex.split(command[launcher.end():])
    return None


def commands_in(file: Path, text: str | None = None) -> list[DocCommand]:
    """Every blip2 command line of ``file`` (or of ``text``, read as that file)."""
    text = file.read_text(encoding="utf-8") if text is None else text
    found = []
    for start, lines in code_blocks(text):
        index, variables = 0, {}
        while index < len(lines):
            first, joined = index, strip_comment(lines[index])
            while joined.endswith("\\") and index + 1 < len(lines):  # a continuation (a comment ends it, as in bash)
                index += 1
                joined = joined[:-1].rstrip() + " " + strip_comment(lines[index]).strip()
            index += 1
            assignment = ASSIGNMENT.match(joined.strip())
            if assignment:
                variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2)))
                continue
            argv = blip2_arguments(joined)
            if argv is not None:
                found.append(DocCommand(file, start + first, joined.strip(), tuple(argv), tuple(variables.items())))
    return found


def parse_problem(command: DocCommand) -> str | None:
    """None when the real parser accepts ``command`` (``--help`` exits 0), else what it said."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(list(command.argv))
    except SystemExit as exit:
        if exit.code == 0 and is_help(command):
            return None
        return f"{command}\n  does not parse (exit {exit.code}): {stderr.getvalue().strip().splitlines()[-1:]}"
    except (AttributeError, TypeError, ValueError) as error:  # the parser crashed on this line: a bug, line named
        return f"{command}\n  crashed the parser: {type(error).__name__}: {error}"
    return None


def is_help(command: DocCommand) -> bool:
    return "--help" in command.argv or "-h" in command.argv


def is_cheap(command: DocCommand) -> bool:
    """Runs in seconds with no trained model and writes nothing: help, or ``info`` on a preset."""
    argv = command.argv
    return is_help(command) or (len(argv) >= 2 and argv[0] == "info" and argv[1] in PRESETS)


ALL = [command for file in DOCS for command in commands_in(file)]


def test_the_docs_hold_command_lines():
    """The extraction works: the README's and the docs' command lines are found (a broken fence would hide them)."""
    files = {command.file.name for command in ALL}
    assert {"README.md", "training.md", "evaluation.md", "inference.md", "data.md"} <= files, files
    assert len(ALL) >= 40, [str(command) for command in ALL]


@pytest.mark.parametrize("command", ALL, ids=[command.where() for command in ALL])
def test_every_documented_command_parses(command):
    problem = parse_problem(command)
    assert problem is None, problem


def test_an_option_that_does_not_exist_fails():
    """The check is real: a doc line with an unknown option, a wrong choice or a missing argument is reported, with
    its file and line."""
    fake = ROOT / "docs" / "example.md"
    text = """intro
```bash
blip2 caption a.png --model M   # fine
blip2 caption a.png --no-such-option 3
blip2 eval summary data.json --model M \\
    --limit 5
blip2 ask a.png
```
```python
blip2 caption a.png --not-checked-in-python-blocks
```
"""
    commands = commands_in(fake, text)
    assert [c.line for c in commands] == [3, 4, 5, 7]
    assert commands[2].argv == ("eval", "summary", "data.json", "--model", "M", "--limit", "5")
    problems = [parse_problem(command) for command in commands]
    assert problems[0] is None
    assert "docs/example.md:4" in problems[1] and "--no-such-option" in problems[1]
    assert "docs/example.md:5" in problems[2] and "summary" in problems[2]
    assert "docs/example.md:7" in problems[3] and "QUESTION" in problems[3].upper()


def test_comments_and_launchers_are_read_as_bash_would():
    assert strip_comment('blip2 ask a.png "is it #1?"  # a comment') == 'blip2 ask a.png "is it #1?"'
    assert strip_comment("blip2 train x --set a=b#c") == "blip2 train x --set a=b#c"
    assert blip2_arguments("$ blip2 info default") == ["info", "default"]
    assert blip2_arguments("torchrun --nproc-per-node 8 -m blip2.cli train r.yaml") == ["train", "r.yaml"]
    assert blip2_arguments('DATA="x=1" blip2 train r') is None  # an assignment first: not a blip2 line
    assert blip2_arguments("python train.py") is None
    text = "```bash\nDATA=\"data.vqa=[v] train.steps=3\"\nREP=\"data.x={a: 1}\"\nblip2 train r --set $DATA \"$REP\"\n```"
    (command,) = commands_in(ROOT / "docs" / "example.md", text)
    assert command.argv == ("train", "r", "--set", "$DATA", "$REP")  # parsed as written
    assert command.expanded_argv() == ["train", "r", "--set", "data.vqa=[v]", "train.steps=3", "data.x={a: 1}"]


CHEAP = sorted({command.argv: command for command in ALL if is_cheap(command)}.values(), key=str)


@pytest.mark.parametrize("command", CHEAP, ids=[command.where() for command in CHEAP])
def test_cheap_commands_run(command, capsys):
    """``--help`` and ``blip2 info PRESET`` (which loads that model) run for real and print what they promise."""
    try:
        status = main(list(command.argv))
    except SystemExit as exit:  # --help prints and exits
        status = exit.code
    out = capsys.readouterr().out
    assert status == 0, f"{command}\n  exited {status}"
    if is_help(command):
        assert "usage: blip2" in out, out
    elif "--json" in command.argv:
        assert json.loads(out)["parameters"]["trainable"] > 0, out
    else:
        assert "parameters" in out and "Q-Former" in out, out


def test_the_cheap_commands_include_info():
    assert any(command.argv[:1] == ("info",) for command in CHEAP), "no `blip2 info PRESET` line left in the docs"


TRAIN = [command for command in ALL if command.argv[:1] == ("train",) and not is_help(command)]


@pytest.mark.parametrize("command", TRAIN, ids=[command.where() for command in TRAIN])
def test_every_documented_recipe_loads_with_its_overrides(command, monkeypatch):
    """``blip2 train RECIPE --set ...`` names a recipe that exists (a file, or a packaged one by name) and whose
    overrides name real keys with values of the right type (a shell variable set earlier in the block expanded)."""
    args = vars(build_parser().parse_args(command.expanded_argv()))
    unset = [item for item in args["set"] or [] if "$" in item]
    assert not unset, f"{command}\n  uses a variable its block does not set: {unset}"
    monkeypatch.chdir(ROOT)  # the paper's recipes are named relative to the repository
    path = recipe_file(args["recipe"])
    overrides = list(args["set"] or []) + ([f"train.resume={args['resume']}"] if args["resume"] else [])
    Recipe.load(path, overrides)


CACHE_MODELS = [command for command in ALL if command.argv[:1] == ("cache-features",)]


@pytest.mark.parametrize("command", CACHE_MODELS, ids=[command.where() for command in CACHE_MODELS])
def test_cache_features_names_a_recipe_that_exists(command, monkeypatch):
    """``blip2 cache-features --model X.yaml`` names a recipe file or a packaged recipe (other sources are models)."""
    model = vars(build_parser().parse_args(list(command.argv)))["model"]
    monkeypatch.chdir(ROOT)
    if model.endswith((".yaml", ".yml")):
        recipe_file(model)
