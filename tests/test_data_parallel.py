"""Data parallelism on the fused ops: DDP and FSDP2 (fully_shard) train a patched PEFT Llama exactly
as one process trains it on the whole batch; torch.distributed.checkpoint saves and loads its LoRA state.

Two CPU processes joined by gloo (tests/distributed.py), the torch backend, fp32. Each worker builds
the reference itself: the same model from the same seeds, trained in the same process on the global
batch of which each rank gets half (equal halves: the mean loss of the halves is the batch's mean
loss, so DDP's and FSDP2's gradient averaging gives the full batch's gradient). Both ranks check.
Per spawn ~8 s of imports on 2 cores: one spawn per group of scenarios.

Tolerances (fp32, _assert_matches): the distributed and the single-process runs compute the same
maths in another summation order (weight gradients summed over each rank's 16 token rows, then a
gloo sum, instead of over 32 rows) through a 2-layer model: SAME_MATHS' 1e-5, its shallow-computation
case, relative to the tensor's own scale (max |expected|: gradients are far from 1). Measured here: losses
1e-7, gradients and parameters <= 2.3e-6 of max |expected| (4x headroom); a real fault (a rank's
gradient not averaged, a shard read as the full factor) is off by O(1). A checkpoint round trip
copies values and recomputes the same way: equal bit for bit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from .distributed import run_workers
from .tolerance import SAME_MATHS

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, VOCAB = 4, 8, 128         # global batch of 4 sequences of 8 tokens: 2 per rank
STEPS = 2                             # a step after an optimizer step: the updates must match too
TOL = SAME_MATHS[torch.float32]


# ---- what the workers share (top level: the spawned children import them) ----

def _model(lora_seed: int = 1, second_adapter: bool = False):
    """A 2-layer Llama (hidden 64, 4 heads, 2 kv heads) with LoRA r=4 on every projection, patched.
    The base weights come from seed 0, the LoRA factors from lora_seed (non-zero B: the LoRA term and
    both factors' gradients are non-zero from the first step). second_adapter: a second adapter
    "other" (r=2); both adapters train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lora_kernels

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=SEQ, use_cache=False,
                         attn_implementation="eager")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    torch.manual_seed(lora_seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      init_lora_weights=False))
    if second_adapter:
        model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS,
                                                   init_lora_weights=False))
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)     # PEFT trains the active adapter only
    assert lora_kernels.patch_peft(model) == len(TARGETS) * config.num_hidden_layers    # 14 layers
    return model


def _batch() -> torch.Tensor:
    """The global batch: (BATCH, SEQ) token ids, labels = the ids (causal LM loss)."""
    return torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))


def _half(tensor_or_list, rank: int, world_size: int):
    """Rank `rank`'s share of the global batch (dim 0)."""
    share = BATCH // world_size
    return tensor_or_list[rank * share:(rank + 1) * share]


def _lora_params(model) -> dict[str, torch.Tensor]:
    """{name: value} of the LoRA factors (the model inside DDP, or an FSDP2 model: fully_shard keeps
    the names), full tensors (FSDP2's DTensor shards gathered), detached."""
    result = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            result[name] = value.detach().clone()
    return result


def _lora_grads(model) -> dict[str, torch.Tensor]:
    """{name: gradient} of the LoRA factors, as _lora_params."""
    result = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            result[name] = grad.detach().clone()
    return result


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same maths, another summation order (module docstring): max |actual - expected| <= TOL · max
    |expected| (SAME_MATHS' tolerance at the tensor's own scale)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= TOL * scale, (f"{what}: max abs error {err:.3e} > tolerance {TOL:.0e} x max |expected| "
                                f"{scale:.3e} (relative error {err / scale if scale else float('inf'):.3e})")


def _assert_dicts_match(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), f"{what}: names differ: {sorted(actual.keys() ^ expected.keys())[:4]}"
    for name in expected:
        _assert_matches(actual[name], expected[name], f"{what} {name}")


class FusedCalls:
    """Counts, in this process, the patched PEFT layers' calls of the fused ops (lora_linear,
    multi_lora_linear) and of PEFT's own forward (the fallback): the names lora_kernels.nn.peft calls
    them by, wrapped."""

    def __init__(self):
        self.counts = {"lora_linear": 0, "multi_lora_linear": 0, "peft_forward": 0}

    @contextlib.contextmanager
    def counting(self):
        from lora_kernels.nn import peft as patched

        originals = {"lora_linear": patched.lora_linear, "multi_lora_linear": patched.multi_lora_linear,
                     "peft_forward": patched._PEFT_FORWARD}
        names = {"peft_forward": "_PEFT_FORWARD"}

        def wrap(key, function):
            def counted(*args, **kwargs):
                self.counts[key] += 1
                return function(*args, **kwargs)
            return counted

        for key, function in originals.items():
            setattr(patched, names.get(key, key), wrap(key, function))
        try:
            yield self
        finally:
            for key, function in originals.items():
                setattr(patched, names.get(key, key), function)

    def reset(self) -> dict:
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts


def _reduced_loss(loss: torch.Tensor, world_size: int) -> torch.Tensor:
    """The global batch's mean loss from the ranks' (equal-sized) halves."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / world_size


def _train_reference(model, optimizer, ids, names=None) -> tuple[list, list]:
    """STEPS steps on the whole batch in this process: (losses, LoRA gradients per step)."""
    losses, grads = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        extra = {} if names is None else {"adapter_names": names}
        loss = model(input_ids=ids, labels=ids, **extra).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_lora_grads(model))
        optimizer.step()
    return losses, grads


def _train_distributed(model, lora_model, optimizer, ids, world_size, scenario, ref_losses, ref_grads,
                       names=None) -> None:
    """STEPS steps of `model` (DDP / FSDP2 around lora_model) on this rank's half of the batch, each
    step's mean loss and LoRA gradients checked against the reference's."""
    rank = dist.get_rank()
    for step in range(STEPS):
        optimizer.zero_grad()
        extra = {} if names is None else {"adapter_names": _half(names, rank, world_size)}
        local = _half(ids, rank, world_size)
        loss = model(input_ids=local, labels=local, **extra).loss
        loss.backward()
        _assert_matches(_reduced_loss(loss, world_size), ref_losses[step], f"{scenario} step {step} loss")
        _assert_dicts_match(_lora_grads(lora_model), ref_grads[step], f"{scenario} step {step} grad")
        optimizer.step()


# ---- DDP ----

def _ddp_worker(rank: int, world_size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    ids = _batch()
    calls = FusedCalls()
    # (a) one adapter, AdamW
    reference = _model()
    ref_losses, ref_grads = _train_reference(reference, torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-2), ids)
    model = _model()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    with calls.counting():
        _train_distributed(ddp, model, optimizer, ids, world_size, "DDP", ref_losses, ref_grads)
    _assert_dicts_match(_lora_params(model), _lora_params(reference), "DDP after training:")
    counts = calls.reset()
    # 14 LoRA layers x STEPS forwards, every one on lora_linear, none on PEFT's forward
    assert counts == {"lora_linear": 14 * STEPS, "multi_lora_linear": 0, "peft_forward": 0}, f"DDP: {counts}"

    # (b) a mixed batch of two adapters and the base model, training (SGD: the gradient itself moves the
    # factors, no per-element normalization)
    names = ["default", "other", "__base__", "default"]          # rank 0: default, other; rank 1: base, default
    reference = _model(second_adapter=True)
    ref_losses, ref_grads = _train_reference(reference, torch.optim.SGD(
        [p for p in reference.parameters() if p.requires_grad], lr=0.5), ids, names)
    model = _model(second_adapter=True)
    # every adapter's factors are in every layer's graph (multi_lora_linear takes them stacked): no
    # unused parameters although rank 1's half never names "other"
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
    with calls.counting():
        _train_distributed(ddp, model, optimizer, ids, world_size, "DDP mixed batch", ref_losses, ref_grads, names)
    _assert_dicts_match(_lora_params(model), _lora_params(reference), "DDP mixed batch after training:")
    counts = calls.reset()
    assert counts == {"lora_linear": 0, "multi_lora_linear": 14 * STEPS, "peft_forward": 0}, \
        f"DDP mixed batch: {counts}"
    other = [g for name, g in ref_grads[0].items() if ".other." in name]
    assert other and all(g.abs().max() > 0 for g in other), "the 'other' adapter must get gradients"


def test_ddp_one_adapter_and_mixed_adapter_batch():
    """(a) DDP around a patched PEFT Llama, AdamW, half the batch per rank: losses, gradients and LoRA
    parameters equal one process's full-batch run, every LoRA layer on lora_linear. (b) the same with
    a mixed batch (adapter_names: two adapters and "__base__") in training, SGD: multi_lora_linear."""
    run_workers(_ddp_worker)


# ---- FSDP2 ----

def _sharded(model):
    """fully_shard on each decoder layer, then on the root (the usual FSDP2 plan): returns model."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _lora_layers(model) -> list:
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(layers) == 14, f"{len(layers)} PEFT LoRA layers, 14 expected"
    return layers


def _fsdp_worker(rank: int, world_size: int, checkpoint_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lora_kernels.nn.peft import _hooked as hooked

    ids = _batch()
    calls = FusedCalls()
    reference = _model()
    ref_losses, ref_grads = _train_reference(reference, torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-2), ids)
    ref_params = _lora_params(reference)

    # (i) one FSDP unit per decoder layer (LoRA and base weights together), then the root
    per_layer = _sharded(_model())
    optimizer = torch.optim.AdamW([p for p in per_layer.parameters() if p.requires_grad], lr=1e-2)
    with calls.counting():
        _train_distributed(per_layer, per_layer, optimizer, ids, world_size, "FSDP2 per layer", ref_losses,
                           ref_grads)
    _assert_dicts_match(_lora_params(per_layer), ref_params, "FSDP2 per layer after training:")
    counts = calls.reset()
    # between forwards every weight is its DTensor shard; the layer's unit gathers them all before the
    # layer runs, so the LoRA layers see plain tensors and take the fused path
    assert all(isinstance(m.lora_A["default"].weight, DTensor) for m in _lora_layers(per_layer))
    assert counts == {"lora_linear": 14 * STEPS, "multi_lora_linear": 0, "peft_forward": 0}, \
        f"FSDP2 per layer: {counts}"

    # (ii) the LoRA factors' modules (lora_A / lora_B children) in units of their own, then the layers,
    # then the root
    model = _model()
    for layer in _lora_layers(model):
        for module in (*layer.lora_A.values(), *layer.lora_B.values()):
            fully_shard(module)
    _sharded(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with calls.counting():
        _train_distributed(model, model, optimizer, ids, world_size, "FSDP2 LoRA units", ref_losses, ref_grads)
    _assert_dicts_match(_lora_params(model), ref_params, "FSDP2 LoRA units after training:")
    counts = calls.reset()
    # A unit of its own gathers lora_A / lora_B's weight in a forward pre-hook of that module, only
    # when the module is called; outside the call the weight is its DTensor shard. The fused path
    # would read the weights without calling the modules, so lora_kernels.nn.peft._hooked (the
    # pre-hooks) sends every such layer to PEFT's forward, which calls them: correct, not fused.
    # (Without that check the fused op gets the shard: "aten.mm.default got mixed torch.Tensor and DTensor".)
    assert counts == {"lora_linear": 0, "multi_lora_linear": 0, "peft_forward": 14 * STEPS}, \
        f"FSDP2 LoRA units: {counts}"
    assert all(hooked(m, m.get_base_layer()) for m in _lora_layers(model)), "FSDP2 LoRA units: a layer without hooks"

    # (d) the LoRA state (the trainable parameters) of (i)'s trained model, saved with
    # torch.distributed.checkpoint (each rank its shards), loaded into a fresh FSDP2 model with other
    # LoRA factors. strict=False: the LoRA state alone leaves the base weights as they are (not "missing")
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    state = get_model_state_dict(per_layer, options=options)
    assert len(state) == 2 * 14 and all("lora_" in key for key in state), \
        f"{len(state)} tensors saved, the 28 LoRA factors expected: {sorted(state)[:4]}"
    dcp.save(state, checkpoint_id=checkpoint_dir)

    loaded_model = _sharded(_model(lora_seed=3))
    saved = _lora_params(per_layer)
    before = _lora_params(loaded_model)
    assert all(not torch.equal(before[name], saved[name]) for name in saved), "the fresh LoRA init must differ"
    state = get_model_state_dict(loaded_model, options=options)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(loaded_model, state, options=options)
    loaded = _lora_params(loaded_model)
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), f"FSDP2 checkpoint: {name} differs after loading"
    local = _half(ids, rank, world_size)
    with torch.no_grad():
        # the same weights, the same computation: equal bit for bit
        expected, got = per_layer(input_ids=local).logits, loaded_model(input_ids=local).logits
    assert torch.equal(got, expected), \
        f"FSDP2 checkpoint: logits differ after loading, max abs {(got - expected).abs().max().item():.3e}"


def test_fsdp2_units_and_checkpoint(tmp_path):
    """FSDP2 (fully_shard), AdamW, half the batch per rank: (i) a unit per decoder layer then the root,
    on the fused path; (ii) the LoRA factors' modules in units of their own as well, on PEFT's forward.
    Both: losses, gradients and LoRA parameters equal one process's full-batch run. (d) (i)'s trained
    LoRA state through torch.distributed.checkpoint into an FSDP2 model with another LoRA init: equal
    parameters, equal logits."""
    run_workers(_fsdp_worker, str(tmp_path / "lora_checkpoint"))
