"""The device guard every public launcher runs under.

A Triton launch goes to the CURRENT CUDA device and its current stream, whatever device its tensors
are on: a layer placed on cuda:1 (device_map="auto") called while cuda:0 is current would compile for
and launch on cuda:0's context, reading cuda:1's memory. The guard makes the inputs' device current
for the launch, and costs one device query when it already is (the decode case: every layer on the
current device), nothing for CPU tensors (the interpreter).
"""

from __future__ import annotations

import functools
import inspect

import torch


def on_device_of(name: str):
    """Decorator: runs the launcher with the CUDA device of its argument `name` (a tensor, or a
    torch.device) current, so that Triton compiles for, and launches on, that device and its
    current stream."""

    def decorate(launcher):
        index = list(inspect.signature(launcher).parameters).index(name)   # found once, not per call

        @functools.wraps(launcher)
        def guarded(*args, **kwargs):
            where = args[index] if index < len(args) else kwargs[name]
            device = where if isinstance(where, torch.device) else where.device
            if device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
                return launcher(*args, **kwargs)
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)

        return guarded

    return decorate
