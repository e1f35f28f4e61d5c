"""The README and docs/: short README, working links and anchors, commands that parse.

The README is what a newcomer reads in ten minutes (at most 12 KB); everything else lives
in docs/. These tests keep the two honest as the code moves: every relative link and
``#anchor`` in README.md and docs/*.md resolves (GitHub's heading slugs), every docs page
is reachable from the README, every ``docs/<page>.md#<anchor>`` the code points at exists,
the Quick start holds exactly the two commands (.ci/run runs the second), and every
``pollen ...`` command shown in a code block parses with the real CLI parser.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pollen.cli.app import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
#: "A README a newcomer reads in ten minutes (<= 12 KB)": the strict reading, 12,000 bytes.
README_MAX_BYTES = 12_000

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_HTML_ID = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")
_CODE_REF = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
#: Models a guide adds before its command uses them (tests/models/test_extending_models.py
#: runs that command with the model added); the parse check puts a registered one instead.
GUIDE_MODELS = {"extending-models.md": ("tinynet", "cnn")}


def _pages() -> list[Path]:
    """README.md and every docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text without fenced code blocks (their ``#`` lines are no headings)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, formatting and punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a link may name in ``page``, duplicates numbered as GitHub does."""
    text = _prose(page.read_text(encoding="utf-8"))
    found: set[str] = set(_HTML_ID.findall(text))
    seen: dict[str, int] = {}
    for _, heading in _HEADING.findall(text):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    """The targets of the page's Markdown links, outside code."""
    text = _INLINE_CODE.sub("", _prose(page.read_text(encoding="utf-8")))
    return _LINK.findall(text)


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) does not resolve, or None."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... not checked offline
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{page.name}: {target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{page.name}: {target}: no heading #{anchor} in {dest.name}"
    return None


def test_slug_matches_github() -> None:
    assert slug("Secure aggregation (`--secagg`)") == "secure-aggregation---secagg"
    assert slug("Faults and resume") == "faults-and-resume"
    assert slug("Pollen as a Flower App") == "pollen-as-a-flower-app"
    assert slug("[Non-IID](x.md) figures") == "non-iid-figures"


def test_checker_catches_broken_links(tmp_path: Path) -> None:
    """The link check itself fails on a missing file and on a missing anchor."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Real part\n\n```\n# not a heading\n```\n", encoding="utf-8")
    assert broken_link(page, "#real-part") is None
    assert broken_link(page, "#not-a-heading") is not None
    assert broken_link(page, "other.md") is not None
    assert broken_link(page, "page.md#title") is None


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (details go to docs/)"
    )


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_links_and_anchors_resolve(page: Path) -> None:
    problems = [why for target in links(page) if (why := broken_link(page, target))]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_reachable_from_readme() -> None:
    """Move, don't lose: a docs page nothing links to is lost to readers."""
    reached, todo = {README.resolve()}, [README]
    while todo:
        page = todo.pop()
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md") and not re.match(r"[a-z]+:", path):
                dest = (page.parent / path).resolve()
                if dest.is_file() and dest not in reached:
                    reached.add(dest)
                    todo.append(dest)
    unreached = [p.name for p in DOCS.glob("*.md") if p.resolve() not in reached]
    assert not unreached, f"docs pages no link from README.md leads to: {unreached}"


def _code_references() -> list[tuple[str, str, str]]:
    """(file, page, anchor) for every ``docs/<page>.md[#anchor]`` in code and tests."""
    refs = []
    for folder in ("pollen", "benchmarks", "tests", ".ci"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in (".py", "") or not path.is_file() or path == Path(__file__):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for page, anchor in _CODE_REF.findall(text):
                refs.append((str(path.relative_to(REPO)), page, anchor))
    return refs


def test_code_references_to_docs_resolve() -> None:
    """``see docs/performance.md#<anchor>`` in a docstring must lead somewhere."""
    refs = _code_references()
    assert refs, "expected the code to point at docs/ somewhere"
    problems = []
    for source, page, anchor in refs:
        dest = DOCS / page
        if not dest.is_file():
            problems.append(f"{source}: docs/{page}: no such file")
        elif anchor and anchor not in anchors(dest):
            problems.append(f"{source}: docs/{page}#{anchor}: no such heading")
    assert not problems, "\n".join(problems)


def _section(text: str, title: str) -> str:
    """The body of the README section ``## title``, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_quick_start_has_the_two_commands_ci_runs() -> None:
    """Exactly two commands up front: set up + simulate, and the tests .ci/run runs."""
    quick = _section(README.read_text(encoding="utf-8"), "Quick start")
    blocks = [body.strip() for _, body in code_blocks(quick)]
    assert len(blocks) == 2, blocks
    assert all("\n" not in b for b in blocks), "each Quick start command is one line"
    assert blocks[0].endswith("pollen simulate")
    ci_commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if "pytest" in line and not line.lstrip().startswith("#")
    ]
    assert ci_commands == [".venv/bin/python -m pytest"]
    assert blocks[1].endswith(ci_commands[0])


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if fence and lang is None:
            lang, body = fence.group(1), []
        elif fence and not fence.group(1):
            blocks.append((lang, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def shell_commands(text: str) -> list[list[str]]:
    """The words of every simple command in the text's shell code blocks."""
    commands = []
    for lang, block in code_blocks(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            lexer.commenters = "#"
            words: list[str] = []
            for word in [*lexer, ";"]:
                if word in (";", "&", "&&", "|", "||"):
                    commands += [words] if words else []
                    words = []
                else:
                    words.append(word)
    return commands


def pollen_commands(text: str) -> list[str]:
    """Every ``pollen ...`` command of the text's shell code blocks, one string each."""
    return [shlex.join(w) for w in shell_commands(text) if Path(w[0]).name == "pollen"]


def benchmark_commands(text: str) -> list[list[str]]:
    """``python benchmarks/<script>.py ...`` commands: the script and its arguments."""
    return [
        words[1:]
        for words in shell_commands(text)
        if len(words) > 1
        and Path(words[0]).name.startswith("python")
        and words[1].startswith("benchmarks/")
        and words[1].endswith(".py")
    ]


def test_pollen_commands_are_found() -> None:
    text = "```bash\nsource x && .venv/bin/pollen simulate --rounds 2 &  # c\npollen certs\n```\n"
    assert pollen_commands(text) == [".venv/bin/pollen simulate --rounds 2", "pollen certs"]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_documented_pollen_commands_parse(page: Path) -> None:
    """A command the docs show uses options and values the CLI accepts today."""
    parser = build_parser()
    problems = []
    for command in pollen_commands(page.read_text(encoding="utf-8")):
        # A literal "..." stands for options left out of a fragment: check the rest.
        words = [word for word in shlex.split(command)[1:] if word != "..."]
        if page.name in GUIDE_MODELS:
            added, registered = GUIDE_MODELS[page.name]
            words = [registered if word == added else word for word in words]
        try:
            parser.parse_args(words)
        except SystemExit as exit_:  # argparse: 2 for a usage error, 0 for --help
            if exit_.code:
                problems.append(command)
    assert not problems, f"{page.name}: commands the CLI refuses:\n" + "\n".join(problems)


#: Runs a benchmark script until it has parsed its arguments, then stops: a usage error
#: exits 2 with argparse's message, a parse that went through exits 0. In a subprocess,
#: since a script may pick a Keras backend or import TensorFlow at import time.
_PARSE_ONLY = """
import argparse, runpy, sys
script, *args = sys.argv[1:]
original = argparse.ArgumentParser.parse_args
class Parsed(BaseException):
    pass
def parse_only(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_only
sys.argv = [script, *args]
sys.path.insert(0, script.rsplit("/", 1)[0])
try:
    runpy.run_path(script, run_name="__main__")
except Parsed:
    sys.exit(0)
sys.exit(script + " ended without parsing its arguments")
"""


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_documented_benchmark_commands_parse(page: Path) -> None:
    """``python benchmarks/X.py ...`` as shown: the script exists and takes those options."""
    problems = []
    for script, *args in benchmark_commands(page.read_text(encoding="utf-8")):
        if not (REPO / script).is_file():
            problems.append(f"{script}: no such script")
            continue
        done = subprocess.run(
            [sys.executable, "-c", _PARSE_ONLY, script, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            problems.append(f"{shlex.join([script, *args])}: {done.stderr.strip()[-500:]}")
    assert not problems, f"{page.name}: benchmark commands that do not parse:\n" + "\n".join(
        problems
    )


def test_every_registry_model_is_described() -> None:
    """docs/how-it-learns.md's table of models names every model ``--model`` accepts."""
    from pollen.models.registry import MODELS

    table = (DOCS / "how-it-learns.md").read_text(encoding="utf-8")
    described = set(re.findall(r"^\| `(\w[\w-]*)` \|", table, re.M))
    assert described == set(MODELS), (
        f"models table of how-it-learns.md vs registry: {described ^ set(MODELS)}"
    )
