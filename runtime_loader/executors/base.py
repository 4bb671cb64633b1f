"""The interface every executable format implements (one module per format beside this one).

An :class:`Executor` is opened once per loaded model: it owns what the format needs for the
whole model (jaxlib's CPU device buffers, the Neuron runtime) and loads that model's
executables. Arguments are passed in the order of the graph signature's ``parameters`` (HLO
parameter order): host arrays, weights from :meth:`Executor.bind`, or outputs of an earlier
:meth:`Executable.run_on_device`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Executable(Protocol):
    """One compiled graph, loaded."""

    def run(self, args: Sequence[Any]) -> list[np.ndarray]:
        """Execute once; every output as a host array, in signature order."""
        ...

    def run_on_device(self, args: Sequence[Any]) -> list[Any]:
        """Execute once, outputs left where the executor keeps them (e.g. a KV cache fed to the
        next step); :meth:`Executor.to_host` reads one on the host."""
        ...

    def close(self) -> None: ...


class Executor(Protocol):
    """Everything one executable format needs to run a model's graphs."""

    format: str

    def load(self, executable: bytes) -> Executable:
        """Deserialize one executable; ValueError if these bytes are not one this runs."""
        ...

    def bind(self, array: np.ndarray) -> Any:
        """A weight placed once for every executable of this executor (buckets share it)."""
        ...

    def owns_copy(self, bound: Any) -> bool:
        """True when what :meth:`bind` returned no longer needs the host's array, so its
        resident pages may be given back (a mapped weight is re-read from its file if touched
        again)."""
        ...

    def to_host(self, value: Any) -> np.ndarray:
        """An output of ``run_on_device`` as a host array."""
        ...

    def close(self) -> None: ...
