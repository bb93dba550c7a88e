"""Tensor-parallel styles for LoRA layers, for torch.distributed.tensor.parallel.parallelize_module.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_kernels.nn.tensor_parallel import tensor_parallel_plan

    lora_kernels.patch_peft(model)                       # a PEFT LoRA model (or LoRALinear layers)
    mesh = init_device_mesh("cuda", (world_size,))
    parallelize_module(model, mesh, tensor_parallel_plan(model))

LoRAColwiseParallel and LoRARowwiseParallel are torch's ColwiseParallel and RowwiseParallel (same
arguments: input_layouts, output_layouts, use_local_output) extended to LoRALinear, MultiLoRALinear
and PEFT's lora.Linear (patched or not); a plain nn.Linear gets torch's own treatment. They
distribute a layer's parameters as the fused ops take them (lora_kernels.ops._tensor_parallel):
    colwise: weight, bias, lora_B sharded on out_features N; lora_A replicated; x Replicate -> y Shard(-1)
    rowwise: weight, lora_A sharded on in_features K; lora_B, bias replicated; x Shard(-1) -> y Replicate
             (one all-reduce, carrying the base output and the LoRA term together)
MultiLoRALinear's stacks follow (lora_a (L, R, K) on K rowwise, lora_b (L, N, R) on N colwise; its
scales and ranks become replicated DTensors, as distribute_module makes every other buffer), and
load_adapter / unload_adapter keep working (each rank writes its block). Parallelize after adding a
PEFT model's adapters: parameters created later are plain tensors. Rank 0's parameters are scattered
(src_data_rank, as torch's styles do). With use_local_output=True (the default) the next module sees
local shards, so N (colwise) and K (rowwise) must split evenly over the ranks, as for torch's own
styles on nn.Linear.
Importing this module imports torch.distributed.tensor (about 1 s): lora_kernels never does.
"""

from __future__ import annotations

import sys
from functools import partial

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from .lora_linear import LoRALinear
from .multi_lora_linear import MultiLoRALinear

_COLWISE = {"weight": Shard(0), "bias": Shard(0), "lora_a": Replicate(), "lora_b": Shard(0),
            "lora_b_bias": Shard(0), "stack_a": Replicate(), "stack_b": Shard(1)}
_ROWWISE = {"weight": Shard(1), "bias": Replicate(), "lora_a": Shard(1), "lora_b": Replicate(),
            "lora_b_bias": Replicate(), "stack_a": Shard(2), "stack_b": Replicate()}

LLAMA_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
LLAMA_ROWWISE = ("o_proj", "down_proj")


def _lora_tensors(layer: nn.Module) -> list[tuple[nn.Module, str, str]] | None:
    """(owner module, attribute name, role) of each tensor of a LoRA layer the styles distribute, or
    None when `layer` is no LoRA layer they know (a plain nn.Linear included)."""
    if isinstance(layer, LoRALinear):
        base = layer.base_layer
        return [(base, "weight", "weight"), (base, "bias", "bias"),
                (layer.lora_A, "weight", "lora_a"), (layer.lora_B, "weight", "lora_b")]
    if isinstance(layer, MultiLoRALinear):
        base = layer.base_layer
        return [(base, "weight", "weight"), (base, "bias", "bias"),
                (layer, "lora_a", "stack_a"), (layer, "lora_b", "stack_b")]
    if _is_peft_lora_layer(layer):
        from .peft import unfusable_reason

        reason = unfusable_reason(layer)
        if reason is not None:
            raise NotImplementedError(f"tensor parallelism of a PEFT LoRA layer: {reason} is not supported")
        base = layer.get_base_layer()
        tensors = [(base, "weight", "weight"), (base, "bias", "bias")]
        for name in layer.lora_A:
            tensors += [(layer.lora_A[name], "weight", "lora_a"), (layer.lora_B[name], "weight", "lora_b"),
                        (layer.lora_B[name], "bias", "lora_b_bias")]
        return tensors
    return None


def _is_peft_lora_layer(module: nn.Module) -> bool:
    peft_layer = getattr(sys.modules.get("peft.tuners.lora.layer"), "LoraLayer", None)   # None: PEFT not imported
    return peft_layer is not None and isinstance(module, peft_layer)


def _distribute(layer: nn.Module, placements: dict, src_data_rank: int | None, name: str, module: nn.Module,
                mesh) -> None:
    """distribute_module's partition_fn: called for the layer and each of its submodules; the layer
    distributes all its tensors at once (the first call), by role."""
    if module is not layer:
        return
    for owner, attribute, role in _lora_tensors(layer):
        tensor = getattr(owner, attribute, None)
        if tensor is None:
            continue
        shared = distribute_tensor(tensor.detach(), mesh, [placements[role]], src_data_rank=src_data_rank)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(attribute, nn.Parameter(shared, requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(attribute, shared)


class _LoRAStyle:
    """What both LoRA styles add to torch's: LoRA layers distributed by role."""

    _placements: dict

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if _lora_tensors(module) is None:
            return super()._apply(module, device_mesh)      # nn.Linear, nn.Embedding: torch's own
        if isinstance(self, RowwiseParallel):
            self.desired_input_layouts = (Shard(-1),)
        return distribute_module(
            module, device_mesh, partial(_distribute, module, self._placements, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class LoRAColwiseParallel(_LoRAStyle, ColwiseParallel):
    """torch's ColwiseParallel for LoRA layers too: weight, bias and lora_B sharded on N, lora_A
    replicated; y sharded on its last dim, with no communication."""

    _placements = _COLWISE


class LoRARowwiseParallel(_LoRAStyle, RowwiseParallel):
    """torch's RowwiseParallel for LoRA layers too: weight and lora_A sharded on K, lora_B and bias
    replicated; y Partial(sum), all-reduced to Replicate with the base output (output_layouts)."""

    _placements = _ROWWISE


def tensor_parallel_plan(model: nn.Module, colwise=LLAMA_COLWISE, rowwise=LLAMA_ROWWISE) -> dict[str, ParallelStyle]:
    """{qualified name: style} for parallelize_module: LoRAColwiseParallel for every module whose last
    name component is in `colwise`, LoRARowwiseParallel for `rowwise` (defaults: a Llama-style
    decoder's q/k/v/gate/up and o/down projections). The LoRA layer itself is planned, not the
    base_layer or lora_A / lora_B modules inside it."""
    plan: dict[str, ParallelStyle] = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        inside_lora = any(part in ("base_layer", "lora_A", "lora_B") for part in name.split("."))
        if inside_lora or leaf not in (*colwise, *rowwise):
            continue
        if not isinstance(module, (nn.Linear, LoRALinear, MultiLoRALinear)) and not _is_peft_lora_layer(module):
            continue
        if leaf in colwise:
            plan[name] = LoRAColwiseParallel()
        elif leaf in rowwise:
            plan[name] = LoRARowwiseParallel()
    return plan
