"""The store commands: ls, show, stats, history, diff, tag, verify, gc, reindex, export, import,
copy."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from artifacts.config import INDEX_ENV, STORE_ENV
from artifacts.errors import ArchiveError, ArtifactError, ReferenceNotFound
from artifacts.progress import ProgressLine
from artifacts.table import human_size, human_time, render_table


def store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--store` / `--index` with their environment variables."""
    func = click.option(
        "--index",
        "index_url",
        envvar=INDEX_ENV,
        metavar="URL",
        help=f"Index database URL (default: SQLite next to a local store) [env {INDEX_ENV}].",
    )(func)
    return click.option(
        "--store",
        "store_url",
        envvar=STORE_ENV,
        metavar="URL",
        help=f"Store path, file://PATH or s3://BUCKET/PREFIX [env {STORE_ENV}].",
    )(func)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def open_store(store_url: str | None, index_url: str | None, create: bool = True):  # type: ignore[no-untyped-def]
    from artifacts.store import Store  # noqa: PLC0415

    return Store.open(store_url, index_url, create=create)


def emit_json(value: Any, err: bool = False) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True), err=err)


def short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


@click.command("ls")
@click.argument("name", required=False)
@store_options
@json_option
def ls_command(
    name: str | None, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """List releases (of NAME) with their tags."""
    from artifacts.inspect import list_releases  # noqa: PLC0415

    with open_store(store_url, index_url, create=False) as store:
        rows = list_releases(store, name)
    if as_json:
        emit_json([r.to_json() for r in rows])
        return
    if not rows:
        click.echo(f"no releases{' of ' + name if name else ''} in this store")
        return
    click.echo(
        render_table(
            ["NAME", "TAGS", "DIGEST", "TARGET", "TASK", "GRAPHS", "SIZE", "CREATED"],
            [
                [
                    r.name,
                    ",".join(r.tags) or "-",
                    short(r.digest),
                    r.target,
                    r.task,
                    r.graphs,
                    human_size(r.size),
                    r.created[:19],
                ]
                for r in rows
            ],
        )
    )


@click.command("stats")
@store_options
@json_option
def stats_command(store_url: str | None, index_url: str | None, as_json: bool) -> None:
    """Counts and sizes of what the store holds."""
    from artifacts.inspect import store_stats  # noqa: PLC0415

    with open_store(store_url, index_url, create=False) as store:
        if not store.has_index:
            store.probe()
        stats = store_stats(store)
    if as_json:
        emit_json(stats.to_json())
        return
    click.echo(f"store:        {stats.store}\nindex:        {stats.index}")
    click.echo(f"blobs:        {stats.blobs} ({human_size(stats.bytes)})")
    click.echo(f"releases:     {stats.releases}\ntags:         {stats.tags}")
    click.echo(f"compilations: {stats.compilations}\nruns:         {stats.runs}")
    if stats.by_kind:
        click.echo("")
        click.echo(
            render_table(
                ["KIND", "BLOBS", "SIZE"],
                [[k, n, human_size(b)] for k, (n, b) in sorted(stats.by_kind.items())],
            )
        )


def _compilations(store, column: str, value: str) -> list[tuple[str, dict[str, Any]]]:  # type: ignore[no-untyped-def]
    """(record digest, compile record) of the compilations whose `column` is `value`."""
    from artifacts.digest import Digest  # noqa: PLC0415 - hashlib only when used (kiln --help)

    found = [c.record_digest for c in store.compilations(**{column: value})]
    return [(d, json.loads(store.read_bytes(Digest.parse(d)))) for d in found]


def _echo_compilation(digest: str, record: dict[str, Any]) -> None:
    """A compile record, with the triaged cause and next step of a failure."""
    status = record.get("status", "?")
    reason = f" ({record['reason']})" if record.get("reason") else ""
    click.echo(f"compilation: {digest}\nhlo key:     {record.get('hlo_key')}")
    click.echo(f"status:      {status}{reason}")
    click.echo(
        f"compiler:    {record.get('compiler')} {record.get('compiler_version')}"
        f"  target {record.get('target')}  flags {' '.join(record.get('flags', [])) or '-'}"
    )
    click.echo(f"hlo:         {record.get('hlo_digest')}")
    if record.get("executable_digest"):
        exe = record["executable_digest"]
        click.echo(f"executable:  {exe} ({record.get('executable_format')})")
    click.echo(f"log:         {record.get('log_digest') or '-'}")
    click.echo(f"seconds:     {float(record.get('seconds') or 0):.1f}")
    provenance = record.get("provenance") or {}
    if isinstance(provenance, dict) and provenance.get("source") == "neuron-cache":
        click.echo(f"imported:    from a Neuron cache, {provenance.get('folder')}")
    if record.get("error"):
        click.echo(f"error:       {record['error']}")
    triage = record.get("triage") or {}
    if triage:
        code = f" [{triage['code']}]" if triage.get("code") else ""
        click.echo(f"cause:       {triage.get('summary')}{code}")
        if triage.get("line"):
            click.echo(f"log line:    {triage['line']}")
        click.echo(f"next step:   {triage.get('suggestion')}")


def _echo_neff(store, digest) -> None:  # type: ignore[no-untyped-def]
    from artifacts.neff import NeffError, read_neff_header  # noqa: PLC0415

    try:
        click.echo(f"neff:     {read_neff_header(store, digest).describe()}")
    except NeffError as exc:
        click.echo(f"neff:     INVALID: {exc}")


def _neff_headers(store, release) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """executable digest -> NeffHeader (or the problem, as text) for a release's NEFF graphs."""
    from artifacts.neff import read_neff_header  # noqa: PLC0415

    out: dict[str, Any] = {}
    for g in release.graphs:
        if g.format == "neff":
            try:
                out[str(g.executable.digest)] = read_neff_header(store, g.executable.digest)
            except ArtifactError as exc:  # a bad header, or a missing blob
                out[str(g.executable.digest)] = f"INVALID: {exc}"
    return out


@click.command("show")
@click.argument("ref")
@click.option(
    "--compilation",
    "by_hlo_key",
    is_flag=True,
    help="REF is an HLO key: show every compile of it, newest first (failures with cause).",
)
@store_options
@json_option
def show_command(
    ref: str, by_hlo_key: bool, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """Show a release (NAME:TAG, NAME@DIGEST, digest or prefix) or any blob by digest: a
    NEFF's header, a compile record or a compile log with the cause of a failed compile."""
    from artifacts.inspect import show_blob, show_release  # noqa: PLC0415

    with open_store(store_url, index_url, create=False) as store:
        if by_hlo_key:
            records = _compilations(store, "hlo_key", ref)
            if not records:
                raise ReferenceNotFound(f"no compilation of HLO key {ref!r} in this store")
            if as_json:
                emit_json([{"record_digest": d, **r} for d, r in records])
                return
            for i, (d, r) in enumerate(records):
                if i:
                    click.echo("")
                _echo_compilation(d, r)
            return
        try:
            view = show_release(store, ref)
        except ReferenceNotFound:
            from artifacts.neff import NeffError, is_neff_blob, read_neff_header  # noqa: PLC0415

            digest = store.resolve_blob(ref)
            blob = show_blob(store, digest)
            records = []
            neff = False
            if store.has_index:
                records = _compilations(store, "record_digest", str(digest)) or _compilations(
                    store, "log_digest", str(digest)
                )
                neff = is_neff_blob(store, digest)
            if as_json:
                out = blob.to_json()
                if records:
                    out["compilations"] = [{"record_digest": d, **r} for d, r in records]
                if neff:
                    try:
                        out["neff"] = read_neff_header(store, digest).to_json()
                    except NeffError as exc:
                        out["neff_error"] = str(exc)
                emit_json(out)
                return
            click.echo(f"blob:     {blob.digest}\nkind:     {blob.kind or 'data'}")
            click.echo(f"size:     {human_size(blob.size)} ({blob.size} B)")
            click.echo(f"used by:  {', '.join(blob.referenced_by) or '-'}")
            if neff:
                _echo_neff(store, digest)
            for d, r in records:
                click.echo("")
                _echo_compilation(d, r)
            if records and str(digest) == records[0][1].get("log_digest"):
                tail = store.read_bytes(digest).decode("utf-8", "replace").splitlines()[-20:]
                click.echo("\nlog (last lines):\n" + "\n".join(f"  {line}" for line in tail))
            return
        headers = _neff_headers(store, view.release)
    if as_json:
        out = view.to_json()
        if headers:
            out["neff_headers"] = {
                d: h if isinstance(h, str) else h.to_json() for d, h in headers.items()
            }
        emit_json(out)
        return
    r = view.release
    click.echo(f"release:   {r.name}@{view.digest}")
    click.echo(f"tags:      {', '.join(view.tags) or '-'}")
    click.echo(f"target:    {r.target}    task: {r.source.task}    size: {human_size(view.size)}")
    click.echo(f"arch:      {r.source.architecture_digest}")
    for w in r.source.weights:
        click.echo(f"weights:   {w.digest} ({human_size(w.size)})")
    for f in r.source.files:
        click.echo(f"file:      {f.name or '-'} {f.digest.short} ({human_size(f.size)})")
    p = r.provenance
    click.echo(f"built:     {p.created} by {p.user}@{p.host} with kiln {p.kiln_version}")
    click.echo("")
    click.echo(
        render_table(
            [
                "GRAPH",
                "BUCKET",
                "FORMAT",
                "COMPILER",
                "VERSION",
                "FLAGS",
                "EXECUTABLE",
                "SIZE",
                "COMPILE",
            ],
            [
                [
                    g.kind,
                    g.bucket_label,
                    g.format,
                    g.compiler.name,
                    g.compiler.version,
                    " ".join(g.compiler.flags) or "-",
                    g.executable.digest.short,
                    human_size(g.executable.size),
                    f"{g.compile_seconds:.1f}s",
                ]
                for g in r.graphs
            ],
        )
    )
    if headers:
        click.echo("\nNEFF headers:")
        for g in r.graphs:
            header = headers.get(str(g.executable.digest))
            if header is not None:
                text = header if isinstance(header, str) else header.describe()
                click.echo(f"  {g.kind} {g.bucket_label}: {text}")


@click.command("history")
@click.argument("name_tag", metavar="NAME:TAG")
@store_options
@json_option
def history_command(
    name_tag: str, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """Every move of a tag, newest first."""
    with open_store(store_url, index_url, create=False) as store:
        moves = store.history(name_tag)
    if as_json:
        emit_json([m.to_move_json() for m in moves])
        return
    click.echo(
        render_table(
            ["WHEN (UTC)", "DIGEST", "PREVIOUS", "WHO", "REASON"],
            [
                [
                    human_time(m.at),
                    short(m.digest),
                    short(m.previous) if m.previous else "-",
                    f"{m.user}@{m.host}",
                    m.reason or "-",
                ]
                for m in moves
            ],
        )
    )


@click.command("diff")
@click.argument("left")
@click.argument("right")
@store_options
@json_option
def diff_command(
    left: str, right: str, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """What changed between two releases: graphs, flags, compiler versions, sizes."""
    from artifacts.inspect import diff_releases  # noqa: PLC0415

    with open_store(store_url, index_url, create=False) as store:
        a = store.load_release(store.resolve(left).digest)
        b = store.load_release(store.resolve(right).digest)
    d = diff_releases(a, b, left, right)
    if as_json:
        emit_json(d.to_json())
        return
    if d.identical:
        click.echo(f"{left} and {right}: no differences in {d.unchanged} graphs")
        return
    for name, x, y in d.fields:
        click.echo(f"~ {name}: {x} -> {y}")
    for g in d.added:
        click.echo(f"+ {g}")
    for g in d.removed:
        click.echo(f"- {g}")
    for c in d.changed:
        click.echo(f"~ {c.kind} {c.bucket}: " + "; ".join(c.changes))
    click.echo(
        f"{d.unchanged} graphs unchanged; size {human_size(d.size_left)} -> "
        f"{human_size(d.size_right)}"
    )


@click.command("tag")
@click.argument("source")
@click.argument("destination", metavar="NAME:TAG")
@click.option("--reason", "-m", default="", help="Why the tag moves (kept in its history).")
@store_options
@json_option
def tag_command(
    source: str,
    destination: str,
    reason: str,
    store_url: str | None,
    index_url: str | None,
    as_json: bool,
) -> None:
    """Point NAME:TAG at the release SOURCE refers to (a rollback is just this)."""
    with open_store(store_url, index_url) as store:
        move = store.tag(source, destination, reason)
    if as_json:
        emit_json(move.to_move_json())
        return
    was = f" (was {short(move.previous)})" if move.previous else ""
    click.echo(f"{move.name}:{move.tag} -> {move.digest}{was}")


@click.command("verify")
@store_options
@json_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Parallel rehash threads.",
)
def verify_command(
    store_url: str | None, index_url: str | None, as_json: bool, workers: int
) -> None:
    """Rehash every blob and check the index against the blobs; exit 1 naming bad digests."""
    from artifacts.verify import verify_store  # noqa: PLC0415

    with open_store(store_url, index_url, create=False) as store:
        if not store.has_index:
            store.probe()
            store.require_index("kiln verify (it checks the index against the blobs)")
        report = verify_store(store, workers, ProgressLine("verify", not as_json))
    if as_json:
        emit_json(report.to_json())
    else:
        for p in report.problems:
            click.echo(f"BAD {p.digest}: {p.problem}")
        if report.index_problems:
            first, more = report.index_problems[0], len(report.index_problems) - 1
            click.echo(
                f"BAD index {store.index_label}: {first}"
                + (f" (and {more} more)" if more else "")
                + "; rebuild it from the blobs with `kiln reindex`"
            )
        if report.unindexed:
            click.echo(
                f"note: {len(report.unindexed)} blobs are not in the index"
                " (`kiln reindex` adds them)"
            )
        state = "ok" if report.ok else f"{len(report.bad)} bad"
        state += ", index damaged" if report.index_problems else ""
        click.echo(f"checked {report.checked} blobs ({human_size(report.bytes)}): {state}")
    if not report.ok:
        sys.exit(1)


def _non_negative(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A duration option: finite and not negative (a one-line error, not click's usage)."""
    if not math.isfinite(value) or value < 0:
        error = click.ClickException(f"{param.opts[0]} {value}: must be a finite number >= 0")
        error.exit_code = 2
        raise error
    return value


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted and the bytes freed.")
@click.option(
    "--grace-days",
    type=float,
    default=7.0,
    show_default=True,
    callback=_non_negative,
    help="Keep releases a tag pointed at, or a run used, within this many days.",
)
@click.option(
    "--min-age-hours",
    type=float,
    default=1.0,
    show_default=True,
    callback=_non_negative,
    help="Never delete blobs younger than this (writers may be in flight).",
)
@store_options
@json_option
def gc_command(
    dry_run: bool,
    grace_days: float,
    min_age_hours: float,
    store_url: str | None,
    index_url: str | None,
    as_json: bool,
) -> None:
    """Delete blobs no tag, recent tag history or recent run reaches."""
    from artifacts.gc import GcPolicy, execute_gc, plan_gc  # noqa: PLC0415

    policy = GcPolicy(grace_days * 86400, grace_days * 86400, min_age_hours * 3600)
    with open_store(store_url, index_url, create=False) as store:
        if not store.has_index:
            store.probe()
            store.require_index("kiln gc")
        plan = plan_gc(store, policy)
        if dry_run:
            if as_json:
                emit_json({"dry_run": True, **plan.to_json()})
            else:
                for info in plan.delete:
                    click.echo(f"would delete {info.digest} ({human_size(info.size)})")
                click.echo(
                    f"would free {human_size(plan.bytes)} in {len(plan.delete)} blobs"
                    f" ({len(plan.manifests)} releases); keeping {plan.kept_blobs} blobs"
                )
            return
        report = execute_gc(store, plan)
    if as_json:
        emit_json({"dry_run": False, **report.to_json()})
    else:
        spared = f"; spared {report.spared} in use by writers" if report.spared else ""
        click.echo(
            f"freed {human_size(report.bytes_freed)} in {report.blobs_deleted} blobs"
            f" ({report.manifests_deleted} releases, {report.compilations_deleted}"
            f" compilations){spared}"
        )


@click.command("reindex")
@click.option(
    "--drop-unreadable",
    is_flag=True,
    help="Rebuild without document blobs that cannot be read (their releases or tags are"
    " lost from the index); without it, reindex refuses and names them.",
)
@store_options
@json_option
def reindex_command(
    drop_unreadable: bool, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """Rebuild the index from the blobs alone."""
    from artifacts.reindex import reindex  # noqa: PLC0415

    report = reindex(
        store_url, index_url, ProgressLine("reindex", not as_json), drop_unreadable
    )
    if as_json:
        emit_json(report.to_json())
        return
    click.echo(
        f"indexed {report.blobs} blobs: {report.releases} releases, {report.tags} tags"
        f" ({report.tag_events} moves), {report.compilations} compilations,"
        f" {report.runs} runs"
    )
    for s in report.skipped:
        click.echo(f"skipped {s}")


@click.command("export")
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    required=True,
    help="The tar file to write (a FIFO or device is written in place; - for stdout).",
)
@store_options
@json_option
def export_command(
    ref: str, output: Path, store_url: str | None, index_url: str | None, as_json: bool
) -> None:
    """Write a release and every blob it references into one tar file."""
    from artifacts.transfer import export_release  # noqa: PLC0415

    to_stdout = str(output) == "-"
    if to_stdout and sys.stdout.isatty():
        raise ArchiveError("refusing to write a tar archive to a terminal; redirect stdout")
    with open_store(store_url, index_url, create=False) as store:
        report = export_release(store, ref, sys.stdout.buffer if to_stdout else output)
    to_stdout = to_stdout or _is_stdout(output)  # -o /dev/stdout: keep the summary out of it
    if as_json:
        emit_json(
            {
                "digest": str(report.digest),
                "ref": report.ref,
                "blobs": report.blob_count,
                "bytes": report.bytes,
                "path": str(report.path),
            },
            err=to_stdout,
        )
        return
    click.echo(
        f"exported {report.ref} ({report.digest}): {report.blob_count} blobs,"
        f" {human_size(report.bytes)} -> {report.path}",
        err=to_stdout,
    )


def _is_stdout(path: Path) -> bool:
    try:
        here, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (here.st_dev, here.st_ino) == (out.st_dev, out.st_ino)


@click.command("import")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--no-tag", is_flag=True, help="Do not move the tags recorded in the archive.")
@click.option(
    "--move-tags",
    is_flag=True,
    help="Move a tag this store already has to the archive's release (default: refuse).",
)
@store_options
@json_option
def import_command(
    archive: Path,
    no_tag: bool,
    move_tags: bool,
    store_url: str | None,
    index_url: str | None,
    as_json: bool,
) -> None:
    """Import an archive made by `kiln export` (every blob verified)."""
    from artifacts.transfer import import_archive  # noqa: PLC0415

    with open_store(store_url, index_url) as store:
        report = import_archive(store, archive, tag=not no_tag, move_tags=move_tags)
    if as_json:
        emit_json(
            {
                "releases": [{"ref": r, "digest": str(d)} for r, d in report.releases],
                "blobs_added": report.blobs_added,
                "blobs_present": report.blobs_present,
                "bytes": report.bytes,
            }
        )
        return
    for r, d in report.releases:
        click.echo(f"imported {r or '-'} {d}")
    click.echo(
        f"{report.blobs_added} blobs added, {report.blobs_present} already present"
        f" ({human_size(report.bytes)})"
    )


@click.command("copy")
@click.argument("ref")
@click.option(
    "--from",
    "from_url",
    envvar=STORE_ENV,
    metavar="URL",
    help=f"Source store (path, file://PATH or s3://BUCKET/PREFIX) [env {STORE_ENV}].",
)
@click.option("--to", "to_url", required=True, metavar="URL", help="Destination store.")
@click.option(
    "--from-index",
    envvar=INDEX_ENV,
    metavar="URL",
    help=f"Source index URL [env {INDEX_ENV}].",
)
@click.option("--to-index", metavar="URL", help="Destination index URL (default: its own).")
@click.option(
    "--tag",
    "tag",
    metavar="NAME:TAG",
    help="Tag to move in the destination (default: the tag REF names, if it names one).",
)
@click.option("--workers", default=4, show_default=True, help="Blobs copied at once.")
@json_option
def copy_command(
    ref: str,
    from_url: str | None,
    to_url: str,
    from_index: str | None,
    to_index: str | None,
    tag: str | None,
    workers: int,
    as_json: bool,
) -> None:
    """Promote release REF to another store: missing blobs (verified), manifest, tag last."""
    from artifacts.copy import copy_release, open_stores  # noqa: PLC0415

    source, destination = open_stores(from_url, to_url, from_index, to_index)
    with source, destination:
        report = copy_release(
            source, destination, ref, tag, workers, ProgressLine("copy", not as_json)
        )
    if as_json:
        emit_json(report.to_json())
        return
    tagged = f"; {report.tag} -> {short(str(report.digest))}" if report.tag else ""
    click.echo(
        f"{report.name}@{short(str(report.digest))}: {report.copied} blobs copied"
        f" ({human_size(report.bytes_copied)}), {report.present} already present"
        f" in {report.destination}{tagged}"
    )


COMMANDS = [
    ls_command,
    stats_command,
    show_command,
    history_command,
    diff_command,
    tag_command,
    verify_command,
    gc_command,
    reindex_command,
    export_command,
    import_command,
    copy_command,
]
