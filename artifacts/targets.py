"""The one table of compile targets: the compiler that builds for each, the executable format
it produces, the instances it runs on and the neuronx-cc LNC sizes it accepts.

It lives in artifacts/ (and imports nothing of the project's) because the build side (spec,
CLI, flag checker, compiler choice), the store (NEFF header checks) and the loader read it.
"""

from __future__ import annotations

from typing import Final, NamedTuple

# compiler backends, and the executable formats they produce
XLA_CPU: Final = "xla-cpu"
NEURONX_CC: Final = "neuronx-cc"
XLA_CPU_FORMAT: Final = "xla-cpu"
NEFF_FORMAT: Final = "neff"


class Target(NamedTuple):
    """One compile target. `lnc_sizes` are the `--lnc` values neuronx-cc accepts for it
    (a logical NeuronCore of 2 physical cores exists only on trn2); empty for the CPU.

    A NamedTuple rather than a dataclass: `kiln --help` reads the CLI choices from this
    table, and `dataclasses` is not otherwise imported there."""

    name: str
    compiler: str
    executable_format: str
    instances: str
    lnc_sizes: tuple[str, ...] = ()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", XLA_CPU, XLA_CPU_FORMAT, "any host with jaxlib (x86_64 or arm64)"),
        Target("inf2", NEURONX_CC, NEFF_FORMAT, "inf2.*", ("1",)),
        Target("trn1", NEURONX_CC, NEFF_FORMAT, "trn1.*", ("1",)),
        Target("trn1n", NEURONX_CC, NEFF_FORMAT, "trn1n.*", ("1",)),
        Target("trn2", NEURONX_CC, NEFF_FORMAT, "trn2.*", ("1", "2")),
    )
}
TARGET_NAMES = tuple(TARGETS)
CPU_TARGETS = tuple(n for n, t in TARGETS.items() if t.compiler == XLA_CPU)
NEURON_TARGETS = tuple(n for n, t in TARGETS.items() if t.compiler == NEURONX_CC)
NEFF_TARGETS = tuple(n for n, t in TARGETS.items() if t.executable_format == NEFF_FORMAT)
LNC_TARGETS = tuple(n for n, t in TARGETS.items() if any(s != "1" for s in t.lnc_sizes))
EXECUTABLE_FORMATS = tuple(dict.fromkeys(t.executable_format for t in TARGETS.values()))
COMPILERS = tuple(dict.fromkeys(t.compiler for t in TARGETS.values()))
