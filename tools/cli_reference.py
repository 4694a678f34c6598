"""Write docs/cli.md, the command-line reference, from the engine's own parser (engine/__main__.py), so that every
subcommand and flag the engine accepts is in it with its help text.

    python tools/cli_reference.py            # rewrite docs/cli.md
    python tools/cli_reference.py --check    # exit 1 when docs/cli.md differs (tests/test_docs.py does the same)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "cli.md")


def reference() -> str:
    """The reference's text: one section per subcommand, one row per argument."""
    from engine.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    lines = [
        "# Command-line reference",
        "",
        "Generated from the engine's parser by `python tools/cli_reference.py` (a test fails when it is out of date).",
        "Every job the window runs is also `python -m engine SUBCOMMAND ...`; `--help` on each says the same.",
        "",
    ]
    for name, sp in sub.choices.items():
        lines += [f"## `python -m engine {name}`", "", f"{helps.get(name, '')}.", ""]
        lines += ["| argument | what it does |", "| --- | --- |"]
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            flag = ", ".join(a.option_strings) if a.option_strings else a.dest.upper()
            choices = f" (one of: {', '.join(map(str, a.choices))})" if a.choices else ""
            text = (a.help or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{flag}` | {text}{choices} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    text = reference()
    if "--check" in sys.argv:
        with open(OUT, encoding="utf-8") as f:
            return 0 if f.read() == text else 1
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
