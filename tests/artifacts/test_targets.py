"""The one target table: every target in it is accepted by the spec, the CLI choices, the
compiler choice, the flag checker and the NEFF header check, each as the table says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
import pytest

from artifacts.manifest import BlobRef
from artifacts.neff import neff_blob_check
from artifacts.store import Store
from artifacts.targets import LNC_TARGETS, NEFF_FORMAT, NEURON_TARGETS, NEURONX_CC, TARGETS
from pipeline.cli import BACKEND_CHOICES, import_neuron_cache_command
from pipeline.compile import backend_for_target
from pipeline.errors import NeuronFlagError, PipelineError
from pipeline.neuron_flags import validate_flags
from pipeline.spec import parse_spec
from tests.conftest import build_release

ALL = sorted(TARGETS)


def _choices(command: click.Command, name: str) -> tuple[str, ...]:
    (param,) = [p for p in command.params if p.name == name]
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_the_table_has_the_cpu_and_every_neuron_target() -> None:
    assert set(TARGETS) == {"cpu", "inf2", "trn1", "trn1n", "trn2"}
    assert LNC_TARGETS == ("trn2",)


@pytest.mark.parametrize("target", ALL)
def test_spec_accepts_every_target(target: str) -> None:
    spec = parse_spec(
        {
            "models": [
                {
                    "name": "m",
                    "source": {"config": {"model_type": "bert"}},
                    "buckets": {"seq": 16},
                    "targets": [target],
                    "compiler_flags": {target: []},
                }
            ]
        },
        "spec.yaml",
        Path("."),
    )
    assert spec.models[0].targets == (target,)


def test_spec_rejects_a_target_outside_the_table() -> None:
    with pytest.raises(PipelineError, match=r"models\[0\]\.targets\[0\]: unknown target 'trn9'"):
        parse_spec(
            {"models": [{"name": "m", "source": {"config": {"model_type": "bert"}},
                         "buckets": {"seq": 16}, "targets": ["trn9"]}]},
            "spec.yaml",
            Path("."),
        )


@pytest.mark.parametrize("target", ALL)
def test_cli_choices_and_compiler_follow_the_table(target: str) -> None:
    entry = TARGETS[target]
    assert backend_for_target(target) == entry.compiler
    assert entry.compiler in BACKEND_CHOICES.choices
    in_neuron_choice = target in _choices(import_neuron_cache_command, "default_target")
    assert in_neuron_choice == (entry.compiler == NEURONX_CC)


@pytest.mark.parametrize("target", NEURON_TARGETS)
def test_flag_checker_accepts_every_neuron_target_and_its_lnc_sizes(target: str) -> None:
    assert validate_flags(target, ["--model-type", "transformer"]) == ("--model-type=transformer",)
    for size in TARGETS[target].lnc_sizes:
        assert validate_flags(target, [f"--lnc={size}"]) == (f"--lnc={size}",)
    if "2" not in TARGETS[target].lnc_sizes:
        with pytest.raises(NeuronFlagError, match="NCC_EARG001"):
            validate_flags(target, ["--lnc=2"])


@pytest.mark.parametrize("target", ALL)
def test_neff_header_check_covers_exactly_the_neff_targets(tmp_path: Path, target: str) -> None:
    """A release's executable that is not a NEFF is reported by `kiln verify`'s NEFF check
    for every target whose format is neff, and left alone for the others."""
    entry = TARGETS[target]
    with Store.open(str(tmp_path / "store")) as store:
        release = build_release(store)
        graph = release.graphs[0]
        put = store.put_bytes(f"not a neff for {target}".encode() * 100)
        exe = BlobRef(put.digest, put.size)
        graphs = (replace(graph, executable=exe, format=entry.executable_format),)
        store.put_release(replace(release, target=target, graphs=graphs))
        problem = neff_blob_check(store, exe.digest, "executable")
    if entry.executable_format == NEFF_FORMAT:
        assert problem is not None and problem.startswith("bad NEFF header: ")
    else:
        assert problem is None
