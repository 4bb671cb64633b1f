"""Neuron-side test material: NEFF files built from the documented header layout, Neuron
persistent-cache folders, realistic neuronx-cc logs, and a `neuronx-cc` stand-in."""

from __future__ import annotations

import gzip
import io
import json
import stat
import struct
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

NEURON_VERSION = "2.15.141.0+d3cfc8ca"
NEFF_UUID = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


def neff_bytes(
    *,
    name: str = "model",
    compressed: bool = True,
    num_tpb: int = 1,
    lnc_size: int = 1,
    build_version: str = NEURON_VERSION,
    version: tuple[int, int] = (2, 0),
    package_version: int = 1,
    neff_uuid: uuid.UUID = NEFF_UUID,
    files: dict[str, bytes] | None = None,
) -> bytes:
    """A NEFF as the documented layout has it: a 1024-byte little-endian header, then a tar
    (gzip unless `compressed` is False, as with --enable-fast-loading-neuron-binaries)."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w") as tar:
        for member, data in (files or {"neff.json": b'{"name": "%s"}' % name.encode()}).items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    payload = tar_buffer.getvalue()
    if compressed:
        payload = gzip.compress(payload, mtime=0)
    header = bytearray(1024)
    struct.pack_into("<Q", header, 0, package_version)
    struct.pack_into("<Q", header, 8, 1024)  # header_size
    struct.pack_into("<Q", header, 16, len(payload))  # data_size
    struct.pack_into("<Q", header, 24, version[0])
    struct.pack_into("<Q", header, 32, version[1])
    header[40 : 40 + len(build_version)] = build_version.encode()  # char[128]
    struct.pack_into("<I", header, 168, num_tpb)
    header[172:204] = bytes(range(32))  # hash
    header[204:220] = neff_uuid.bytes
    header[220 : 220 + len(name)] = name.encode()  # char[256]
    struct.pack_into("<I", header, 476, num_tpb)  # requested_tpb_count
    struct.pack_into("<Q", header, 544, 0)  # feature_bits
    struct.pack_into("<I", header, 552, lnc_size)
    return bytes(header) + payload


# --- realistic neuronx-cc logs ----------------------------------------------------------

OOM_LOG = """\
2024-09-21 16:15:27.000717:  4818  INFO ||NEURON_CC_WRAPPER||: Call compiler with cmd: \
neuronx-cc compile --framework=XLA /tmp/tmpx1/model.hlo_module.pb --output \
/tmp/tmpx1/model.neff --target=inf2 --model-type=transformer --verbose=35
..........
[F137] neuronx-cc was forcibly killed - This most commonly occurs due to insufficient \
system memory. Using a smaller data type, dimensions, batch size, or a larger instance type \
may help.
"""

ABNORMAL_LOG = """\
2024-05-02T11:02:13Z INFO 31337 [root]: Compiling model.hlo_module.pb for target trn1
2024-05-02T11:09:41Z ERROR 31337 [neuronx-cc]: ***************************************
2024-05-02T11:09:41Z ERROR 31337 [neuronx-cc]:  An Internal Compiler Error has occurred
2024-05-02T11:09:41Z ERROR 31337 [neuronx-cc]: ***************************************
[F134] neuronx-cc terminated abnormally - Please open a support ticket at \
https://github.com/aws-neuron/aws-neuron-sdk/issues/new
"""

INSTRUCTION_LIMIT_LOG = """\
2025-02-11T08:14:55Z INFO 2211 [root]: Compiling model.hlo_module.pb for target inf2
2025-02-11T08:31:02Z ERROR 2211 [neuronx-cc]: [NCC_EVRF007] Estimated number of \
instructions (6,412,113) exceeds the limit (5,000,000). Consider applying model parallelism.
2025-02-11T08:31:02Z ERROR 2211 [neuronx-cc]: Compilation failed for model.hlo_module.pb \
with exception: instruction limit
Compiler status ERROR
"""

LNC_LOG = """\
2025-03-01T10:00:00Z ERROR 77 [neuronx-cc]: [NCC_EARG001] Logical Neuron Core \
configuration lnc=2 is not supported for target trn1
"""

UNKNOWN_CODE_LOG = "2025-03-01T10:00:00Z ERROR 77 [neuronx-cc]: [NCC_EZZZ123] something new\n"

EXIT_70_LOG = """\
2024-01-09T12:00:00Z INFO 900 [root]: Compiling model.hlo_module.pb for target trn1
2024-01-09T12:00:07Z ERROR 900 [neuronx-cc]: Unsupported HLO opcode: rng-get-and-update-state
Compiler status ERROR
"""


# --- a Neuron persistent cache ----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One MODULE_ folder to write."""

    module: str
    hlo: bytes
    flags: list[str] | None
    neff: bytes | None = None
    done: bool = False
    log: str | None = None
    lock: bool = False
    hlo_name: str = "model.hlo_module.pb"


def write_entry(root: Path, entry: Entry, version: str = NEURON_VERSION) -> Path:
    folder = root / f"neuronxcc-{version}" / entry.module
    folder.mkdir(parents=True, exist_ok=True)
    (folder / entry.hlo_name).write_bytes(entry.hlo)
    if entry.flags is not None:
        (folder / "compile_flags.json").write_text(json.dumps(entry.flags))
    if entry.neff is not None:
        (folder / "model.neff").write_bytes(entry.neff)
    if entry.log is not None:
        (folder / "model.log").write_text(entry.log)
    if entry.lock:
        (folder / f"{entry.hlo_name}.lock").write_bytes(b"")
    if entry.done:
        (folder / "model.done").write_bytes(b"")
    return folder


def tree(root: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under root."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# --- a neuronx-cc stand-in --------------------------------------------------------------

STANDIN = """#!/bin/sh
# Test double for the AWS Neuron SDK's `neuronx-cc`, which cannot be installed here (it comes
# from Neuron's own package index, and PyPI's neuronx-cc is a placeholder). It answers
# `--version` like the real compiler, with the version of the Neuron cache under test, and
# `compile` as MODE says: "fail" (exit 1 with an error log), "oom" (the F137 message, then
# killed by SIGKILL like the OOM killer does).
if [ "$1" = "--version" ]; then
    echo "NeuronX Compiler version {version}"
    echo "Python version 3.11"
    exit 0
fi
if [ "{mode}" = "oom" ]; then
    echo "[F137] neuronx-cc was forcibly killed - insufficient system memory" > "${{10}}"
    kill -9 $$
fi
echo "ERROR: kiln test stand-in cannot compile" > "${{10}}"
echo "Compiler status ERROR"
exit 1
"""


def install_neuronx_cc(bin_dir: Path, version: str = NEURON_VERSION, mode: str = "fail") -> Path:
    """Write the `neuronx-cc` stand-in (see STANDIN) into bin_dir; returns bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "neuronx-cc"
    script.write_text(STANDIN.format(version=version, mode=mode))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


# --- HLO from Kiln's own tracer ---------------------------------------------------------


def trace_spec_hlo(spec_path: Path) -> dict[tuple[int, int], bytes]:
    """(batch, seq) -> HloModuleProto of the spec's first model, traced as `kiln` traces it
    (same model loader, graph builder and torch-xla tracer), before Kiln strips metadata."""
    from pipeline.graphs.encoder import build_encoder_graph
    from pipeline.sources import load_model
    from pipeline.spec import load_spec
    from pipeline.trace import trace_graph

    model_spec = load_spec(spec_path).models[0]
    model = load_model(model_spec)
    out = {}
    for bucket in model_spec.buckets:
        module, inputs, outputs = build_encoder_graph(model, bucket.batch, bucket.seq)
        out[(bucket.batch, bucket.seq)] = trace_graph(module, inputs, outputs).hlo_proto
    return out
