"""What the docs tests check, as functions that return the problems they find (so the tests can
also show that each check fails on a broken page): links and images that resolve, fences that
close, command lines that the scripts' own parsers accept, and study numbers that come from the
files the study generated. Markdown is parsed by markdown-it-py, as CommonMark renders it."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Iterator

from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
SHELL_INFOS = {"", "bash", "sh", "shell", "console"}
CODE_COMMENT_INFOS = {"bash", "sh", "shell", "console", "python", "yaml", "toml", "bibtex"}  # '#' starts a comment there
SCRIPTS = ("run_pretrain.py", "run_finetune.py", "run_prune.py", "run_transfer.py", "run_iou.py", "run_imp.py", "run_analysis.py", "run_grid.py")
_PARSER = MarkdownIt("commonmark").enable("table")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _inline_text(token) -> str:
    return "".join(child.content for child in token.children or [] if child.type in ("text", "code_inline"))


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    tokens = _PARSER.parse(text)
    found: set[str] = set()
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            base = slug(_inline_text(tokens[i + 1]))
            name, n = base, 1
            while name in found:
                name, n = f"{base}-{n}", n + 1
            found.add(name)
    return found


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links and images of ``text`` (the page at ``path``) that name no file, or an anchor
    the target page does not have."""
    problems = []
    for token in _PARSER.parse(text):
        for child in token.children or []:
            target = child.attrGet("href") if child.type == "link_open" else child.attrGet("src") if child.type == "image" else None
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                problems.append(f"{path.relative_to(ROOT)}: {target!r} names no file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{path.relative_to(ROOT)}: {target!r} names no heading of {resolved.name}")
    return problems


def fences(text: str) -> Iterator:
    for token in _PARSER.parse(text):
        if token.type == "fence":
            yield token


def fence_problems(path: Path, text: str) -> list[str]:
    """Code fences that never close (they swallow the rest of the page), that hold a line opening
    another fence (a fence 'closed' mid-line, as ```` ``` A config ... ```` does not), or that hold
    a markdown heading outside a language where '#' is a comment."""
    lines = text.splitlines()
    problems = []
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for token in fences(text):
        start, end = token.map
        closing = lines[end - 1].strip() if end - 1 < len(lines) and end - 1 > start else ""
        marker = token.markup[0]
        if not (closing.startswith(token.markup) and set(closing) == {marker}):
            problems.append(f"{name}:{start + 1}: code fence never closed")
        info = token.info.strip().split(" ")[0].lower()
        for offset, line in enumerate(token.content.splitlines()):
            stripped = line.strip()
            if stripped.startswith(("```", "~~~")):
                problems.append(f"{name}:{start + 2 + offset}: a fence marker inside a code block: {stripped[:40]!r}")
            elif info not in CODE_COMMENT_INFOS and re.match(r"#{1,6} [A-Z]", stripped):
                problems.append(f"{name}:{start + 2 + offset}: a heading inside a code block: {stripped[:40]!r}")
    return problems


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(script, arguments)`` of every ``python run_*.py ...`` or ``accelerate launch ... run_*.py ...``
    command in ``text``, continuation lines joined, comments and shell operators cut off."""
    found = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if "run_" not in line:
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            script = Path(word).name
            if script in SCRIPTS and i > 0 and (Path(words[i - 1]).name.startswith("python") or "launch" in words[:i]):
                args = []
                for arg in words[i + 1:]:
                    if arg in ("|", "&&", ";", ">", ">>", "2>&1", "||"):
                        break
                    args.append(arg)
                found.append((script, args))
    return found


def command_problem(script: str, args: list[str]) -> str | None:
    """Why ``script`` would refuse ``args`` at its command line (an unknown flag, a value of the
    wrong type), or None. Only the parser is run: nothing is loaded or written."""
    if script == "run_grid.py":
        import run_grid

        parser = run_grid.build_parser()
    else:
        from utils.arguments import script_parser

        parser = script_parser(script)
        if len(args) == 1 and args[0].endswith(".json"):
            return None
    parser.allow_abbrev = False  # a documented flag is spelled out: a prefix of a real flag is a typo here
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _, unknown = parser.parse_known_args(args)
    except SystemExit:
        return f"{script} {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}"
    if unknown:
        return f"{script} {' '.join(args)}: unknown arguments {unknown}"
    return None


def documented_command_problems(path: Path, text: str) -> list[str]:
    problems = []
    for token in fences(text):
        if token.info.strip().split(" ")[0].lower() in SHELL_INFOS:
            problems += [f"{path.relative_to(ROOT)}: {p}" for script, args in commands(token.content) if (p := command_problem(script, args))]
    return problems


NUMBER = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*\.\d+")


def _numbers(text: str) -> set[str]:
    return {m.group().lstrip("+-−").replace(",", "") for m in NUMBER.finditer(text)}


def reading_text(text: str) -> str:
    """The prose of a results page's '## Reading' sections (code blocks left out): where the
    study's numbers are quoted."""
    tokens = _PARSER.parse(text)
    keep, level = [], None
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            heading_level = int(token.tag[1])
            if level is not None and heading_level <= level:
                level = None
            if level is None and _inline_text(tokens[i + 1]).lower().startswith("reading"):
                level = heading_level
        elif level is not None and token.type == "inline":
            keep.append(token.content)
    return "\n".join(keep) if keep else ""


def generated_numbers(folder: Path) -> set[str]:
    """Every number, as printed, in the files a study generated under ``folder``: its reports,
    tables and summaries (not its README)."""
    numbers: set[str] = set()
    for path in folder.rglob("*"):
        if path.is_file() and path.name != "README.md" and path.suffix in (".md", ".csv", ".txt"):
            numbers |= _numbers(path.read_text(encoding="utf-8"))
    return numbers


def unsourced_numbers(readme: Path) -> list[str]:
    """Numbers the reading of a results folder's README quotes that none of the folder's generated
    files prints."""
    text = reading_text(readme.read_text(encoding="utf-8"))
    have = generated_numbers(readme.parent)
    return sorted(n for n in _numbers(text) if n not in have)
