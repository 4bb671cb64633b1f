"""Kiln's deploy side: load a compiled release and run it. Light by design: importing this
package imports no torch, transformers, jax or boto3."""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def load(ref: str, **kwargs: Any) -> Any:
    """See runtime_loader.api.load."""
    from runtime_loader.api import load as _load  # noqa: PLC0415 - numpy: not for `kiln --help`

    return _load(ref, **kwargs)
