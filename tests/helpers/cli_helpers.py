"""`kiln` in the test process: the real root command and its error mapping, without the cost
of a fresh interpreter (and a model load from scratch) per refused input. Tests that must see
a whole process's stderr use tests.helpers.loader_helpers.kiln instead."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
