"""`kiln plan` and `kiln compile`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from artifacts.cli import emit_json, json_option, open_store, store_options
from artifacts.table import human_size, render_table
from artifacts.targets import COMPILERS, NEURON_TARGETS

BACKEND_CHOICES = click.Choice(["auto", *COMPILERS])


def _flags(flags: tuple[str, ...]) -> tuple[str, ...] | None:
    if not flags:
        return None
    from pipeline.spec import _Path, normalize_flags  # noqa: PLC0415

    return normalize_flags(list(flags), "--flags", _Path("command line"))


@click.command("plan")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--backend", type=BACKEND_CHOICES, default="auto", show_default=True)
@click.option("--flags", "flags", multiple=True, help="Compiler flags for every graph.")
@click.option("--no-trace", is_flag=True, help="Skip tracing direct misses (no HLO lookup).")
@store_options
@json_option
def plan_command(
    spec_path: Path,
    backend: str,
    flags: tuple[str, ...],
    no_trace: bool,
    store_url: str | None,
    index_url: str | None,
    as_json: bool,
) -> None:
    """Show every graph job: direct hit, HLO hit, or to be compiled. Compiles nothing."""
    from pipeline.planview import plan_view  # noqa: PLC0415
    from pipeline.spec import load_spec  # noqa: PLC0415

    spec = load_spec(spec_path)
    with open_store(store_url, index_url) as store:
        rows = plan_view(store, spec, backend, _flags(flags), trace=not no_trace)
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    click.echo(
        render_table(
            ["MODEL", "GRAPH", "BUCKET", "TARGET", "COMPILER", "STATUS"],
            [
                [
                    r.job.model,
                    r.job.graph_kind,
                    r.job.bucket.label,
                    r.job.target,
                    r.job.compiler,
                    r.status,
                ]
                for r in rows
            ],
        )
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    click.echo(f"{len(rows)} graphs: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


@click.command("compile")
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (default: cores).",
)
@click.option("--backend", type=BACKEND_CHOICES, default="auto", show_default=True)
@click.option("--tag", default=None, help="Tag every release NAME:TAG (default: the spec's).")
@click.option("--flags", "flags", multiple=True, help="Compiler flags for every graph.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds per graph compile.",
)
@click.option("--no-retry-failed", is_flag=True, help="Skip graphs whose last compile failed.")
@click.option(
    "--executor",
    "executor_kind",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where work runs: a local process pool, or Ray tasks (RAY_ADDRESS, else local Ray).",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Compile only shard I (0-based) of N of the planned graphs; publishes nothing.",
)
@click.option(
    "--shard-count",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Like --shard I/N with I from JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX.",
)
@click.option("--no-publish", is_flag=True, help="Compile and record; tag no releases.")
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Bound the estimated memory of the compiles running at once (e.g. 16G); default:"
    " the spec's defaults.max_memory, else unbounded.",
)
@click.option(
    "--recheck",
    is_flag=True,
    help="Look every graph up in the index and record the run, even when nothing changed"
    " since the last run on this host (which otherwise ends at once, recording nothing).",
)
@store_options
@json_option
def compile_command(
    spec_path: Path,
    workers: int | None,
    backend: str,
    tag: str | None,
    flags: tuple[str, ...],
    timeout: float,
    no_retry_failed: bool,
    executor_kind: str,
    shard: str | None,
    shard_count: int | None,
    no_publish: bool,
    max_memory: str | None,
    recheck: bool,
    store_url: str | None,
    index_url: str | None,
    as_json: bool,
) -> None:
    """Compile every graph of SPEC that the cache does not already hold, then tag releases.

    A rerun that would change nothing (same spec, sources, compilers and options; every tag
    still on its release) reports the same result at once, without the index
    (pipeline/noop.py); --recheck takes the full path.

    With --shard I/N (or --shard-count N in an Indexed Job / array job) only that shard's
    graphs are compiled and nothing is published: a final unsharded run tags the releases."""
    # Deferred so that `kiln --help` (which loads this module) stays as fast as it was; the
    # index side (jobs, run, executors: SQLAlchemy) only once the no-op shortcut is ruled out.
    from artifacts.refs import TAG_RE  # noqa: PLC0415
    from pipeline.interrupt import sigterm_interrupts  # noqa: PLC0415
    from pipeline.noop import check_shortcut, forget, record_of, save_record  # noqa: PLC0415
    from pipeline.shard import ShardError, resolve_shard, select_shard  # noqa: PLC0415
    from pipeline.spec import load_spec  # noqa: PLC0415

    if tag is not None and not TAG_RE.match(tag):
        raise click.BadParameter("must be letters, digits, '.', '_' or '-'", param_hint="--tag")
    try:
        part = resolve_shard(shard, shard_count, os.environ)
    except ShardError as exc:
        raise click.BadParameter(str(exc), param_hint="--shard/--shard-count") from None
    budget = None
    if max_memory is not None:
        from pipeline.compile_budget import parse_size  # noqa: PLC0415

        try:
            budget = parse_size(max_memory)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--max-memory") from None
    started = time.monotonic()
    spec = load_spec(spec_path)
    budget = budget if budget is not None else spec.max_memory
    shortcut = None
    if part is None and not no_publish:  # a --recheck run still leaves a record
        shortcut = check_shortcut(
            spec, backend, _flags(flags), tag, store_url, index_url, look=not recheck
        )
        if shortcut.record is not None:
            _print_noop(shortcut.record, time.monotonic() - started, as_json)
            return
    from pipeline.executors import make_executor  # noqa: PLC0415
    from pipeline.jobs import lookup_cache, plan_spec  # noqa: PLC0415
    from pipeline.run import Runner, RunOptions  # noqa: PLC0415

    with sigterm_interrupts(), open_store(store_url, index_url) as store:
        if shortcut is not None:
            plans = shortcut.plans
            for plan in plans:
                lookup_cache(store, plan)
        else:
            plans = plan_spec(spec, store, backend, _flags(flags))
        if part is not None:
            plans = select_shard(plans, part)
        executor = make_executor(executor_kind, workers or os.cpu_count() or 1)
        try:
            runner = Runner(
                store,
                spec,
                plans,
                executor,
                RunOptions(
                    tag=tag,
                    timeout=timeout,
                    retry_failed=not no_retry_failed,
                    publish=not no_publish and part is None,
                    max_memory=budget,
                ),
                progress=None if as_json else _progress,
            )
            report = runner.run()
        except BaseException:  # Ctrl-C, SIGTERM, a full disk: stop the workers now
            executor.terminate()
            raise
        finally:
            executor.shutdown()
        if shortcut is not None:
            record = record_of(shortcut.key, report, store)
            if record is not None:
                save_record(record)
            else:
                forget(shortcut.key)
    if as_json:
        data = report.to_json()
        if part is not None:
            data["shard"] = {"index": part.index, "count": part.count}
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        _print_summary(report)
        if part is not None or no_publish:
            where = f"shard {part}: " if part is not None else ""
            click.echo(f"{where}no releases published (run `kiln compile SPEC` to tag them)")
    if not report.ok:
        sys.exit(1)


def _print_noop(record, seconds: float, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    """The report of a no-op rerun: what the full path would print for the same outcome."""
    data = record.report_json(seconds)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    items = sorted(record.items, key=lambda i: (i.model, i.target, i.graph_kind, i.batch, i.seq))
    rows = [[i.model, i.graph_kind, i.bucket, i.target, "direct-hit", "-", "-"] for i in items]
    _print_items(rows)
    _print_totals(data, seconds)
    click.echo(
        f"nothing changed since run {record.run_id}: not recorded as a run (--recheck looks"
        " every graph up in the index and records it)"
    )


def _print_totals(data: dict, seconds: float) -> None:  # type: ignore[type-arg]
    click.echo(
        f"\n{data['jobs']} graphs: {data['compiled']} compiled, {data['direct_hits']}"
        f" direct hits, {data['hlo_hits']} HLO hits, {data['failed']} failed"
        f" in {seconds:.1f}s"
    )
    for p in data["releases"]:
        state = "unchanged" if p["unchanged"] else "new"
        click.echo(f"release {p['ref']} -> {p['digest']} ({state})")
    for line in data["not_released"]:
        click.echo(f"not released: {line}")


def _progress(item, done: int, total: int) -> None:  # type: ignore[no-untyped-def]
    width = 24
    filled = int(width * done / total) if total else width
    bar = "#" * filled + "." * (width - filled)
    timing = f"{item.compile_seconds:.1f}s" if item.compile_seconds else ""
    line = (f"[{bar}] {done}/{total} {item.status:<10} {item.job.label} {timing}").rstrip()
    if item.error:
        line += f"\n    {item.error.splitlines()[0][:300]}"
    click.echo(line, err=True)


def _order(item) -> tuple:  # type: ignore[no-untyped-def, type-arg]
    job = item.job
    return (job.model, job.target, job.graph_kind, job.bucket.batch, job.bucket.seq)


SUMMARY_COLUMNS = ["MODEL", "GRAPH", "BUCKET", "TARGET", "RESULT", "TRACE", "COMPILE"]


def _print_items(rows: list[list[str]]) -> None:
    click.echo(render_table(SUMMARY_COLUMNS, rows))


def _print_summary(report) -> None:  # type: ignore[no-untyped-def]
    _print_items(
        [
            [
                i.job.model,
                i.job.graph_kind,
                i.job.bucket.label,
                i.job.target,
                i.status,
                f"{i.trace_seconds:.2f}s" if i.trace_seconds else "-",
                f"{i.compile_seconds:.2f}s" if i.compile_seconds else "-",
            ]
            for i in sorted(report.items, key=_order)
        ]
    )
    _print_totals(report.to_json(), report.seconds)


@click.command("import-neuron-cache")
@click.argument("path", metavar="PATH")
@click.option("--dry-run", is_flag=True, help="Report what would be imported; store nothing.")
@click.option(
    "--default-target",
    type=click.Choice(NEURON_TARGETS),
    default="inf2",
    show_default=True,
    help="Target of entries whose compile_flags.json has no --target.",
)
@store_options
@json_option
def import_neuron_cache_command(
    path: str,
    dry_run: bool,
    default_target: str,
    store_url: str | None,
    index_url: str | None,
    as_json: bool,
) -> None:
    """Import a Neuron persistent cache (PATH: a folder, a neuronxcc-<version> folder in
    it, or s3://BUCKET/PREFIX) as Kiln compilations: complete entries are imported once;
    incomplete, failed and locked ones are reported."""
    from pipeline.neuron_cache import (  # noqa: PLC0415
        IMPORTED,
        PRESENT,
        STATUSES,
        import_neuron_cache,
    )

    with open_store(store_url, index_url) as store:
        report = import_neuron_cache(store, path, dry_run=dry_run, default_target=default_target)
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would import" if dry_run else IMPORTED
    if report.entries:
        click.echo(
            render_table(
                ["STATUS", "ENTRY", "TARGET", "DETAIL"],
                [
                    [
                        {IMPORTED: verb, PRESENT: "already present"}.get(e.status, e.status),
                        e.folder,
                        e.target or "-",
                        e.detail or " ".join(e.flags) or "-",
                    ]
                    for e in report.entries
                ],
            )
        )
        click.echo("")
    else:
        click.echo(f"no neuronxcc-*/MODULE_* entries under {report.source}")
    click.echo(
        render_table(
            [verb.upper(), "ALREADY PRESENT", *map(str.upper, STATUSES[2:]), "BYTES"],
            [[*(report.count(s) for s in STATUSES), human_size(report.bytes)]],
        )
    )


@click.command("export-neuron-cache")
@click.argument("ref")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@store_options
@json_option
def export_neuron_cache_command(
    ref: str, path: Path, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """Write REF's NEFFs (a release, an HLO key or a compile record) into PATH in the Neuron
    cache layout, under the folder names they were imported with (else
    neuronxcc-<version>/MODULE_<hlo key hex[:20]>), for torch-neuronx to find."""
    from pipeline.neuron_cache import export_neuron_cache  # noqa: PLC0415

    with open_store(store_url, index_url, create=False) as store:
        report = export_neuron_cache(store, ref, path)
    if as_json:
        emit_json(report.to_json())
        return
    for e in report.entries:
        click.echo(f"{e.status:<8} {e.folder}")
    for line in report.skipped:
        click.echo(f"skipped  {line}")
    click.echo(f"{len(report.entries)} entries ({human_size(report.bytes)}) -> {report.path}")
