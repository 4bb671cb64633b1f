"""One error root: every package's errors subclass KilnError, live in that package's errors
module, and reach the user as one `kiln: error:` line; a size mismatch is not a KeyError."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import artifacts.errors
import pipeline.errors
import runtime_loader.errors
from artifacts.errors import (
    ArtifactError,
    KilnError,
    ReferenceNotFound,
    SizeMismatch,
)
from artifacts.manifest import BlobRef
from artifacts.store import Store
from kiln.cli import main, user_error_message
from pipeline.errors import PipelineError
from runtime_loader.errors import LoaderError
from tests.conftest import build_release

MOVED = {
    "ShardError": pipeline.errors,
    "NeuronFlagError": pipeline.errors,
    "NeuronCacheError": pipeline.errors,
    "MemoryEstimateError": pipeline.errors,
    "NeffError": artifacts.errors,
    "IndexLocked": artifacts.errors,
}


@pytest.mark.parametrize("root", [ArtifactError, PipelineError, LoaderError])
def test_each_package_root_is_a_kiln_error(root: type[Exception]) -> None:
    assert issubclass(root, KilnError)


@pytest.mark.parametrize("module", [artifacts.errors, pipeline.errors, runtime_loader.errors])
def test_every_error_class_of_a_package_is_under_the_one_root(module: object) -> None:
    classes = [
        v for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Exception) and v.__module__ == module.__name__
    ]
    assert classes
    assert all(issubclass(c, KilnError) for c in classes)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_error_classes_live_in_their_packages_errors_module(name: str) -> None:
    cls = getattr(MOVED[name], name)
    assert cls.__module__ == MOVED[name].__name__
    assert issubclass(cls, KilnError)


def test_cli_prints_any_kiln_error_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    class Unlisted(KilnError):
        """An error class from a module the CLI has never heard of."""

    assert user_error_message(Unlisted("the thing at fault")) == "the thing at fault"
    assert user_error_message(ValueError("a bug")) is None


def test_size_mismatch_on_put_release_is_typed_and_worded_as_before(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "store"))
    release = build_release(store)
    graph = release.graphs[0]
    wrong = BlobRef(graph.executable.digest, graph.executable.size + 1)
    bad = replace(release, graphs=(replace(graph, executable=wrong), *release.graphs[1:]))
    with pytest.raises(SizeMismatch) as caught:
        store.put_release(bad)
    assert not isinstance(caught.value, (KeyError, ReferenceNotFound))
    message = user_error_message(caught.value)
    assert message == (
        f"release m: executable blob {graph.executable.digest} has size"
        f" {graph.executable.size}, manifest says {graph.executable.size + 1}"
    )


def test_kiln_help_imports_no_sqlalchemy_and_a_missing_ref_exits_1(tmp_path: Path) -> None:
    probe = (
        "import sys\nfrom kiln.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('sqlalchemy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False"
    with pytest.raises(SystemExit) as exited:
        main(["--store", str(tmp_path / "empty"), "show", "nothing:here"])
    assert exited.value.code == 1
