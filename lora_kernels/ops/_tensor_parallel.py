"""The ops on DTensors (torch.distributed.tensor): tensor parallelism.

A public op called with DTensors runs on each rank's shards: the `*_args` functions below lay the
inputs out, hand the op (any of its routes: eager, registered, compiled) this rank's local tensors,
and label the output (DTensor.from_local). The frozen weight's placement on each mesh dim (for
add_multi_lora_, the output's) decides the layout; every other input is redistributed to it, and the
weight never moves. Per mesh dim:

    style      weight     x           lora_a        lora_b        bias        -> y
    replicate  Replicate  Replicate   Replicate     Replicate     Replicate      Replicate
    rows       Replicate  Shard(0)    Replicate     Replicate     Replicate      Shard(0)     (single-adapter op)
    colwise    Shard(0)   Replicate   Replicate     Shard(0) on N Shard(0)       Shard(-1): no communication
    rowwise    Shard(1)   Shard(-1)   Shard(1) on K Replicate     Replicate/n    Partial(sum)

rows: x already split on its rows (sequence or data parallel) with the weight replicated. Multi-adapter
stacks follow: lora_a (L, R, K) Shard(2) rowwise, lora_b (L, N, R) Shard(1) colwise; the scales and
the AdapterBatch are replicated (its indices are per row, not per shard). Rowwise, y is a partial sum:
the all-reduce the base layer needs anyway carries the LoRA term too; the bias enters divided by the
group size n on every rank (as DTensor's own addmm does: exact for n a power of 2).
The backward runs in the forward's layout by construction (autograd through the local op; the inputs'
gradients labelled by to_local(grad_placements)): colwise dX, dA Partial, dB Shard(0); rowwise dX,
dA Shard(-1), dB Partial. Registering DTensor sharding rules instead (register_sharding) lets DTensor
pick each op's layout by redistribution cost, and between layouts of equal cost (Replicate -> Shard is
free) it can run the backward in another layout than the forward: a different dropout mask, silently.
Not built: S-LoRA's lora_a split on its rank (colwise A sharded on r, T all-gathered). It would save
each rank (p-1)/p of the shrink GEMM, r/N_local of the layer's flops (r = 16, N = 4096, p = 2: 0.8 %)
for an all-gather of T per layer and call; we cannot measure NCCL here. A lora_a given split on its
rank is gathered.
Dropout: the seed is torch's (every rank seeded alike, checked at the first dropout call on a mesh),
plus the index of the rank's block of x, so ranks holding the same block draw the same mask and the
blocks of a split x independent ones (a mask that differs from a single process's run, with the same
distribution). The ranks must agree on dropout (train / eval) as on everything else.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .._dtensor import dtensor_class, replicated_local
from ..metadata import AdapterBatch

_meshes_with_agreed_seeds: set = set()   # meshes whose ranks were checked to draw the same dropout seeds


def lora_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                     scale: float, dropout_p: float, seed: Tensor | None,
                     seed_bound: int) -> tuple[tuple, Callable[[Tensor], Tensor]]:
    """(lora_linear_op's arguments as this rank's local tensors, the function labelling its y).
    x (M, K) and the others as the public op takes them, some DTensors; seed 0-d int64 in
    [0, seed_bound) or None: this rank's is seed + the index of its block of x, modulo seed_bound."""
    mesh, styles = _styles("lora_linear", weight, {"x": x, "bias": bias, "lora_a": lora_a, "lora_b": lora_b},
                           rows_may_shard=True)
    x, bias, lora_a, lora_b = _laid_out_layer(mesh, styles, x, bias, lora_a, lora_b)
    if seed is not None:
        _check_seeds_agree(seed, mesh)
        seed = _seed_of_block(seed, x, seed_bound)
    local = (*_local_layer(styles, x, weight, bias, lora_a, lora_b), scale, dropout_p, seed)
    return local, _labeller(mesh, styles, (x.shape[0], weight.shape[0]))


def multi_lora_linear_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                           scales: Tensor, batch: AdapterBatch) -> tuple[tuple, Callable[[Tensor], Tensor]]:
    """((x, weight, bias, lora_a, lora_b, scales, *batch.tensors()) as this rank's local tensors, the
    function labelling its y): lora_a (L, R, K), lora_b (L, N, R); scales and the batch replicated."""
    mesh, styles = _styles("multi_lora_linear", weight,
                           {"x": x, "bias": bias, "lora_a": lora_a, "lora_b": lora_b, "scales": scales}, stacked=True)
    x, bias, lora_a, lora_b = _laid_out_layer(mesh, styles, x, bias, lora_a, lora_b)
    local = (*_local_layer(styles, x, weight, bias, lora_a, lora_b), replicated_local(scales, "scales"),
             *batch.tensors())
    return local, _labeller(mesh, styles, (x.shape[0], weight.shape[0]))


def add_multi_lora_args(out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scales: Tensor,
                        batch: AdapterBatch) -> tuple:
    """add_multi_lora_op's arguments as this rank's local tensors, laid out for out's placement (out,
    updated in place, cannot move): Shard(-1) colwise, Partial rowwise (before the all-reduce), Replicate."""
    dtensor = dtensor_class()
    if not isinstance(out, dtensor):
        raise ValueError("add_multi_lora_: out is a plain tensor but x or the adapter stacks are DTensors: "
                         "out must be a DTensor too (the base output, laid out as the layer's weight makes it)")
    mesh, styles = out.device_mesh, []
    for dim, placement in enumerate(out.placements):
        style = ("replicate" if placement.is_replicate() else "colwise" if placement.is_shard(out.dim() - 1)
                 else "rowwise" if placement.is_partial("sum") else None)
        if style is None:
            raise ValueError(f"add_multi_lora_: out has placement {placement} on mesh dim {dim}: supported are "
                             "Replicate, Shard(-1) (colwise) and Partial(sum) (rowwise, before the all-reduce)")
        styles.append(_Style(style, stacked=True))
    x, _, lora_a, lora_b = _laid_out_layer(mesh, styles, x, None, lora_a, lora_b)
    return (out.to_local(), x.to_local(), lora_a.to_local(), lora_b.to_local(), replicated_local(scales, "scales"),
            *batch.tensors())


# ---- layouts ------------------------------------------------------------------------------------

class _Style:
    """One mesh dim's placements of each input, and of the gradients the local op computes.
    stacked: the multi-adapter stacks lora_a (L, R, K), lora_b (L, N, R), one dim more than (r, K), (N, r)."""

    def __init__(self, style: str, stacked: bool = False):
        from torch.distributed.tensor import Partial, Replicate, Shard

        r, partial, colwise, rowwise, rows = Replicate(), Partial(), style == "colwise", style == "rowwise", style == "rows"
        self.style = style
        self.x = Shard(1) if rowwise else Shard(0) if rows else r                 # (M, K)
        self.weight = Shard(0) if colwise else Shard(1) if rowwise else r        # (N, K)
        self.vector = Shard(0) if colwise else r                                 # bias (N,)
        self.lora_a = Shard(1 + stacked) if rowwise else r                       # on K
        self.lora_b = Shard(0 + stacked) if colwise else r                       # on N
        self.y = Shard(1) if colwise else partial if rowwise else Shard(0) if rows else r   # (M, N)
        # what the local op's gradients are: a partial sum where the local op sums over a split dim
        # (N colwise for dX and dA, the rows for the weights), else the input's own placement
        self.x_grad = partial if colwise else self.x
        self.weight_grad = partial if rows else self.weight
        self.lora_a_grad = partial if colwise or rows else None                  # None: as the input
        self.lora_b_grad = partial if rowwise or rows else None


def _styles(op: str, weight: Tensor, others: dict, rows_may_shard: bool = False, stacked: bool = False) -> tuple:
    """(mesh, one _Style per mesh dim) from weight's placements; the other DTensors must share its mesh."""
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
    styles = []
    x = others["x"]
    for dim, placement in enumerate(weight.placements):
        if placement.is_replicate():
            rows = rows_may_shard and isinstance(x, dtensor) and x.placements[dim].is_shard(0)
            styles.append(_Style("rows" if rows else "replicate", stacked))
        elif placement.is_shard(0):
            styles.append(_Style("colwise", stacked))
        elif placement.is_shard(1):
            styles.append(_Style("rowwise", stacked))
        else:
            raise ValueError(f"{op}: weight has placement {placement} on mesh dim {dim}: supported are Replicate, "
                             "Shard(0) (colwise: sharded on out_features N) and Shard(1) (rowwise: on in_features K)")
    return mesh, styles


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


def _laid_out_layer(mesh, styles: list, x: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor) -> tuple:
    """(x, bias, lora_a, lora_b) laid out for `styles` (the weight stays as it is)."""
    return (_laid_out("x", x, mesh, [s.x for s in styles]), _laid_out("bias", bias, mesh, [s.vector for s in styles]),
            _laid_out("lora_a", lora_a, mesh, [s.lora_a for s in styles]),
            _laid_out("lora_b", lora_b, mesh, [s.lora_b for s in styles]))


def _local_layer(styles: list, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                 lora_b: Tensor) -> tuple:
    """(x, weight, bias, lora_a, lora_b) as this rank's local tensors, their gradients labelled as the
    local op computes them."""
    return (_local(x, [s.x_grad for s in styles]), _local(weight, [s.weight_grad for s in styles]),
            _local_bias(bias, styles), _local(lora_a, [s.lora_a_grad for s in styles]),
            _local(lora_b, [s.lora_b_grad for s in styles]))


def _local(t: Tensor | None, grad_placements: list) -> Tensor | None:
    """This rank's local tensor of t; its gradient (autograd) comes back labelled with grad_placements
    (None on a mesh dim: t's own placement there)."""
    if t is None:
        return None
    placements = [g if g is not None else p for g, p in zip(grad_placements, t.placements)]
    return t.to_local(grad_placements=placements)


def _local_bias(bias: Tensor | None, styles: list) -> Tensor | None:
    """The bias each rank adds: divided by the size of the rowwise mesh dims (y is a partial sum
    there), its gradient then a partial sum too."""
    if bias is None:
        return None
    from torch.distributed.tensor import Partial

    local = _local(bias, [Partial() if s.style in ("rowwise", "rows") else None for s in styles])
    group = 1   # a loop: math.prod over a generator here failed the compiled route (AOT replaying an alias on a DTensor)
    for dim, s in enumerate(styles):
        group *= bias.device_mesh.size(dim) if s.style == "rowwise" else 1
    return local if group == 1 else local / group


def _labeller(mesh, styles: list, shape: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """y (M_local, N_local) -> the DTensor y (M, N) of the layout (uneven shards: shape given)."""
    dtensor, placements = dtensor_class(), [s.y for s in styles]
    return lambda y: dtensor.from_local(y, mesh, placements, run_check=False, shape=torch.Size(shape),
                                        stride=(shape[1], 1))


def _check_seeds_agree(seed: Tensor, mesh) -> None:
    """At the first dropout call on a mesh, checks that every rank drew the same seed: ranks holding
    the same block of x must apply the same mask, so tensor parallelism needs every rank seeded alike
    (torch.manual_seed with one seed; not accelerate's set_seed(device_specific=True)), as torch's own
    DTensor random ops do (they synchronise their generator once, then rely on every rank making the
    same calls). One all-reduce and one host sync, once per mesh and process; none in a compile trace.
    Checking every call would cost a collective per layer (1.45 ms measured on gloo, 2 CPU ranks)."""
    if mesh in _meshes_with_agreed_seeds or torch.compiler.is_compiling():
        return
    import torch.distributed as dist

    bounds = torch.stack([seed, -seed]).to(torch.int64)                          # (max, -min) after MAX
    for dim in range(mesh.ndim):
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    if bounds[0] != -bounds[1]:
        raise RuntimeError("lora_kernels: dropout under tensor parallelism needs every rank seeded alike: the "
                           f"ranks of mesh {mesh} drew different dropout seeds from torch's generator, so their "
                           "masks would disagree. Call torch.manual_seed with one seed on every rank")
    _meshes_with_agreed_seeds.add(mesh)


def _seed_of_block(seed: Tensor, x: Tensor, seed_bound: int) -> Tensor:
    """seed + the index of this rank's block of x among the blocks x is cut into (0 where x is
    replicated): ranks holding the same block draw the same mask, other blocks independent ones."""
    mesh, index = x.device_mesh, 0
    coordinate = mesh.get_coordinate()
    for dim, placement in enumerate(x.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coordinate[dim]
    return seed if index == 0 else (seed + index) % seed_bound
