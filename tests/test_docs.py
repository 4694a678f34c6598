"""The documentation stays true and short: the command-line reference matches the parser, and the README keeps the
limits a newcomer reads it within (two commands near the top, short paragraphs, guides linked)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_lists_every_flag_the_parser_accepts():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    text = (ROOT / "docs" / "cli.md").read_text()
    assert text == cli_reference.reference(), "docs/cli.md is out of date: run python tools/cli_reference.py"
    # and, independently of how the reference is written, every flag of every subcommand appears in it
    import argparse

    from engine.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        section = text.split(f"## `python -m engine {name}`", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section or f", {flag}" in section, (name, flag)


def _paragraphs(markdown: str) -> list[str]:
    """Prose paragraphs: blank-line separated blocks outside code fences, tables and headings; each item of a list
    counts as one."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith(("|", "#"))]
        item: list[str] = []
        for ln in lines:
            if re.match(r"\s*(\d+\.|[-*]) ", ln) and item:
                out.append(" ".join(item))
                item = []
            item.append(ln)
        if item:
            out.append(" ".join(item))
    return out


def test_readme_is_short_with_the_two_commands_on_top_and_links_to_the_guides():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 200
    top = "\n".join(lines[:40])
    assert "python -m pip install -e . && transfer-studio" in top
    assert 'python -m pip install -e ".[test]" && python -m pytest' in top
    words = {p[:60]: len(p.split()) for p in _paragraphs(readme)}
    assert max(words.values()) <= 120, max(words.items(), key=lambda kv: kv[1])
    guides = set(re.findall(r"\(docs/guides/([\w-]+\.md)\)", readme))
    assert len(guides) >= 3
    for link in re.findall(r"\]\((docs/[^)#]+)\)", readme):  # every link and picture the README shows exists
        assert (ROOT / link).exists(), link


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pip install -e ".[test]" && python -m pytest' in ci
