"""Name the cause of a failed neuronx-cc compile from its log and exit code, and say what to
try next. Pure text analysis: no compiler needed, so it also works on recorded logs."""

from __future__ import annotations

import re
import signal
from dataclasses import asdict, dataclass
from typing import Any

DOCS = "https://awsdocs-neuron.readthedocs-hosted.com/en/latest/compiler/error-codes"
_NCC = re.compile(r"\b(NCC_[A-Z]{4}\d{3})\b")
_ERROR_LINE = re.compile(r"\bERROR\b|\[F\d{3}\]|Error:")
_BANNER = re.compile(r":\s*\**\s*$")  # "... [neuronx-cc]: *****" or an empty message
_OOM_MARKERS = ("[F137]", "forcibly killed")
_ABNORMAL_MARKER = "[F134]"

_DEVICE_MEMORY = (
    "the graph's tensors do not fit the device's high-bandwidth memory",
    "use smaller buckets (batch or sequence length) for this model, or shard it with tensor"
    " parallelism",
)
_INSTRUCTIONS = (
    "the graph needs more instructions than the compiler's limit",
    "split the bucket list (smaller batch/sequence buckets give smaller graphs) or partition"
    " the model; -O1 also emits fewer instructions",
)
_UNSUPPORTED_OP = (
    "the graph uses an operator neuronx-cc does not support",
    "replace the operator in the model code (`neuronx-cc list-operators --framework XLA` lists"
    " the supported ones)",
)
# Documented codes (Neuron Compiler Error Codes) -> (what it means, what to try).
NCC_CODES: dict[str, tuple[str, str]] = {
    "NCC_EARG001": (
        "the Logical NeuronCore (LNC) setting is not supported by the target",
        "use --lnc=1, or compile for trn2",
    ),
    "NCC_EOOM001": _DEVICE_MEMORY,
    "NCC_EOOM002": _DEVICE_MEMORY,
    "NCC_EVRF009": _DEVICE_MEMORY,
    "NCC_EXSP001": _DEVICE_MEMORY,
    "NCC_EVRF007": _INSTRUCTIONS,
    "NCC_EBVF030": _INSTRUCTIONS,
    "NCC_EXTP004": _INSTRUCTIONS,
    "NCC_EUOC002": _UNSUPPORTED_OP,
    "NCC_EVRF001": _UNSUPPORTED_OP,
    "NCC_EMOD025": (
        "the graph has dynamic shapes; neuronx-cc needs every dimension static",
        "trace with fixed bucket shapes (no data-dependent shapes in forward)",
    ),
    "NCC_EVRF004": (
        "complex data types are not supported on Neuron devices",
        "keep complex arithmetic off the traced graph",
    ),
    "NCC_ESPP004": (
        "the graph uses a data type the compiler cannot generate code for",
        "cast to a supported dtype (float32, bfloat16, float16, int32)",
    ),
    "NCC_EVRF013": (
        "TopK on integer tensors is not supported",
        "cast the TopK input to a floating-point type",
    ),
    "NCC_EVRF022": (
        "shift-right-arithmetic on non-32-bit inputs is not supported",
        "cast the operands to int32, uint32 or float32",
    ),
    "NCC_EVRF056": (
        "a gather reads out of bounds",
        "check that max_position_embeddings >= the largest sequence bucket",
    ),
    "NCC_EVRF064": (
        "the input HLO failed verification (an instruction violates XLA shape rules)",
        "inspect the reported instruction in the log; re-trace with a supported torch-xla",
    ),
}


@dataclass(frozen=True)
class Triage:
    """Why a compile failed (`cause`), in words (`summary`), and the next step to try."""

    cause: str  # oom | abnormal-termination | compiler-error | timeout | exit | unknown
    summary: str
    suggestion: str
    code: str | None = None
    line: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Triage:
        fields = cls.__dataclass_fields__
        return cls(**{k: value.get(k) for k in fields if k in value})  # type: ignore[arg-type]


def _line_with(log: str, needle: str) -> str | None:
    for line in log.splitlines():
        if needle in line:
            return line.strip()[:400]
    return None


def _last_error_line(log: str) -> str | None:
    """The last informative error line (not the "Compiler status ERROR" trailer or a banner)."""
    lines = [
        line.strip()
        for line in log.splitlines()
        if _ERROR_LINE.search(line) and "Compiler status" not in line and not _BANNER.search(line)
    ]
    return lines[-1][:400] if lines else None


def triage(log: str, returncode: int | None = None, reason: str | None = None) -> Triage:
    """The cause of a failed neuronx-cc run (its log text, exit code and Kiln's reason)."""
    log = log or ""
    if reason == "timeout":
        return Triage(
            "timeout",
            "the compile ran past its time limit and was killed",
            "raise `kiln compile --timeout`, try -O1 (faster to compile), or split the bucket"
            " list so each graph is smaller",
            line=_last_error_line(log),
        )
    if returncode == -signal.SIGKILL or any(m in log for m in _OOM_MARKERS):
        return Triage(
            "oom",
            "neuronx-cc was killed, most likely by the OOM killer (host memory ran out)",
            "run fewer compiles at once (`kiln compile --workers 1` or a memory budget), use a"
            " host with more memory, or split the bucket list across jobs (--shard)",
            code="F137" if "[F137]" in log else None,
            line=_line_with(log, "[F137]") or _line_with(log, "forcibly killed"),
        )
    match = _NCC.search(log)
    if match:
        code = match.group(1)
        summary, suggestion = NCC_CODES.get(
            code,
            (
                f"neuronx-cc reported {code}",
                f"see {DOCS}/{code.removeprefix('NCC_')}.html for this error",
            ),
        )
        return Triage("compiler-error", summary, suggestion, code, _line_with(log, code))
    if _ABNORMAL_MARKER in log:
        return Triage(
            "abnormal-termination",
            "neuronx-cc terminated abnormally (an internal compiler crash)",
            "retry once (it can be transient), then try another optimization level (-O1),"
            " or report it to the Neuron SDK with the log",
            code="F134",
            line=_line_with(log, _ABNORMAL_MARKER),
        )
    if returncode is not None and returncode != 0:
        return Triage(
            "exit",
            f"neuronx-cc exited with status {returncode}",
            "read the last error line of the log; try -O1 or fewer flags to isolate it",
            line=_last_error_line(log),
        )
    return Triage(
        "unknown",
        "the compile failed without a recognisable cause in its log",
        "read the full log (`kiln show` of the log digest prints it)",
        line=_last_error_line(log),
    )
