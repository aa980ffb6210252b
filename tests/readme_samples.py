"""The README's sample outputs, checked against what the commands really print.

A sample is a fenced block after a ``<!-- sample: NAME -->`` line. :func:`check` compares
its shape with a real output: numbers, ages and ids are masked and runs of spaces or
box-drawing characters collapsed, so a sample stays valid when only counts, times or
column widths change, and fails when a line, a word or a column appears, disappears or
is renamed. ``TRACKSTREAM_UPDATE_SAMPLES=1`` writes the real output into the README
instead (then review the diff).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_AGE = re.compile(r"\b\d+(?:\.\d+)?(?:ms|s)\b|\b\d+[dhm]\d\d[hms]\b")
_NUMBER = re.compile(r"\d[\d,.]*")
_BOX = re.compile(r"([━─═┄])\1+")
_HOSTISH = re.compile(r"\b[a-z][a-z0-9-]*-#\b")  # consumer names: host-0


def _block(text: str, name: str) -> re.Match[str]:
    found = re.search(
        rf"<!-- sample: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", text, re.DOTALL
    )
    if found is None:
        raise AssertionError(f"README has no sample block {name!r}")
    return found


_LOG = re.compile(r"^\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def shape(text: str) -> list[str]:
    out = []
    for line in text.strip("\n").splitlines():
        if _LOG.match(line):  # log lines depend on timing, not on what the command prints
            continue
        line = _AGE.sub("AGE", line.rstrip())
        line = _NUMBER.sub("#", line)
        line = _BOX.sub(r"\1", line)
        line = re.sub(r"\s+", " ", line).strip()
        out.append(line)
    return out


def check(name: str, output: str) -> None:
    text = README.read_text("utf-8")
    block = _block(text, name)
    if os.environ.get("TRACKSTREAM_UPDATE_SAMPLES"):
        clean = "\n".join(line.rstrip() for line in output.strip("\n").splitlines())
        README.write_text(text[: block.start(1)] + clean + text[block.end(1) :], "utf-8")
        return
    want, got = shape(block.group(1)), shape(output)
    assert want == got, (
        f"README sample {name!r} no longer matches the command's output "
        f"(TRACKSTREAM_UPDATE_SAMPLES=1 rewrites it):\n"
        + "\n".join(f"- {w}\n+ {g}" for w, g in zip(want, got, strict=False) if w != g)
        + (f"\nlines: README {len(want)}, output {len(got)}" if len(want) != len(got) else "")
    )
