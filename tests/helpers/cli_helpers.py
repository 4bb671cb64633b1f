"""`kiln` in the test process: the real root command and its error mapping, without the cost
of a fresh interpreter (and a model load from scratch) per refused input. Tests that must see
a whole process's stderr use tests.helpers.loader_helpers.kiln instead."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kiln.cli import main


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def kiln_here(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    """Run `kiln ARGS...`; an exception that the root command does not turn into a line
    (a traceback in a real run) propagates and fails the test."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_one_line_error_here(result: Result, *expected: str) -> None:
    assert result.code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def assert_one_line_error(result: Any, *fragments: str, prefix: str = "") -> str:
    """A failed `kiln` process (anything with `returncode` and `stderr`): a non-zero exit, no
    traceback, and one stderr line that starts with `prefix` and holds every fragment."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
