"""The `kiln` root command: mounts each package's commands lazily, turns errors into one line.

`kiln pull` on an inference host must not import build-side code, so a command's module is
imported only when that command runs.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Any

import click

from artifacts.errors import KilnError
from artifacts.redact import redact_text
from kiln import __version__

# command name -> "module:attribute"
LAZY_COMMANDS: dict[str, str] = {
    "ls": "artifacts.cli:ls_command",
    "show": "artifacts.cli:show_command",
    "stats": "artifacts.cli:stats_command",
    "history": "artifacts.cli:history_command",
    "diff": "artifacts.cli:diff_command",
    "tag": "artifacts.cli:tag_command",
    "verify": "artifacts.cli:verify_command",
    "gc": "artifacts.cli:gc_command",
    "reindex": "artifacts.cli:reindex_command",
    "export": "artifacts.cli:export_command",
    "import": "artifacts.cli:import_command",
    "copy": "artifacts.cli:copy_command",
    "plan": "pipeline.cli:plan_command",
    "compile": "pipeline.cli:compile_command",
    "import-neuron-cache": "pipeline.cli:import_neuron_cache_command",
    "export-neuron-cache": "pipeline.cli:export_neuron_cache_command",
    "pull": "runtime_loader.cli:pull_command",
    "run": "runtime_loader.cli:run_command",
    "generate": "runtime_loader.cli:generate_command",
    "cache": "runtime_loader.cli:cache_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LAZY_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiln")
@click.option("--store", "store_url", metavar="URL", help="Store for every subcommand.")
@click.option("--index", "index_url", metavar="URL", help="Index URL for every subcommand.")
def cli(store_url: str | None, index_url: str | None) -> None:
    """Kiln: compile models once per shape bucket, store and serve the results."""
    if store_url:
        os.environ["KILN_STORE"] = store_url
    if index_url:
        os.environ["KILN_INDEX_URL"] = index_url


def user_error_message(exc: BaseException) -> str | None:
    """The one line to print for an error a user can act on (any password in a URL in it
    masked), or None for a real bug."""
    message = _user_error_message(exc)
    if message is None:
        return None
    return redact_text(message)


def _user_error_message(exc: BaseException) -> str | None:
    if isinstance(exc, KilnError):
        return str(exc)
    # SQLAlchemy is heavy: if it was never imported, this error cannot be one of its own.
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(exc, sqlalchemy_exc.SQLAlchemyError):
        orig = getattr(exc, "orig", None) or exc
        return f"index error: {str(orig).splitlines()[0]}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{exc.strerror}: a disk is full"
    return None


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="kiln", standalone_mode=False)
    except click.exceptions.Abort as exc:  # click's name for a KeyboardInterrupt
        cause = exc.__cause__
        text = str(cause) if cause is not None else ""  # SIGTERM: "terminated (SIGTERM)"
        click.echo(f"kiln: {text or 'aborted'}", err=True)
        sys.exit(getattr(cause, "exit_code", 130))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # also pipeline.interrupt.Terminated (SIGTERM: 143)
        click.echo(f"kiln: {str(exc) or 'interrupted'}", err=True)
        sys.exit(getattr(exc, "exit_code", 130))
    except Exception as exc:  # noqa: BLE001 - the one place errors become a line
        message = user_error_message(exc)
        if message is None:
            raise
        click.echo(f"kiln: error: {message}", err=True)
        sys.exit(1)
