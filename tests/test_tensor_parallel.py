"""Tensor parallelism (DTensor) on 2 CPU processes joined by gloo: the ops' sharding rules (colwise,
rowwise, replicated, rows) forward and backward on the torch and Triton backends and inside
torch.compile (the registered op in a trace), the styles of lora_kernels.nn.tensor_parallel on
LoRALinear, MultiLoRALinear and a PEFT Llama, and the errors of unsupported layouts.

Every tensor-parallel result is compared with the same op or model run whole in the same process
(gathered with full_tensor): the same maths with the sums over K or N split in two (SAME_MATHS;
float64 on the torch backend, float32 on the interpreted Triton one)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import lora_kernels

from .distributed import run_workers
from .tolerance import assert_same_maths

M, K, N, R = 6, 12, 10, 3          # N = 10: colwise shards 5 + 5; K = 12: rowwise 6 + 6
L = 3                              # adapters of the multi-adapter op
IDS = [2, -1, 0, 2, 2, -1]         # one row per adapter id, -1 = base only


def _placements(style: str):
    """{input: placements} of one style for the single-adapter op; x is (B, S, K) or (M, K)."""
    from torch.distributed.tensor import Replicate, Shard

    r = [Replicate()]
    return {
        "replicate": dict(x=r, weight=r, bias=r, lora_a=r, lora_b=r),
        "colwise": dict(x=r, weight=[Shard(0)], bias=[Shard(0)], lora_a=r, lora_b=[Shard(0)]),
        "rowwise": dict(x=[Shard(-1)], weight=[Shard(1)], bias=r, lora_a=[Shard(1)], lora_b=r),
        "rows": dict(x=[Shard(0)], weight=r, bias=r, lora_a=r, lora_b=r),
    }[style]


def _multi_placements(style: str):
    from torch.distributed.tensor import Replicate, Shard

    r = [Replicate()]
    return {
        "replicate": dict(x=r, weight=r, bias=r, lora_a=r, lora_b=r),
        "colwise": dict(x=r, weight=[Shard(0)], bias=[Shard(0)], lora_a=r, lora_b=[Shard(1)]),
        "rowwise": dict(x=[Shard(-1)], weight=[Shard(1)], bias=r, lora_a=[Shard(2)], lora_b=r),
    }[style]


def _distributed(tensors: dict, placements: dict, mesh, grad: tuple = ()) -> dict:
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name, t in tensors.items():
        d = None if t is None else distribute_tensor(t.detach(), mesh, placements[name])
        out[name] = d.requires_grad_() if d is not None and name in grad else d
    return out


def _grad_for(y, grad_y, mesh):
    """grad_y (the whole tensor) laid out as y: sharded as y, or replicated for a Partial y."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    target = [p if not p.is_partial() else Replicate() for p in y.placements]
    return distribute_tensor(grad_y, mesh, target)


def _check_single(mesh, backend, dtype, style, x_shape, with_bias, dropout_p, route="eager", downstream=False,
                  create_graph=False):
    """lora_linear on DTensors laid out by `style` against the whole tensors, forward and gradients.
    downstream: y feeds a DTensor matmul with a weight split on its rows, so y's gradient comes back in
    another layout than y's (Partial or Shard(0)); the backward must still use the forward's masks.
    create_graph: the gradients taken with create_graph=True (the differentiable formulas)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from lora_kernels.ops.lora_linear import SEED_BOUND

    torch.manual_seed(0)
    tensors = dict(x=torch.randn(*x_shape, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype),
                   bias=torch.randn(N, dtype=dtype) if with_bias else None,
                   lora_a=torch.randn(R, K, dtype=dtype), lora_b=torch.randn(N, R, dtype=dtype))
    grad_y = torch.randn(*x_shape, N, dtype=dtype)
    next_weight = torch.randn(4, N, dtype=dtype)                                # downstream (4, N)
    wanted = ("x", "lora_a", "lora_b")
    dist_in = _distributed(tensors, _placements(style), mesh, grad=wanted)
    call = lora_kernels.lora_linear
    if route == "compile":
        call = torch.compile(lora_kernels.lora_linear, backend="aot_eager", fullgraph=False)
    torch.manual_seed(7)                    # the dropout seed: drawn alike on every rank
    y = call(*dist_in.values(), 0.5, dropout_p=dropout_p)
    if downstream:   # out = y W2ᵀ (M, 4): y's gradient is grad_out W2 (M, N)
        out = y @ distribute_tensor(next_weight, mesh, [Shard(1)]).T
        grad_out = _grad_for(out, grad_y[..., :4], mesh)
        grad_y = grad_y[..., :4] @ next_weight
    else:
        out, grad_out = y, _grad_for(y, grad_y, mesh)
    inputs = [dist_in[name] for name in wanted]
    grads = torch.autograd.grad(out, inputs, grad_out, create_graph=create_graph)
    what = (f"lora_linear {style} {backend} {dtype} x{tuple(x_shape)} bias={with_bias} p={dropout_p} {route}"
            f"{' downstream' if downstream else ''}"
            f"{' create_graph' if create_graph else ''}")

    # the same call whole, with the mask each block of x drew (rowwise: its own seed, seed + block)
    whole = {name: None if t is None else t.clone().requires_grad_(name in wanted) for name, t in tensors.items()}
    keep = None
    if dropout_p:
        torch.manual_seed(7)
        seed = torch.randint(SEED_BOUND, (), dtype=torch.int64)
        keep = _keep_mask_of_blocks(y, dist_in["x"], seed, dropout_p, backend, SEED_BOUND)
    expected = _lora_linear_with_mask(whole, 0.5, dropout_p, keep)
    expected_grads = torch.autograd.grad(expected, [whole[name] for name in wanted], grad_y)
    assert_same_maths(y.full_tensor(), expected.detach(), msg=f"{what}: y")
    for name, grad, expected_grad in zip(wanted, grads, expected_grads):
        assert_same_maths(grad.full_tensor(), expected_grad, msg=f"{what}: grad of {name}")


def _keep_mask_of_blocks(y, x, seed, dropout_p, backend, seed_bound):
    """The whole (M, K) keep-mask a tensor-parallel call drew: each rank's block of x (rows or
    columns) with seed + its block index, gathered; replicated x: the mask of seed itself."""
    import torch.distributed as dist

    from lora_kernels.ops._dispatch import implementation

    x2d_local = x.to_local().reshape(-1, x.to_local().shape[-1])
    sharded = [p for p in x.placements if p.is_shard()]
    index = dist.get_rank() if sharded else 0
    local = implementation(backend).dropout_keep_mask(
        x2d_local.shape[0], x2d_local.shape[1], dropout_p, torch.tensor((seed.item() + index) % seed_bound),
        x2d_local.device)
    if not sharded:
        return local
    blocks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(blocks, local)
    assert not torch.equal(blocks[0], blocks[1]), "the blocks of x drew the same dropout mask"
    return torch.cat(blocks, dim=0 if sharded[0].dim == 0 else 1)   # x (M, K): rows or columns


def _lora_linear_with_mask(t: dict, scale, dropout_p, keep):
    x = t["x"]
    x2d = x.reshape(-1, K)
    dropped = x2d if keep is None else x2d * keep / (1 - dropout_p)
    y = x2d @ t["weight"].T + (0 if t["bias"] is None else t["bias"]) + scale * (dropped @ t["lora_a"].T) @ t["lora_b"].T
    return y.reshape(*x.shape[:-1], N)


def _check_multi(mesh, dtype, style, route="eager"):
    torch.manual_seed(1)
    tensors = dict(x=torch.randn(M, K, dtype=dtype), weight=torch.randn(N, K, dtype=dtype),
                   bias=torch.randn(N, dtype=dtype), lora_a=torch.randn(L, R, K, dtype=dtype),
                   lora_b=torch.randn(L, N, R, dtype=dtype))
    scales = torch.tensor([0.5, 1.0, 2.0])
    ids = torch.tensor(IDS)
    grad_y = torch.randn(M, N, dtype=dtype)
    wanted = ("x", "lora_a", "lora_b")
    dist_in = _distributed(tensors, _multi_placements(style), mesh, grad=wanted)
    call = lora_kernels.multi_lora_linear
    if route == "compile":
        call = torch.compile(lora_kernels.multi_lora_linear, backend="aot_eager", fullgraph=False)
    from torch.distributed.tensor import Replicate, distribute_tensor

    replicated_ids = distribute_tensor(ids, mesh, [Replicate()])     # ids as a replicated DTensor: accepted
    y = call(*dist_in.values(), scales, lora_kernels.AdapterBatch(replicated_ids, L))
    y.backward(_grad_for(y, grad_y, mesh))
    whole = {name: t.clone().requires_grad_(name in wanted) for name, t in tensors.items()}
    expected = lora_kernels.multi_lora_linear(*whole.values(), scales, ids)
    expected.backward(grad_y)
    what = f"multi_lora_linear {style} {dtype} {route}"
    assert_same_maths(y.full_tensor(), expected.detach(), msg=f"{what}: y")
    for name in wanted:
        assert_same_maths(dist_in[name].grad.full_tensor(), whole[name].grad, msg=f"{what}: grad of {name}")

    # add_multi_lora_ into the base output as the layer's matmul leaves it (colwise: sharded on N;
    # rowwise: Partial, before the all-reduce), in place
    from torch.distributed.tensor import Partial, Shard

    with torch.no_grad():
        base = tensors["x"] @ tensors["weight"].T
        out = dist_in["x"].detach() @ dist_in["weight"].T
        out_placement = {"replicate": Replicate(), "colwise": Shard(1), "rowwise": Partial()}[style]
        assert out.placements == (out_placement,), f"{style}: the base output is {out.placements}"
        returned = lora_kernels.add_multi_lora_(out, *(dist_in[n].detach() for n in ("x", "lora_a", "lora_b")),
                                                scales, ids)
        assert returned is out and out.placements == (out_placement,), f"add_multi_lora_ {style}: placements"
        expected_out = lora_kernels.add_multi_lora_(base.clone(), tensors["x"], tensors["lora_a"], tensors["lora_b"],
                                                    scales, ids)
        assert_same_maths(out.full_tensor(), expected_out, msg=f"add_multi_lora_ {style} {dtype}")


def _check_errors(mesh):
    from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

    x, w, a, b = torch.randn(M, K), torch.randn(N, K), torch.randn(R, K), torch.randn(N, R)
    dw = distribute_tensor(w, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="weight is a plain tensor"):
        lora_kernels.lora_linear(distribute_tensor(x, mesh, [Replicate()]), w, None, a, b)
    with pytest.raises(ValueError, match="lora_a .* is a plain tensor but weight is a DTensor"):
        lora_kernels.lora_linear(distribute_tensor(x, mesh, [Replicate()]), dw, None, a,
                                 distribute_tensor(b, mesh, [Shard(0)]))
    from torch.distributed.tensor import DTensor

    partial_w = DTensor.from_local(w / 2, mesh, [Partial()])
    with pytest.raises(ValueError, match=r"weight has placement P\(sum\)"):
        lora_kernels.lora_linear(*(distribute_tensor(t, mesh, [Replicate()]) for t in (x,)), partial_w, None,
                                 *(distribute_tensor(t, mesh, [Replicate()]) for t in (a, b)))
    uneven_rows = distribute_tensor(torch.randn(3, 2, K), mesh, [Shard(0)])        # 3 samples over 2 ranks
    with pytest.raises(ValueError, match="cannot be flattened to"):
        lora_kernels.lora_linear(uneven_rows, distribute_tensor(w, mesh, [Replicate()]), None,
                                 *(distribute_tensor(t, mesh, [Replicate()]) for t in (a, b)))
    # a lora_a sharded on its rank (S-LoRA's layout) is gathered, not misread
    y = lora_kernels.lora_linear(distribute_tensor(x, mesh, [Replicate()]), dw, None,
                                 distribute_tensor(a, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)]))
    assert_same_maths(y.full_tensor(), lora_kernels.lora_linear(x, w, None, a, b), msg="lora_a sharded on r")
    # ids that differ per rank as a sharded DTensor: refused
    ids = distribute_tensor(torch.tensor(IDS), mesh, [Shard(0)])
    with pytest.raises(ValueError, match="adapter_ids is a DTensor with placements"):
        lora_kernels.multi_lora_linear(distribute_tensor(x, mesh, [Replicate()]), dw, None,
                                       distribute_tensor(torch.randn(L, R, K), mesh, [Replicate()]),
                                       distribute_tensor(torch.randn(L, N, R), mesh, [Shard(1)]),
                                       torch.ones(L), ids)


def _check_seeds_must_agree(mesh):
    """Ranks seeded differently would draw masks that disagree: the first dropout call on a mesh raises."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x, w, a, b = (distribute_tensor(t, mesh, [p]) for t, p in (
        (torch.randn(M, K), Replicate()), (torch.randn(N, K), Shard(0)), (torch.randn(R, K), Replicate()),
        (torch.randn(N, R), Shard(0))))
    torch.manual_seed(7 + dist.get_rank())
    with pytest.raises(RuntimeError, match="needs every rank seeded alike"):
        lora_kernels.lora_linear(x, w, None, a, b, dropout_p=0.3)


def _check_2d_mesh(world_size: int):
    """A (2, 1) and a (1, 2) mesh: x split on its rows along one dim (data parallel), the layer colwise
    or rowwise along the other; y and the gradients against the whole tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    r = Replicate()
    for shape in ((world_size, 1), (1, world_size)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        for tp_x, tp_weight, tp_a, tp_b in ((r, Shard(0), r, Shard(0)), (Shard(1), Shard(1), Shard(1), r)):
            placements = dict(x=[Shard(0), tp_x], weight=[r, tp_weight], bias=[r, tp_weight if tp_x == r else r],
                              lora_a=[r, tp_a], lora_b=[r, tp_b])
            torch.manual_seed(5)
            tensors = dict(x=torch.randn(M, K, dtype=torch.float64), weight=torch.randn(N, K, dtype=torch.float64),
                           bias=torch.randn(N, dtype=torch.float64), lora_a=torch.randn(R, K, dtype=torch.float64),
                           lora_b=torch.randn(N, R, dtype=torch.float64))
            grad_y = torch.randn(M, N, dtype=torch.float64)
            wanted = ("x", "weight", "bias", "lora_a", "lora_b")          # the frozen layer's gradients too
            dist_in = _distributed(tensors, placements, mesh, grad=wanted)
            y = lora_kernels.lora_linear(*dist_in.values(), 0.5)
            grads = torch.autograd.grad(y, [dist_in[n] for n in wanted], _grad_for(y, grad_y, mesh))
            whole = {name: t.clone().requires_grad_() for name, t in tensors.items()}
            expected = _lora_linear_with_mask(whole, 0.5, 0.0, None)
            expected_grads = torch.autograd.grad(expected, [whole[n] for n in wanted], grad_y)
            what = f"mesh {shape}, weight {placements['weight']}"
            assert_same_maths(y.full_tensor(), expected.detach(), msg=f"{what}: y")
            for name, grad, expected_grad in zip(wanted, grads, expected_grads):
                assert_same_maths(grad.full_tensor(), expected_grad, msg=f"{what}: grad of {name}")


def _ops_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    lora_kernels.set_backend("torch")
    for style in ("colwise", "rowwise"):   # inside a trace, before any eager DTensor call of the process
        _check_single(mesh, "torch", torch.float64, style, (2, M // 2), with_bias=True, dropout_p=0.0, route="compile")
        _check_multi(mesh, torch.float64, style, route="compile")
    _check_seeds_must_agree(mesh)         # the mesh's first dropout call
    for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):   # triton: interpreted
        lora_kernels.set_backend(backend)
        for style in ("colwise", "rowwise", "replicate", "rows"):
            x_shape = (M,) if style == "rows" else (2, M // 2)
            _check_single(mesh, backend, dtype, style, x_shape, with_bias=True, dropout_p=0.0)
            _check_single(mesh, backend, dtype, style, (M,), with_bias=style != "colwise", dropout_p=0.3,
                          downstream=style in ("replicate", "rows"))
        for style in ("colwise", "rowwise", "replicate"):
            _check_multi(mesh, dtype, style)
    lora_kernels.set_backend("torch")
    for style in ("rowwise", "replicate"):
        _check_single(mesh, "torch", torch.float64, style, (M,), with_bias=True, dropout_p=0.3, create_graph=True)
    _check_errors(mesh)
    _check_2d_mesh(world_size)


def test_ops_colwise_rowwise_replicated_rows_forward_backward_on_both_backends():
    """One spawn for both backends (a spawn costs seconds of imports on 2 cores)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the Triton backend's half of this test cannot run")
    run_workers(_ops_worker)


# ---- modules: the styles of lora_kernels.nn.tensor_parallel --------------------------------------

class _MLP(nn.Module):
    """up colwise, then down rowwise: the pair tensor parallelism runs with one all-reduce."""

    def __init__(self):
        super().__init__()
        self.up = lora_kernels.LoRALinear(nn.Linear(K, 2 * N, dtype=torch.float64), r=R, lora_alpha=6,
                                          lora_dropout=0.0)
        self.down = lora_kernels.LoRALinear(nn.Linear(2 * N, K, dtype=torch.float64), r=R, lora_alpha=6)
        for layer in (self.up, self.down):
            nn.init.normal_(layer.lora_B.weight)          # B starts at zero: make the LoRA term count

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora_grads(model: nn.Module) -> dict:
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
            for name, p in model.named_parameters() if p.requires_grad}


def _check_lora_linear_modules(mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.nn.tensor_parallel import LoRAColwiseParallel, LoRARowwiseParallel

    torch.manual_seed(2)
    whole = _MLP()
    model = copy.deepcopy(whole)
    parallelize_module(model, mesh, {"up": LoRAColwiseParallel(), "down": LoRARowwiseParallel()})
    assert model.up.lora_B.weight.placements[0].is_shard(0) and model.down.lora_A.weight.placements[0].is_shard(1)
    assert not model.up.base_layer.weight.requires_grad          # frozen stays frozen
    x = torch.randn(2, 3, K, dtype=torch.float64)
    for m in (whole, model):
        m(x).square().sum().backward()
    assert_same_maths(model(x), whole(x), msg="LoRALinear colwise -> rowwise: y")
    expected = _lora_grads(whole)
    for name, grad in _lora_grads(model).items():
        assert_same_maths(grad, expected[name], msg=f"LoRALinear colwise -> rowwise: grad of {name}")
    # merging works on the shards: W0 + s·B A with B, A laid out as W0
    model.up.merge()
    whole.up.merge()
    assert_same_maths(model.up.base_layer.weight.full_tensor(), whole.up.base_layer.weight, msg="merge under TP")


def _check_multi_lora_modules(mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.nn.tensor_parallel import LoRAColwiseParallel, LoRARowwiseParallel

    torch.manual_seed(3)
    whole = nn.Sequential(lora_kernels.MultiLoRALinear(nn.Linear(K, N, dtype=torch.float64), num_slots=L, max_rank=4),
                          lora_kernels.MultiLoRALinear(nn.Linear(N, K, dtype=torch.float64), num_slots=L, max_rank=4))
    model = copy.deepcopy(whole)
    parallelize_module(model, mesh, {"0": LoRAColwiseParallel(), "1": LoRARowwiseParallel()})
    # adapters loaded (hot-swapped) after parallelizing: each rank writes its block of the stacks
    for slot, rank in ((0, 2), (2, 4)):
        for i, (n, k) in enumerate(((N, K), (K, N))):
            a, b = torch.randn(rank, k, dtype=torch.float64), torch.randn(n, rank, dtype=torch.float64)
            whole[i].load_adapter(slot, a, b, scale=0.5 + slot)
            model[i].load_adapter(slot, a, b, scale=0.5 + slot)
    model[1].unload_adapter(2)
    whole[1].unload_adapter(2)
    x = torch.randn(M, K, dtype=torch.float64)
    with lora_kernels.use_adapters(torch.tensor(IDS), num_adapters=L):
        assert_same_maths(model(x), whole(x), msg="MultiLoRALinear colwise -> rowwise, hot-swapped adapters")


def _tiny_llama_with_lora(dtype=torch.float64):
    import peft
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                                      num_hidden_layers=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False))
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    model.to(dtype)
    assert lora_kernels.patch_peft(model) == 14
    return model


def _check_llama_plan(mesh):
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.nn.tensor_parallel import tensor_parallel_plan
    from lora_kernels.ops import _tensor_parallel

    whole = _tiny_llama_with_lora()
    model = copy.deepcopy(whole)
    plan = tensor_parallel_plan(model)
    assert len(plan) == 14 and all(name.endswith("proj") for name in plan), sorted(plan)
    parallelize_module(model, mesh, plan)
    calls = []
    laid_out = _tensor_parallel.lora_linear_args
    _tensor_parallel.lora_linear_args = lambda *args: calls.append(1) or laid_out(*args)
    try:
        tokens = torch.randint(0, 64, (2, 5))
        for m in (whole, model):
            m.train()
            m(input_ids=tokens, labels=tokens).loss.backward()
    finally:
        _tensor_parallel.lora_linear_args = laid_out
    assert len(calls) == 14, f"{len(calls)} of 14 LoRA layers ran the fused op on DTensors"
    expected = _lora_grads(whole)
    grads = _lora_grads(model)
    assert sorted(grads) == sorted(expected) and len(grads) == 28
    for name, grad in grads.items():
        assert_same_maths(grad, expected[name], msg=f"TP Llama: grad of {name}")
    model.eval()
    whole.eval()
    with torch.no_grad():
        assert_same_maths(model(input_ids=tokens).logits, whole(input_ids=tokens).logits, msg="TP Llama: logits")
        names = ["default", "__base__"]   # a mixed batch: multi_lora_linear on DTensors
        assert_same_maths(model(input_ids=tokens, adapter_names=names).logits,
                          whole(input_ids=tokens, adapter_names=names).logits, msg="TP Llama: mixed batch logits")


def _modules_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    lora_kernels.set_backend("torch")
    _check_lora_linear_modules(mesh)
    _check_multi_lora_modules(mesh)
    _check_llama_plan(mesh)


def test_styles_on_lora_linear_multi_lora_linear_and_a_peft_llama():
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    run_workers(_modules_worker)


def test_importing_lora_kernels_leaves_torch_distributed_tensor_unimported():
    """The ops recognise DTensors through sys.modules: no import (about 1 s) for users without them."""
    import subprocess
    import sys

    code = "import sys, lora_kernels; print('torch.distributed.tensor' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_plan_names_the_projections_only():
    """tensor_parallel_plan picks the listed projections (LoRA layers or plain nn.Linear), never the
    modules inside a LoRA layer, and passes over LoRA layers it does not plan (an embedding's)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lora_kernels.nn.tensor_parallel import LoRAColwiseParallel, LoRARowwiseParallel, tensor_parallel_plan

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=1, vocab_size=64)
    targets = ["q_proj", "o_proj", "down_proj", "embed_tokens"]
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=targets))
    plan = tensor_parallel_plan(model, colwise=("q_proj", "k_proj", "lm_head", "lora_A", "default", "base_layer"),
                                rowwise=("o_proj", "down_proj", "embed_tokens_is_not_listed"))
    prefix = "base_model.model."
    assert {name[len(prefix):]: type(style) for name, style in plan.items()} == {
        "model.layers.0.self_attn.q_proj": LoRAColwiseParallel, "model.layers.0.self_attn.k_proj": LoRAColwiseParallel,
        "lm_head": LoRAColwiseParallel, "model.layers.0.self_attn.o_proj": LoRARowwiseParallel,
        "model.layers.0.mlp.down_proj": LoRARowwiseParallel}
