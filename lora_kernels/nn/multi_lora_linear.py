"""MultiLoRALinear: a frozen nn.Linear serving many adapters at once, one per row.

Adapters live in fixed slots of preallocated stacks (lora_a (L, R, K), lora_b (L, N, R), scales
(L,), ranks (L,) buffers): load_adapter / unload_adapter copy into a slot, never reallocate, so a
compiled or CUDA-graph-captured model keeps working across hot swaps. The rows' adapter ids are
given once per batch to the whole model with ``use_adapters``: every MultiLoRALinear under it reads
the same AdapterBatch.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch

import torch
from torch import nn

from .._dtensor import any_dtensor
from ..metadata import AdapterBatch
from .._checks import check_scale
from ..ops.multi_lora_linear import multi_lora_linear
from .lora_linear import fused_inputs

_current_batch: contextvars.ContextVar[AdapterBatch | None] = contextvars.ContextVar(
    "lora_kernels_adapter_batch", default=None)


@contextlib.contextmanager
def use_adapters(adapter_ids, num_adapters: int | None = None):
    """Within the block, every MultiLoRALinear runs row i through adapter slot adapter_ids[i]
    (-1: none; rows of an empty slot get the base output too). adapter_ids: (M,) ids over the
    rows of the layers' inputs flattened to (M, K), with num_adapters (the slots), or an AdapterBatch.

    >>> import torch, lora_kernels
    >>> layer = lora_kernels.MultiLoRALinear(torch.nn.Linear(8, 6), num_slots=2, max_rank=4)
    >>> layer.load_adapter(1, torch.randn(3, 8), torch.randn(6, 3), scale=2.0)
    >>> x = torch.randn(5, 8)
    >>> with lora_kernels.use_adapters(torch.tensor([1, -1, 0, 1, 1]), num_adapters=2):
    ...     y = layer(x)
    >>> torch.equal(y[1], layer.base_layer(x)[1]), torch.equal(y[2], layer.base_layer(x)[2])
    (True, True)
    """
    if isinstance(adapter_ids, AdapterBatch):
        batch = adapter_ids
    else:
        if num_adapters is None:
            raise ValueError("use_adapters(adapter_ids, num_adapters): give the number of adapter slots "
                             "with raw ids (or pass an AdapterBatch)")
        batch = AdapterBatch(adapter_ids, num_adapters)
    token = _current_batch.set(batch)
    try:
        yield batch
    finally:
        _current_batch.reset(token)


class MultiLoRALinear(nn.Module):
    """y[i] = base_layer(x)[i] + scales[j] · (x[i] A[j]ᵀ) B[j]ᵀ, j the slot of row i (use_adapters).
    Slots hold adapters of rank <= max_rank; each slot's true rank is kept, so a rank-8 adapter
    in a max_rank-64 stack costs rank 8. Inference and training (the slot stacks are buffers; make
    them Parameters yourself, or train with lora_linear, to learn adapters)."""

    def __init__(self, base_layer: nn.Linear, num_slots: int, max_rank: int):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots and max_rank must be >= 1, got {num_slots}, {max_rank}")
        self.base_layer = base_layer
        self.num_slots, self.max_rank = num_slots, max_rank
        n, k = base_layer.out_features, base_layer.in_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, k, **factory))      # (L, R, K)
        self.register_buffer("lora_b", torch.zeros(num_slots, n, max_rank, **factory))      # (L, N, R)
        self.register_buffer("scales", torch.zeros(num_slots, device=factory["device"]))    # (L,) fp32
        self.register_buffer("ranks", torch.zeros(num_slots, dtype=torch.int32, device=factory["device"]))

    @torch.no_grad()
    def load_adapter(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Copies an adapter (lora_a (r, K), lora_b (N, r), PEFT layout) into `slot`, in place."""
        self._check_slot(slot)
        n, k = self.base_layer.out_features, self.base_layer.in_features
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[1] != k or lora_b.shape[0] != n \
                or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"load_adapter: lora_a must be (r, K={k}) and lora_b (N={n}, r), got "
                             f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        scale = check_scale(scale)   # finite, within float32: the scales on a GPU are not checked per call
        rank = lora_a.shape[0]
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"load_adapter: rank {rank} does not fit this layer's slots (max_rank={self.max_rank})")
        stack_a, lora_a = _local_block(self.lora_a, lora_a)
        stack_b, lora_b = _local_block(self.lora_b, lora_b)
        stack_a[slot].zero_()
        stack_b[slot].zero_()
        stack_a[slot, :rank].copy_(lora_a)
        stack_b[slot, :, :rank].copy_(lora_b)
        self.scales[slot] = scale
        self.ranks[slot] = rank

    @torch.no_grad()
    def unload_adapter(self, slot: int) -> None:
        """Empties `slot`: its rows get the base output until an adapter is loaded there again."""
        self._check_slot(slot)
        _local_block(self.lora_a)[0][slot].zero_()
        _local_block(self.lora_b)[0][slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0

    def _check_slot(self, slot) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot must be an int in [0, {self.num_slots}), got {slot!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = _current_batch.get()
        if batch is None:
            raise RuntimeError("MultiLoRALinear needs the rows' adapter ids: call the model inside "
                               "`with lora_kernels.use_adapters(adapter_ids, num_adapters):`")
        base = self.base_layer
        with fused_inputs(x, base.weight, base.bias, self.lora_a, self.lora_b) as (x, weight, bias, a, b):
            return multi_lora_linear(x, weight, bias, a, b, self.scales, batch.with_ranks(self.ranks))

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .cuda(): the scales move but stay fp32 (a bf16 scale would round
        every adapter's scale by up to 2**-9)."""
        scales = self.scales
        super()._apply(fn, recurse)
        self.scales = scales.to(device=self.scales.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"num_slots={self.num_slots}, max_rank={self.max_rank}"


def _local_block(stack: torch.Tensor, factor: torch.Tensor | None = None):
    """(this rank's block of stack, of factor): the stacks of a tensor-parallel layer are DTensors
    (lora_kernels.nn.tensor_parallel); each rank writes the block it holds, of the whole factor every
    rank was given (lora_a (r, K) or lora_b (N, r): the stack's placements, one dim fewer), with no
    communication. A plain stack: (stack, factor) as given."""
    if not any_dtensor(stack):
        return stack, factor
    if factor is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        placements = [Shard(p.dim - 1) if p.is_shard() else p for p in stack.placements]
        factor = distribute_tensor(factor.to(stack.device), stack.device_mesh, placements, src_data_rank=None).to_local()
    return stack.to_local(), factor


def wrap_multi_lora(model: nn.Module, patterns, num_slots: int, max_rank: int) -> list[str]:
    """Replaces, in place, every nn.Linear of `model` whose qualified name matches one of the glob
    `patterns` (e.g. "*.q_proj", "*attn*") with a MultiLoRALinear around it; returns their names."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoRALinear(getattr(parent, child), num_slots, max_rank))
    return names
