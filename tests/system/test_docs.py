"""The docs against the code they describe: the site builds with MkDocs'
--strict (no broken link or anchor), and what the pages show still exists:
each ``segq`` command line parses as the CLI's, each ``make`` target is the
Makefile's, each ``SEGQ_*`` variable is read by the code, each Python block
compiles and imports names that exist, each test and repository path named
is there, and the configuration page lists every setting with its default.
The README's "Using it" blocks are run as written by tests/system/test_readme.py."""

from __future__ import annotations

import ast
import fnmatch
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import click
import pytest

from segq.cli.main import main as segq_cli
from segq.settings import Settings
from tests.support.cli_parsing import segq_command_error
from tests.support.markdown_blocks import (
    DOCS,
    PAGES,
    README,
    REPO,
    anchors,
    code_blocks,
    inline_code,
    links,
    prose,
)

SHELL_LANGUAGES = ("sh", "bash", "shell")
#: Where a path the docs name may lie.
REPOSITORY_FOLDERS = ("api", "worker", "segq", "tests", "bench", "deploy", "migrations", "docs")
CONFIGURATION = DOCS / "configuration.md"
#: Variables segq documents that are not its own: prometheus-client's.
FOREIGN_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR"}


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # Not --quiet: it hides the warnings that --strict counts, and the build passes.
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site),
        ],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_site_builds_with_no_broken_link_or_anchor(tmp_path: Path) -> None:
    built = build_site(REPO / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, built.stdout + built.stderr
    models = (tmp_path / "site/models/index.html").read_text()
    # The engine table is written from the catalogue by the docs' hook.
    assert "sam2.1_hiera_large.pt" in models and "engine-catalogue-table" not in models


def test_a_broken_anchor_fails_the_build(tmp_path: Path) -> None:
    """The strict build is what catches broken links: show it does."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs/index.md"
    index.write_text(index.read_text() + "\n[gone](api.md#no-such-heading)\n")
    built = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "no-such-heading" in built.stdout + built.stderr


def test_the_readme_s_links_and_anchors_resolve() -> None:
    """The README is not a page of the site, so its links are checked here."""
    broken = []
    for target in links(README):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        page = (README.parent / path).resolve() if path else README
        if not page.exists():
            broken.append(f"{target}: no {path}")
        elif anchor and anchor not in anchors(page):
            broken.append(f"{target}: no heading #{anchor} in {path or 'README.md'}")
    assert not broken


def one_line(text: str) -> str:
    """A shell block as one line: continuations joined, comments dropped,
    and each line's end outside quotes made a ``;``."""
    out: list[str] = []
    quote = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "\\" and text[index + 1 : index + 2] == "\n":
            index += 2
            continue
        elif char == "#" and (not out or out[-1][-1].isspace()):
            index = text.find("\n", index)
            if index < 0:
                break
            continue
        elif char == "\n":
            char = " ; "
        out.append(char)
        index += 1
    return "".join(out)


def shell_commands(text: str) -> Iterator[list[str]]:
    """Each simple command of a shell block, as words, split at pipes, lists
    and ``$(…)``; leading ``NAME=value`` assignments left out."""
    lexer = shlex.shlex(one_line(text), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for token in [*lexer, ";"]:
        if set(token) <= set("();<>|&$"):
            while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                words.pop(0)
            if words:
                yield words
            words = []
        else:
            words.append(token)


def shell_blocks() -> Iterator[tuple[str, list[str]]]:
    for page in PAGES:
        for block in code_blocks(page):
            if block.language in SHELL_LANGUAGES:
                for words in shell_commands(block.text):
                    yield block.where(), words


def test_every_segq_command_shown_parses_as_the_cli_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the README exports before its client commands.
    for name in ("SEGQ_URL", "SEGQ_PROJECT", "SEGQ_API_KEY"):
        monkeypatch.setenv(name, "set")
    shown = [(where, words[1:]) for where, words in shell_blocks() if words[0] == "segq"]
    assert len(shown) >= 10
    errors = [
        f"{where}: {error}"
        for where, args in shown
        if (error := segq_command_error(args, placeholders=True))
    ]
    assert not errors
    # The check refuses what the CLI refuses.
    assert segq_command_error(["serve", "--prot", "8080"], placeholders=True)
    assert segq_command_error(["jobs", "lsit"], placeholders=True)


@cache
def makefile_targets() -> set[str]:
    makefile = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", makefile, re.M))


def test_every_make_target_named_exists() -> None:
    named = [(where, words[1]) for where, words in shell_blocks() if words[0] == "make"]
    named += [
        (str(page.relative_to(REPO)), span.split()[1])
        for page in PAGES
        for span in inline_code(page)
        if span.startswith("make ") and len(span.split()) > 1
    ]
    assert {"demo", "test", "docs"} <= {target for _, target in named}
    unknown = [
        (where, target)
        for where, target in named
        if not fnmatch.filter(makefile_targets(), target) and not target.isupper()
    ]
    assert not unknown, f"not targets of the Makefile: {unknown}"


@cache
def source_text() -> str:
    """Every text file of the code, the tests, the benchmarks and the deploy files."""
    parts = []
    for folder in ("segq", "api", "worker", "tests", "bench", "deploy"):
        for path in (REPO / folder).rglob("*"):
            if path.is_file() and path.suffix not in (".png", ".jpg", ".pyc"):
                parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def test_every_segq_variable_named_is_read_by_the_code() -> None:
    named = {
        (str(page.relative_to(REPO)), name)
        for page in PAGES
        for name in re.findall(r"\bSEGQ_[A-Z0-9_]+\b", page.read_text())
    }
    code = source_text()
    unknown = sorted((where, name) for where, name in named if not re.search(rf"\b{name}\b", code))
    assert not unknown


def settings_variables() -> set[str]:
    """What segq/settings.py reads, and what the client commands read."""
    read = set(re.findall(r'"(SEGQ_[A-Z0-9_]+)"', (REPO / "segq/settings.py").read_text()))

    def envvars(command: click.Command) -> Iterator[str]:
        for param in command.params:
            if isinstance(param.envvar, str):
                yield param.envvar
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                yield from envvars(sub)

    return read | set(envvars(segq_cli))


def documented_defaults() -> dict[str, str]:
    """Each variable of the configuration page's tables -> its default cell."""
    documented = {}
    for row in re.findall(r"^\| (`[A-Z].*)$", CONFIGURATION.read_text(), re.M):
        cells = [cell.strip() for cell in row.split(" | ")]
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            documented[name] = cells[1]
    return documented


def test_the_configuration_page_lists_every_setting_and_no_other() -> None:
    read = settings_variables()
    documented = set(documented_defaults())
    assert len(read) > 40
    assert read - documented == set(), "settings missing from docs/configuration.md"
    assert documented - read - FOREIGN_VARIABLES == set(), "documented, but read by nothing"


def written_default(value: object) -> str | None:
    """A default as the configuration page writes it; None: not comparable."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    if value == "":
        return "none"
    if isinstance(value, str) and "/data-dir" not in value:
        return value
    return None


def test_the_configuration_page_gives_the_defaults_settings_apply() -> None:
    defaults = Settings.from_env({"SEGQ_DATA_DIR": "/data-dir", "SEGQ_SECRET_KEY": "set"})
    fields = {"SEGQ_COMPILE": "compile_encoder", "SEGQ_TEST_FAULT_POINT": "fault_point"}
    compared, wrong = 0, []
    for name, cell in documented_defaults().items():
        field = fields.get(name, name.removeprefix("SEGQ_").lower())
        if name in ("SEGQ_DATA_DIR", "SEGQ_SECRET_KEY") or not hasattr(defaults, field):
            continue
        expected = written_default(getattr(defaults, field))
        if expected is None:
            continue
        compared += 1
        if not cell.strip("`").startswith(expected):
            wrong.append(f"{name}: the code's default is {expected}, the page says {cell}")
    assert compared > 30
    assert not wrong


def imported_names(tree: ast.AST) -> Iterator[tuple[str, str | None]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                yield node.module, alias.name


def test_every_python_block_compiles_and_imports_names_that_exist() -> None:
    blocks = [block for page in PAGES for block in code_blocks(page) if block.language == "python"]
    assert len(blocks) >= 6
    missing = []
    for block in blocks:
        tree = ast.parse(block.text, filename=block.where())
        for module_name, name in imported_names(tree):
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                missing.append(f"{block.where()}: import {module_name}: {exc}")
                continue
            if name is not None and not hasattr(module, name):
                try:
                    importlib.import_module(f"{module_name}.{name}")
                except ImportError:
                    missing.append(f"{block.where()}: {module_name} has no {name}")
    assert not missing


def test_every_json_block_is_json() -> None:
    blocks = [block for page in PAGES for block in code_blocks(page) if block.language == "json"]
    assert blocks
    for block in blocks:
        try:
            json.loads(block.text)
        except json.JSONDecodeError as exc:
            pytest.fail(f"{block.where()}: {exc}")


@cache
def functions_of_test_files() -> dict[str, set[str]]:
    """Each test file's name -> the test functions it defines."""
    return {
        path.name: set(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
        for path in (REPO / "tests").rglob("test_*.py")
    }


def named_tests(text: str) -> Iterator[tuple[str, str | None]]:
    """(file, function) for each ``test_file.py::test_name`` and each
    ``::test_name`` that continues the file named before it."""
    current = None
    for file, function, continued in re.findall(
        r"`(?:[\w/]*/)?(test_\w+\.py)(?:::([\w…]+))?`|`::([\w…]+)`", text
    ):
        if file:
            current = file
            yield file, function or None
        elif current is not None:
            yield current, continued


def test_every_test_the_docs_name_exists() -> None:
    functions = functions_of_test_files()
    every_function = set().union(*functions.values())
    checked, missing = 0, []
    for page in PAGES:
        text = page.read_text()
        for file, function in named_tests(text):
            checked += 1
            if file not in functions:
                missing.append(f"{page.relative_to(REPO)}: no tests/**/{file}")
            elif function and "…" not in function and function not in functions[file]:
                missing.append(f"{page.relative_to(REPO)}: {file} has no {function}")
        for function in re.findall(r"`(test_\w+)`", text):
            if function not in every_function:
                missing.append(f"{page.relative_to(REPO)}: no test {function}")
    assert checked > 100
    assert not missing


def test_every_repository_path_named_exists() -> None:
    # A folder ends with a slash and a file has a suffix; `segq/sam` is a model's name.
    pattern = re.compile(rf"^(?:{'|'.join(REPOSITORY_FOLDERS)})/([\w.-]+/)*([\w-]+\.\w+)?$")
    missing = []
    for page in PAGES:
        # Paths of other projects are written as links to them.
        text = re.sub(r"\[[^\]]*\]\(https?:[^)]*\)", "", prose(page))
        # Each word of each code span (a span may hold a command, or break a line).
        words = [word for span in re.findall(r"`([^`]+)`", text) for word in span.split()]
        for block in code_blocks(page):
            if block.language in SHELL_LANGUAGES:
                words += [word for command in shell_commands(block.text) for word in command]
        for word in words:
            path = word.split("::")[0].rstrip(".,:;")
            if pattern.match(path) and not (REPO / path).exists():
                missing.append(f"{page.relative_to(REPO)}: {path}")
    assert not missing
