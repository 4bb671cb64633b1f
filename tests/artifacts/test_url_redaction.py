"""No password in a URL is ever printed: bad drivers, bad ports, unreachable servers, S3 URLs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.errors import StoreConfigError
from artifacts.index.db import display_url, make_engine
from artifacts.redact import redact_text, redact_url

KILN = [sys.executable, "-m", "kiln"]
SECRET = "s3cr3t"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:s3cr3t@host/db", "postgresql+psycopg://u:***@host/db"),
        ("postgresql://u:s3cr3t@host:abc/db", "postgresql://u:***@host:abc/db"),
        ("postgresql://u:p@ss/w:s3cr3t@host/db", "postgresql://u:***@host/db"),
        ("postgresql://u@host/db?password=s3cr3t&x=1", "postgresql://u@host/db?password=***&x=1"),
        ("postgresql://h/db?sslmode=require&sslpassword=s3cr3t", "postgresql://h/db?sslmode=require&sslpassword=***"),
        ("s3://AKIA:s3cr3t@bucket/prefix", "s3://AKIA:***@bucket/prefix"),
        ("postgresql://u@host/db", "postgresql://u@host/db"),
        ("sqlite:////tmp/store/index.db", "sqlite:////tmp/store/index.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("/plain/path", "/plain/path"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_finds_urls_inside_sentences() -> None:
    text = "index 'postgresql://u:s3cr3t@h/db': failed; see https://x.org/e (postgresql://a:b@c)."
    assert redact_text(text) == (
        "index 'postgresql://u:***@h/db': failed; see https://x.org/e (postgresql://a:***@c)."
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopgx://u:s3cr3t@host/db",  # unknown driver
        "postgresql+psycopg://u:s3cr3t@host:abc/db",  # a port that is not a number
    ],
)
def test_make_engine_errors_hide_the_password(url: str) -> None:
    with pytest.raises(StoreConfigError) as caught:
        make_engine(url)
    assert SECRET not in str(caught.value) and "u:***@host" in str(caught.value)


def test_display_url_hides_the_password() -> None:
    assert display_url("postgresql://u:s3cr3t@h/db") == "postgresql://u:***@h/db"


@pytest.mark.parametrize(
    "args",
    [
        ["--index", "postgresql+psycopgx://u:s3cr3t@host/db"],
        ["--index", "postgresql+psycopg://u:s3cr3t@host:abc/db"],
        ["--index", "postgresql+psycopg://u:s3cr3t@127.0.0.1:1/db"],  # nothing listens there
        ["--index", "postgresql+psycopg://u@127.0.0.1:1/db?password=s3cr3t"],
        ["--index", "mysql://u:s3cr3t@127.0.0.1:1/db"],  # a driver that is not installed
        ["--store", "s3://AKIA:s3cr3t@bucket/prefix"],
        ["--store", "gs://u:s3cr3t@bucket/prefix"],
    ],
)
def test_cli_errors_never_print_the_password(tmp_path: Path, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    if args[0] == "--index":
        (tmp_path / "store").mkdir()  # read commands create no store: give them one
        args = ["--store", str(tmp_path / "store"), *args]
    # `stats` needs the index, so each bad index URL ends in an error (reads such as `ls` go
    # on from the store alone after a warning, which must hide the password too).
    result = subprocess.run(
        [*KILN, "stats", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert SECRET not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(("kiln: error: ", "kiln: warning: ")) for line in lines), lines
    assert lines[-1].startswith("kiln: error: ") and "***" in lines[-1], lines
