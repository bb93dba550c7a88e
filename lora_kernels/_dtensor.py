"""Recognising DTensors (torch.distributed.tensor) without importing them: below every layer that meets them."""

from __future__ import annotations

import sys

import torch


def dtensor_class() -> type | None:
    """DTensor, or None while torch.distributed.tensor is not imported (then no tensor is one): the
    check costs a dict lookup, not an import (about 1 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def any_dtensor(*tensors) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def replicated_local(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """t's local tensor when t is a DTensor replicated on every mesh dim (indices, ranks, scales: the
    same on every rank), t itself when plain; any other placement raises."""
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} is a DTensor with placements {t.placements}: it must be replicated "
                         "(the same on every rank), or a plain tensor")
    return t.to_local()
