"""The ops on DTensors (torch.distributed.tensor): tensor parallelism.

A call with a DTensor among its tensors takes the registered op, whose sharding rules (registered
here on the first such call) let DTensor's dispatcher run the op's backend on each rank's shards and
label the results. Before that, the public function calls one of the `*_args` functions below: the
frozen weight's placement on each mesh dim (or, for add_multi_lora_, the output's) decides the
layout, and every other input is redistributed to it; the weight never moves. Per mesh dim:

    weight          x            lora_a           lora_b        bias       -> y          (forward)
    Replicate       Replicate*   Replicate        Replicate     Replicate     Replicate
    Shard(0) colwise Replicate   Replicate        Shard(0) on N Shard(0)      Shard(-1), no communication
    Shard(1) rowwise Shard(-1)   Shard(1) on K    Replicate     Replicate     Partial(sum)

* the single-adapter op keeps x sharded on its rows (sequence / data parallel) -> y sharded on rows.
Multi-adapter stacks: lora_a (L, R, K) Shard(2) rowwise, lora_b (L, N, R) Shard(1) colwise; scales
and the AdapterBatch's tensors are replicated (indices are per row, not per shard).
Colwise needs no communication; rowwise's y is Partial(sum): the all-reduce the base layer needs
anyway carries the LoRA term too. The bias enters rowwise as Replicate -> Partial (DTensor divides it
by the mesh size, as for its own addmm). Gradients: colwise dX, dA Partial, dB Shard(0); rowwise
dX, dA Shard(-1), dB Partial.
Not built: S-LoRA's rank-sharded lora_a (colwise A sharded on r, T all-gathered). It saves each rank
(p-1)/p of the shrink GEMM, r/N_local of the layer's flops (r = 16, N = 4096, p = 2: 0.8 %), at the
price of an all-gather of T per layer and call; we cannot measure NCCL here. A lora_a given sharded on
its rank is all-gathered to Replicate.
Dropout: ranks holding the same block of x (the same rows and columns) draw the same mask: the seed
is torch's (the same on every rank only if each rank seeded torch alike, as tensor parallelism
requires anyway), plus the index of the rank's block of x, so the blocks' masks are independent.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from ..metadata import AdapterBatch, BatchTensors

_rules_registered = False


def dtensor_class() -> type | None:
    """DTensor, or None while torch.distributed.tensor is not imported (then no tensor is one): the
    check costs a dict lookup, not an import (about 1 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def any_dtensor(*tensors) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def replicated_local(t: Tensor, name: str) -> Tensor:
    """t's local tensor when t is a DTensor replicated on every mesh dim (indices such as adapter ids
    are per row, the same on every rank), t itself when plain; any other placement raises."""
    dtensor = dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} is a DTensor with placements {t.placements}: it must be replicated "
                         "(the same on every rank), or a plain tensor")
    return t.to_local()


def lora_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                     scale: float, dropout_p: float, seed: Tensor | None, seed_bound: int) -> tuple:
    """lora_linear_op's arguments with every tensor a DTensor laid out for weight's placement (see the
    module docstring); x (M, K), seed 0-d int64 in [0, seed_bound) (per rank: + the index of its block
    of x, modulo seed_bound) or None."""
    mesh, layouts = _layouts("lora_linear", weight, {"x": x, "bias": bias, "lora_a": lora_a, "lora_b": lora_b},
                             rows_may_shard=True)
    x = _laid_out("x", x, mesh, [lay.x for lay in layouts])
    bias = _laid_out("bias", bias, mesh, [lay.vector for lay in layouts])
    lora_a = _laid_out("lora_a", lora_a, mesh, [lay.lora_a for lay in layouts])
    lora_b = _laid_out("lora_b", lora_b, mesh, [lay.lora_b for lay in layouts])
    if seed is not None:
        seed = _replicated(_seed_of_block(seed, x, seed_bound), mesh)
    _register_rules()
    return x, weight, bias, lora_a, lora_b, scale, dropout_p, seed


def multi_lora_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                           scales: Tensor, batch: AdapterBatch) -> tuple:
    """multi_lora_linear_op's leading arguments (x, weight, bias, lora_a, lora_b, scales, *batch.tensors())
    laid out for weight's placement: lora_a (L, R, K), lora_b (L, N, R); scales and the batch's
    tensors replicated (row_tile, an int, passes through)."""
    mesh, layouts = _layouts("multi_lora_linear", weight,
                             {"x": x, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "scales": scales})
    x = _laid_out("x", x, mesh, [lay.x for lay in layouts])
    bias = _laid_out("bias", bias, mesh, [lay.vector for lay in layouts])
    lora_a = _laid_out("lora_a", lora_a, mesh, [lay.stacked_a for lay in layouts])
    lora_b = _laid_out("lora_b", lora_b, mesh, [lay.stacked_b for lay in layouts])
    scales, batch = _replicated_all(mesh, scales, batch)
    _register_rules()
    return (x, weight, bias, lora_a, lora_b, scales, *batch)


def add_multi_lora_args(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                        batch: AdapterBatch) -> tuple:
    """add_multi_lora_op's arguments laid out for out's placement (out, updated in place, cannot
    move): Shard(-1) -> colwise, Partial -> rowwise (add before the all-reduce), Replicate."""
    dtensor = dtensor_class()
    if not isinstance(out, dtensor):
        raise ValueError("add_multi_lora_: out is a plain tensor but x or the adapter stacks are DTensors: "
                         "out must be a DTensor too (the base output, sharded as the layer's weight)")
    from torch.distributed.tensor import Partial

    mesh, layouts = out.device_mesh, []
    for dim, placement in enumerate(out.placements):
        style = ("replicate" if placement.is_replicate() else "colwise" if placement.is_shard(out.dim() - 1)
                 else "rowwise" if isinstance(placement, Partial) and placement.reduce_op == "sum" else None)
        if style is None:
            raise ValueError(f"add_multi_lora_: out has placement {placement} on mesh dim {dim}: supported are "
                             "Replicate, Shard(-1) (colwise) and Partial(sum) (rowwise, before the all-reduce)")
        layouts.append(_Layout(style))
    x = _laid_out("x", x, mesh, [lay.x for lay in layouts])
    lora_a = _laid_out("lora_a", lora_a, mesh, [lay.stacked_a for lay in layouts])
    lora_b = _laid_out("lora_b", lora_b, mesh, [lay.stacked_b for lay in layouts])
    scales, batch = _replicated_all(mesh, scales, batch)
    _register_rules()
    return (out, x, lora_a, lora_b, scales, *batch)


# ---- layouts ------------------------------------------------------------------------------------

class _Layout:
    """The placements of one mesh dim's style for each input; x's may keep a rows shard (rows_may_shard)."""

    def __init__(self, style: str, x_rows_sharded: bool = False):
        from torch.distributed.tensor import Replicate, Shard

        replicate = Replicate()
        self.style = style
        self.x = {"colwise": replicate, "rowwise": Shard(1),
                  "replicate": Shard(0) if x_rows_sharded else replicate}[style]
        self.lora_a = Shard(1) if style == "rowwise" else replicate             # (r, K)
        self.lora_b = Shard(0) if style == "colwise" else replicate             # (N, r)
        self.vector = Shard(0) if style == "colwise" else replicate             # bias (N,)
        self.stacked_a = Shard(2) if style == "rowwise" else replicate          # (L, R, K)
        self.stacked_b = Shard(1) if style == "colwise" else replicate          # (L, N, R)


def _layouts(op: str, weight: Tensor, others: dict, rows_may_shard: bool = False) -> tuple:
    """(mesh, one _Layout per mesh dim) from weight's placements; the other DTensors must share its mesh."""
    dtensor = dtensor_class()
    if not isinstance(weight, dtensor):
        given = [name for name, t in others.items() if isinstance(t, dtensor)]
        raise ValueError(f"{op}: {', '.join(given)} {'is a DTensor' if len(given) == 1 else 'are DTensors'} but "
                         "weight is a plain tensor: under tensor parallelism the frozen weight is a DTensor too "
                         "(lora_kernels.nn.tensor_parallel's styles distribute a layer's parameters)")
    mesh = weight.device_mesh
    for name, t in others.items():
        if isinstance(t, dtensor) and t.device_mesh != mesh:
            raise ValueError(f"{op}: {name} is on device mesh {t.device_mesh} but weight on {mesh}: one mesh")
    layouts = []
    for dim, placement in enumerate(weight.placements):
        if placement.is_replicate():
            x = others["x"]
            rows = (rows_may_shard and isinstance(x, dtensor) and x.device_mesh == mesh
                    and x.placements[dim].is_shard(0))
            layouts.append(_Layout("replicate", x_rows_sharded=rows))
        elif placement.is_shard(0):
            layouts.append(_Layout("colwise"))
        elif placement.is_shard(1):
            layouts.append(_Layout("rowwise"))
        else:
            raise ValueError(f"{op}: weight has placement {placement} on mesh dim {dim}: supported are Replicate, "
                             "Shard(0) (colwise: sharded on out_features N) and Shard(1) (rowwise: on in_features K)")
    return mesh, layouts


def _laid_out(name: str, t: Tensor | None, mesh, placements: list) -> Tensor | None:
    """t as a DTensor on mesh with `placements` (a differentiable redistribute when it differs). A plain
    tensor among DTensors is ambiguous (the whole tensor, or this rank's shard?): ValueError."""
    if t is None:
        return None
    if not isinstance(t, dtensor_class()):
        raise ValueError(f"{name} ({tuple(t.shape)}) is a plain tensor but weight is a DTensor: pass {name} as a "
                         f"DTensor (e.g. DTensor.from_local(local, mesh, placements) or distribute_tensor); expected "
                         f"placements {tuple(placements)}")
    return t if tuple(t.placements) == tuple(placements) else t.redistribute(mesh, placements)


def _replicated(t: Tensor, mesh) -> Tensor:
    """A plain tensor that every rank holds whole, as a replicated DTensor (no communication)."""
    from torch.distributed.tensor import Replicate

    return dtensor_class().from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _replicated_all(mesh, scales: Tensor, batch: AdapterBatch) -> tuple:
    """(scales, batch.tensors()) with every tensor a replicated DTensor; ints and None pass through.
    The batch's tensors are converted once per batch and mesh (batch.replicated, outside a compile
    trace: a traced conversion holds fake tensors), its ranks (one layer's: with_ranks) per call."""
    from torch.distributed.tensor import Replicate

    dtensor, replicate = dtensor_class(), [Replicate()] * mesh.ndim

    def replicated(t):
        if not isinstance(t, Tensor):
            return t
        if isinstance(t, dtensor):
            return t if all(p.is_replicate() for p in t.placements) else t.redistribute(mesh, replicate)
        return dtensor.from_local(t, mesh, replicate, run_check=False)

    tensors = batch.tensors()
    converted = None if torch.compiler.is_compiling() else batch.replicated.get(mesh)
    if converted is None:
        converted = BatchTensors(*map(replicated, tensors._replace(ranks=None)))
        if not torch.compiler.is_compiling():
            batch.replicated[mesh] = converted
    return replicated(scales), converted._replace(ranks=replicated(tensors.ranks))


def _seed_of_block(seed: Tensor, x: Tensor, seed_bound: int) -> Tensor:
    """seed + the index of this rank's block of x among the blocks x is cut into (0 where x is
    replicated): ranks holding the same block draw the same mask, other blocks independent ones."""
    mesh, index = x.device_mesh, 0
    coordinate = mesh.get_coordinate()
    for dim, placement in enumerate(x.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coordinate[dim]
    return seed if index == 0 else (seed + index) % seed_bound


# ---- sharding rules -----------------------------------------------------------------------------

def _register_rules() -> None:
    """Registers every op's sharding rules with DTensor, once (a module flag, not functools.cache:
    torch.compile traces the flag as a constant after the first call). Each rule lists, per style, the
    placements of (outputs, inputs) on one mesh dim; DTensor expands them to the mesh."""
    global _rules_registered
    if _rules_registered:
        return
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    ops = torch.ops.lora_kernels
    replicate, partial = Replicate(), Partial()

    def given(t, placement):   # None for an absent optional tensor
        return None if t is None else placement

    def asked(need, placement):   # a gradient not asked for comes back as an empty (0,) tensor
        return placement if need else replicate

    @register_sharding(ops.lora_linear.default)
    def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
        # (y (M, N), T (M, r)), then x (M, K), weight (N, K), bias (N,), lora_a (r, K), lora_b (N, r), ..., seed
        def rule(y_t, x_, w, b, a, b_lora):
            return y_t, [x_, w, given(bias, b), a, b_lora, None, None, given(seed, replicate)]

        return [rule([replicate, replicate], replicate, replicate, replicate, replicate, replicate),
                rule([Shard(0), Shard(0)], Shard(0), replicate, replicate, replicate, replicate),     # rows
                rule([Shard(1), replicate], replicate, Shard(0), Shard(0), replicate, Shard(0)),      # colwise
                rule([partial, partial], Shard(1), Shard(1), partial, Shard(1), replicate)]           # rowwise

    @register_sharding(ops.lora_linear_backward.default)
    def _(grad_y, x, weight, lora_a, lora_b, lora_hidden, scale, dropout_p, seed, need_x, need_a, need_b, backend):
        # (dX (M, K), dA (r, K), dB (N, r)), then grad_y (M, N), x, weight, lora_a, lora_b, T (M, r), ..., seed
        def rule(dx, da, db, g, x_, w, a, b, t):
            return ([asked(need_x, dx), asked(need_a, da), asked(need_b, db)],
                    [g, given(x, x_), given(weight, w), given(lora_a, a), given(lora_b, b), given(lora_hidden, t),
                     None, None, given(seed, replicate), None, None, None, None])

        r = replicate
        return [rule(r, r, r, r, r, r, r, r, r),
                rule(Shard(0), partial, partial, Shard(0), Shard(0), r, r, r, Shard(0)),                  # rows
                rule(partial, partial, Shard(0), Shard(1), r, Shard(0), r, Shard(0), r),                  # colwise
                rule(Shard(1), Shard(1), partial, r, Shard(1), Shard(1), Shard(1), r, partial)]           # rowwise

    def batch_placements(batch):   # the AdapterBatch's tensors replicated, its row tile (an int) not a tensor
        return [given(t, replicate) if not isinstance(t, int) else None for t in batch]

    @register_sharding(ops.multi_lora_linear.default)
    def _(x, weight, bias, lora_a, lora_b, scales, *batch_and_need_hidden):
        # (y (M, N), T (M, R)), then x (M, K), weight (N, K), bias (N,), lora_a (L, R, K), lora_b (L, N, R), scales
        def rule(y_t, x_, w, b, a, b_lora):
            return y_t, [x_, w, given(bias, b), a, b_lora, replicate,
                         *batch_placements(batch_and_need_hidden[:-1]), None]

        r = replicate
        return [rule([r, r], r, r, r, r, r),
                rule([Shard(1), r], r, Shard(0), Shard(0), r, Shard(1)),                             # colwise
                rule([partial, partial], Shard(1), Shard(1), partial, Shard(2), r)]                   # rowwise

    @register_sharding(ops.multi_lora_linear_backward.default)
    def _(grad_y, x, weight, lora_a, lora_b, lora_hidden, scales, *batch_and_flags):
        # (dX (M, K), dA (L, R, K), dB (L, N, R)), then grad_y, x, weight, lora_a, lora_b, T (M, R), scales, batch
        need_x, need_a, need_b, _backend = batch_and_flags[-4:]

        def rule(dx, da, db, g, x_, w, a, b, t):
            return ([asked(need_x, dx), asked(need_a, da), asked(need_b, db)],
                    [g, given(x, x_), w, a, b, given(lora_hidden, t), replicate,
                     *batch_placements(batch_and_flags[:-4]), None, None, None, None])

        r = replicate
        return [rule(r, r, r, r, r, r, r, r, r),
                rule(partial, partial, Shard(1), Shard(1), r, Shard(0), r, Shard(1), r),                  # colwise
                rule(Shard(1), Shard(2), partial, r, Shard(1), Shard(1), Shard(2), r, partial)]           # rowwise

    @register_sharding(ops.add_multi_lora_.default)
    def _(out, x, lora_a, lora_b, scales, *batch):
        # no outputs (out is updated in place); out (M, N), x (M, K), lora_a (L, R, K), lora_b (L, N, R), scales
        def rule(o, x_, a, b):
            return [], [o, x_, a, b, replicate, *batch_placements(batch)]

        r = replicate
        return [rule(r, r, r, r),
                rule(Shard(1), r, r, Shard(1)),                                                     # colwise
                rule(partial, Shard(1), Shard(2), r)]                                               # rowwise

    _rules_registered = True
