"""neuronx-cc flags: one canonical spelling (so equal flags give equal keys) and checks
against the target before anything is compiled.

Canonical form: `--opt value` and `--opt=value` both become `--opt=value` for the options
known to take a value; `--optlevel N`, `--optlevel=N` and `-O N` become `-ON`;
`--logical-nc-config` and `-lnc` become `--lnc`. Order is kept (a later flag overrides an
earlier one in neuronx-cc). Flags Kiln does not know are passed through unchanged:
neuronx-cc has many internal options.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from artifacts.targets import LNC_TARGETS, NEURON_TARGETS, TARGETS
from pipeline.errors import NeuronFlagError

MODEL_TYPES = ("generic", "transformer", "unet-inference")
AUTO_CAST = ("none", "matmult", "matmul", "all")  # "matmul": the spelling of older docs
AUTO_CAST_TYPES = ("bf16", "fp16", "tf32", "fp8_e4m3")
OPT_LEVELS = ("1", "2", "3")
LNC_VALUES = tuple(sorted({s for t in NEURON_TARGETS for s in TARGETS[t].lnc_sizes}))

# Options Kiln sets itself on every neuronx-cc command line.
KILN_MANAGED = ("--target", "--framework", "--output", "--logfile")
# Options only the torch-neuronx cache wrapper reads; they never reach the compiler.
WRAPPER_ONLY = ("--cache_dir", "--retry_failed_compilation", "--no_cache", "--log_level")
VALUE_OPTIONS = frozenset(
    {
        *KILN_MANAGED,
        "--model-type",
        "--auto-cast",
        "--auto-cast-type",
        "--lnc",
        "--optlevel",
        "--verbose",
        "--distribution-strategy",
        "--execute-repetition",
        "--tensorizer-options",
        "--internal-hlo2tensorizer-options",
        "--internal-backend-options",
        "--cache_dir",
        "--log_level",
    }
)
ALIASES = {"--logical-nc-config": "--lnc", "-lnc": "--lnc"}



def _split(token: str) -> tuple[str, str | None]:
    if token.startswith("--") and "=" in token:
        name, _, value = token.partition("=")
        return ALIASES.get(name, name), value
    return ALIASES.get(token, token), None


def canonical_flags(flags: Iterable[str]) -> tuple[str, ...]:
    """The canonical spelling of a flag list (see the module docstring)."""
    tokens = list(flags)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        name, value = _split(tokens[i])
        i += 1
        takes_value = name in VALUE_OPTIONS or name == "-O" or name.endswith("-options")
        # values of the *-options flags are option strings themselves ("--a --b")
        dashed_ok = name.endswith("-options")
        if value is None and takes_value and i < len(tokens):
            if dashed_ok or not tokens[i].startswith("-"):
                value = tokens[i]
                i += 1
        if name in ("--optlevel", "-O") and value is not None:
            out.append(f"-O{value}")
        elif value is not None and (takes_value or name.startswith("--")):
            out.append(f"{name}={value}")
        else:
            out.append(name)
    return tuple(out)


def split_target(flags: Iterable[str]) -> tuple[str | None, tuple[str, ...]]:
    """(the last --target, the canonical flags without Kiln-managed and wrapper-only ones).

    For flag lists written by other tools (a Neuron cache's compile_flags.json)."""
    target = None
    rest = []
    for flag in canonical_flags(flags):
        name, value = _split(flag)
        if name == "--target":
            target = value
        elif name not in KILN_MANAGED and name not in WRAPPER_ONLY:
            rest.append(flag)
    return target, tuple(rest)


def _option(flag: str) -> tuple[str, str | None]:
    if flag.startswith("-O") and not flag.startswith("--"):
        return "-O", flag[2:] or None
    return _split(flag)


def _choice(flag: str, value: str | None, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise NeuronFlagError(
            f"compiler flag {flag!r}: unknown {what} {value!r}; neuronx-cc accepts"
            f" {', '.join(allowed)}"
        )


def validate_flags(target: str, flags: Iterable[str]) -> tuple[str, ...]:
    """Check `flags` for `target` and return them canonical; NeuronFlagError names the flag.

    Catches before a compile what neuronx-cc would reject after minutes: an unknown target,
    `--lnc 2` where only trn2 groups cores (NCC_EARG001), unknown --model-type, --auto-cast
    or --auto-cast-type values, a bad -O level, and options Kiln sets itself."""
    if target not in NEURON_TARGETS:
        raise NeuronFlagError(
            f"unknown Neuron target {target!r}; neuronx-cc compiles for {', '.join(NEURON_TARGETS)}"
        )
    canonical = canonical_flags(flags)
    for flag in canonical:
        name, value = _option(flag)
        if name in KILN_MANAGED:
            raise NeuronFlagError(
                f"compiler flag {flag!r}: Kiln sets {name} itself (the target comes from the"
                " spec's targets); remove it from compiler_flags"
            )
        if name in WRAPPER_ONLY:
            raise NeuronFlagError(
                f"compiler flag {flag!r} is a torch-neuronx cache option, not a neuronx-cc"
                " flag; remove it"
            )
        if name == "--lnc":
            _choice(flag, value, LNC_VALUES, "LNC size")
            if value not in TARGETS[target].lnc_sizes:
                raise NeuronFlagError(
                    f"compiler flag {flag!r}: LNC {value} needs target"
                    f" {' or '.join(LNC_TARGETS)}; {target} supports only --lnc=1"
                    " (neuronx-cc would fail with NCC_EARG001)"
                )
        elif name == "--model-type":
            _choice(flag, value, MODEL_TYPES, "model type")
        elif name == "--auto-cast":
            _choice(flag, value, AUTO_CAST, "auto-cast mode")
        elif name == "--auto-cast-type":
            _choice(flag, value, AUTO_CAST_TYPES, "auto-cast type")
        elif name == "-O":
            _choice(flag, value, OPT_LEVELS, "optimization level")
    return canonical
