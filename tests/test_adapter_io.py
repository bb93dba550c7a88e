"""read_adapter / write_adapter against PEFT's real on-disk format: adapters saved by PEFT load with the
weights and scales PEFT uses, adapters we save load in PeftModel.from_pretrained with the same outputs,
and inconsistent or unsupported files fail loudly (and are never unpickled). Offline, CPU, small."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

from lora_kernels.io import AdapterWeights, LayerAdapter, read_adapter, write_adapter  # noqa: E402

# PEFT warns about things we provoke on purpose (missing keys, lora_bias "invalid shape", embeddings).
pytestmark = pytest.mark.filterwarnings("ignore::Warning:peft")

D, H = 16, 24  # model width, projection width (different, so a transposed factor cannot pass)
TARGETS = ["q_proj", "v_proj", "o_proj"]
PATHS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in TARGETS]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.v_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, D)  # only there to be targeted by the embedding test
        self.layers = nn.ModuleList([Block(), Block()])


class TinyLM(nn.Module):
    """Module paths like a transformers decoder: model.layers.0.self_attn.q_proj."""

    def __init__(self):
        super().__init__()
        self.model = Inner()

    def forward(self, x):
        for block in self.model.layers:
            x = x + block.self_attn(x)
        return x


def base_model() -> TinyLM:
    torch.manual_seed(0)  # the same base weights every time, so a fresh base can take a saved adapter
    return TinyLM().eval()


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def make_peft_model(peft, model=None, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)  # False: B != 0
    kwargs.update(overrides)
    torch.manual_seed(1)
    return peft.get_peft_model(base_model() if model is None else model, peft.LoraConfig(**kwargs)).eval()


def peft_lora_layers(model, peft):
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


VARIANTS = {
    "plain": {},
    "rslora": dict(use_rslora=True, lora_alpha=6),
    "patterns": dict(rank_pattern={"model.layers.1.self_attn.q_proj": 2, "o_proj": 6},
                     alpha_pattern={"v_proj": 3, "layers.0.self_attn.o_proj": 5}),
    "rslora_patterns": dict(use_rslora=True, rank_pattern={"q_proj": 3},
                            alpha_pattern={"layers.1.self_attn.v_proj": 10}),
    "lora_bias": dict(r=3, lora_alpha=7, lora_bias=True),
}


@pytest.fixture(params=list(VARIANTS))
def saved_by_peft(request, peft, tmp_path):
    """(PEFT model, directory it was saved to) for each config variant."""
    model = make_peft_model(peft, **VARIANTS[request.param])
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


@pytest.fixture
def plain_dir(peft, tmp_path):
    """A PEFT-saved plain adapter: (its tensors, its config, a directory to rewrite them into)."""
    make_peft_model(peft).save_pretrained(tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    return tensors, config, tmp_path / "edited"


def write(directory, tensors=None, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file(tensors, directory / "adapter_model.safetensors")
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def key(path, param="lora_A.weight"):
    return f"base_model.model.{path}.{param}"


def merged_forward(adapter: AdapterWeights, x, skip=()):
    """The function an adapter defines, without PEFT: W += s·BA, b += s·bias, on a fresh base."""
    model = base_model()
    with torch.no_grad():
        for name, layer in adapter.layers.items():
            if name in skip:
                continue
            linear = model.get_submodule(name)
            linear.weight += layer.scale * (layer.lora_b @ layer.lora_a)
            if layer.lora_bias is not None:
                linear.bias += layer.scale * layer.lora_bias
        return model(x)


# ---------------------------------------------------------------------------------------------------
# PEFT -> read_adapter


def test_peft_layout_is_what_we_expect(saved_by_peft):
    _, path = saved_by_peft
    keys = set(load_file(path / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert not any(".default." in k for k in keys)  # the adapter name is not saved
    assert {k for k in keys if k.endswith(".lora_A.weight")} == {key(p) for p in PATHS}
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_load_matches_peft_weights_and_scales(saved_by_peft, peft):
    model, path = saved_by_peft
    adapter = read_adapter(path)
    layers = peft_lora_layers(model, peft)
    assert set(adapter.layers) == set(layers) == set(PATHS)
    for name, layer in adapter.layers.items():
        ref = layers[name]
        assert torch.equal(layer.lora_a, ref.lora_A["default"].weight), name
        assert torch.equal(layer.lora_b, ref.lora_B["default"].weight), name
        assert layer.lora_a.shape == (ref.r["default"], ref.in_features)
        assert layer.lora_b.shape == (ref.out_features, ref.r["default"])
        assert layer.scale == ref.scaling["default"], name  # same expression, so the same float
        if ref.lora_bias["default"]:
            assert torch.equal(layer.lora_bias, ref.lora_B["default"].bias), name
        else:
            assert layer.lora_bias is None
    assert adapter.config == json.loads((path / "adapter_config.json").read_text())


def test_patterns_give_per_module_ranks_and_scales(peft, tmp_path):
    make_peft_model(peft, **VARIANTS["patterns"]).save_pretrained(tmp_path)
    layers = read_adapter(tmp_path).layers
    got = {name: (layer.rank, layer.scale) for name, layer in layers.items()}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 8 / 4),
        "model.layers.0.self_attn.v_proj": (4, 3 / 4),
        "model.layers.0.self_attn.o_proj": (6, 5 / 6),
        "model.layers.1.self_attn.q_proj": (2, 8 / 2),
        "model.layers.1.self_attn.v_proj": (4, 3 / 4),
        "model.layers.1.self_attn.o_proj": (6, 8 / 6),
    }


def test_rslora_scale(peft, tmp_path):
    make_peft_model(peft, **VARIANTS["rslora_patterns"]).save_pretrained(tmp_path)
    layers = read_adapter(tmp_path).layers
    assert layers["model.layers.0.self_attn.q_proj"].scale == 8 / math.sqrt(3)
    assert layers["model.layers.1.self_attn.v_proj"].scale == 10 / math.sqrt(4)
    assert layers["model.layers.1.self_attn.o_proj"].scale == 8 / math.sqrt(4)


def test_pattern_order_as_peft_saves_it(peft, tmp_path):
    """PEFT matches rank_pattern keys first-match-wins, but save_pretrained writes the config with
    sort_keys=True, so overlapping keys can resolve differently after a save. We resolve in the file's
    order, like PeftModel.from_pretrained: the file is then inconsistent and both refuse it."""
    rank_pattern = {"q_proj": 2, "model.layers.1.self_attn.q_proj": 3}  # in memory: "q_proj" wins everywhere
    model = make_peft_model(peft, rank_pattern=rank_pattern)
    model.save_pretrained(tmp_path)
    on_disk = list(json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"])
    if on_disk == list(rank_pattern):  # a PEFT that keeps the order: loads as trained
        assert read_adapter(tmp_path).layers["model.layers.1.self_attn.q_proj"].rank == 2
    else:
        with pytest.raises(ValueError, match=r"rank 2.*rank_pattern\['model.layers.1.self_attn.q_proj'\]=3"):
            read_adapter(tmp_path)
        with pytest.raises(RuntimeError, match="size mismatch"):
            peft.PeftModel.from_pretrained(base_model(), tmp_path)


def test_file_path_dtype_and_keys_without_prefix(plain_dir):
    tensors, config, directory = plain_dir
    write(directory, tensors, config)
    full = read_adapter(directory)
    half = read_adapter(directory / "adapter_model.safetensors", device=torch.device("cpu"), dtype=torch.bfloat16)
    assert set(half.layers) == set(full.layers)
    for name, layer in half.layers.items():
        assert layer.lora_a.dtype == layer.lora_b.dtype == torch.bfloat16
        assert torch.equal(layer.lora_a, full.layers[name].lora_a.bfloat16())
    # transformers' own PEFT integration saves keys without the base_model.model. prefix
    bare = write(directory.parent / "bare", {k.removeprefix("base_model.model."): v for k, v in tensors.items()},
                 config)
    assert {n: (la.lora_a, la.scale) for n, la in read_adapter(bare).layers.items()}.keys() == full.layers.keys()


def test_safetensors_load_never_calls_torch_load(plain_dir, monkeypatch):
    tensors, config, directory = plain_dir
    write(directory, tensors, config)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    assert len(read_adapter(directory).layers) == len(PATHS)


# ---------------------------------------------------------------------------------------------------
# write_adapter -> PEFT


def test_write_adapter_loads_in_peft_with_same_output(saved_by_peft, peft, tmp_path):
    model, path = saved_by_peft
    adapter = read_adapter(path)
    write_adapter(tmp_path / "ours", adapter)

    x = torch.randn(5, D, generator=torch.Generator().manual_seed(2))
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, base_model()(x))  # the adapter does something
        assert torch.equal(reloaded(x), expected)
        torch.testing.assert_close(merged_forward(adapter, x), expected, rtol=1e-4, atol=1e-4)

    # the config came through (its rank/alpha fields are what PEFT trained with) and so did the tensors
    original = json.loads((path / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "lora_bias"):
        assert ours[field] == original[field], field
    assert ours["init_lora_weights"] is True
    assert load_file(tmp_path / "ours" / "adapter_model.safetensors").keys() == \
        load_file(path / "adapter_model.safetensors").keys()
    again = read_adapter(tmp_path / "ours")
    for name, layer in adapter.layers.items():
        assert torch.equal(again.layers[name].lora_a, layer.lora_a)
        assert torch.equal(again.layers[name].lora_b, layer.lora_b)
        assert again.layers[name].scale == layer.scale


@pytest.mark.parametrize("use_rslora", [False, True])
def test_save_from_scratch_loads_in_peft(peft, tmp_path, use_rslora):
    """Hand-built layers (mixed ranks, arbitrary scales, a bias on one layer only) and a near-empty
    config: write_adapter writes r / lora_alpha / patterns / target_modules that PEFT turns back into
    exactly these layers."""
    g = torch.Generator().manual_seed(3)
    ranks = {"q_proj": 2, "v_proj": 4, "o_proj": 3}
    layers = {}
    for i, path in enumerate(PATHS):
        proj = path.rsplit(".", 1)[1]
        k, n = (H, D) if proj == "o_proj" else (D, H)
        r = ranks[proj]
        layers[path] = LayerAdapter(torch.randn(r, k, generator=g), torch.randn(n, r, generator=g),
                                    scale=[0.37, 1.5, -0.25, 2.0, 0.37, 1.0][i])
    layers[PATHS[0]].lora_bias = torch.randn(H, generator=g)
    adapter = AdapterWeights(layers, config={"use_rslora": use_rslora} if use_rslora else {})
    write_adapter(tmp_path, adapter)

    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    peft_layers = peft_lora_layers(reloaded, peft)
    assert set(peft_layers) == set(PATHS)
    for name, layer in layers.items():
        ref = peft_layers[name]
        assert ref.r["default"] == layer.rank
        assert math.isclose(ref.scaling["default"], layer.scale, rel_tol=1e-12)
        assert torch.equal(ref.lora_A["default"].weight, layer.lora_a)
        assert torch.equal(ref.lora_B["default"].weight, layer.lora_b)
        bias = layer.lora_bias if layer.lora_bias is not None else torch.zeros(layer.out_features)
        assert torch.equal(ref.lora_B["default"].bias, bias)  # zeros where a layer had none
    x = torch.randn(5, D, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), merged_forward(adapter, x), rtol=1e-4, atol=1e-4)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is use_rslora
    assert config["target_modules"] == sorted(PATHS) and config["lora_bias"] is True
    back = read_adapter(tmp_path)
    for name, layer in layers.items():
        assert math.isclose(back.layers[name].scale, layer.scale, rel_tol=1e-12)


def test_edited_adapter_saves_a_matching_config(peft, tmp_path):
    """Change one scale and drop one layer: the config is rewritten for the scale, and the dropped
    layer (still matched by target_modules) starts at B = 0 in PEFT, adding nothing."""
    model = make_peft_model(peft)
    model.save_pretrained(tmp_path / "peft")
    adapter = read_adapter(tmp_path / "peft")
    adapter.layers["model.layers.0.self_attn.v_proj"].scale = 0.5
    dropped = "model.layers.1.self_attn.o_proj"
    del adapter.layers[dropped]
    write_adapter(tmp_path / "ours", adapter)

    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(TARGETS)  # still covers every layer: kept
    assert config["alpha_pattern"] == {"model.layers.0.self_attn.v_proj": 2}  # 0.5 * r=4
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path / "ours").eval()
    assert peft_lora_layers(reloaded, peft)["model.layers.0.self_attn.v_proj"].scaling["default"] == 0.5
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), merged_forward(adapter, x), rtol=1e-4, atol=1e-4)


def test_save_keeps_pattern_order(peft, tmp_path):
    """A config whose overlapping rank_pattern keys resolve first-match-wins is written in its own
    order (PEFT's sort_keys=True would change what it means), and target_modules may be a set."""
    model = make_peft_model(peft, rank_pattern={"q_proj": 2, "model.layers.1.self_attn.q_proj": 3})
    layers = {name: LayerAdapter(m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(),
                                 m.scaling["default"]) for name, m in peft_lora_layers(model, peft).items()}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": set(TARGETS),
              "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.q_proj": 3}}
    write_adapter(tmp_path, AdapterWeights(layers, config))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(written["rank_pattern"]) == ["q_proj", "model.layers.1.self_attn.q_proj"]
    assert written["target_modules"] == sorted(TARGETS)
    assert read_adapter(tmp_path).layers["model.layers.1.self_attn.q_proj"].rank == 2
    reloaded = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_overlapping_paths_get_anchored_pattern_keys(peft, tmp_path):
    """A root-level module 'q' and 'a.q': the key 'q' would match both, so write_adapter anchors it."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.a = nn.Linear(D, D), nn.Module()
            self.a.q = nn.Linear(D, D)

        def forward(self, x):
            return self.a.q(self.q(x))

    g = torch.Generator().manual_seed(5)
    adapter = AdapterWeights({"q": LayerAdapter(torch.randn(2, D, generator=g), torch.randn(D, 2, generator=g), 1.0),
                              "a.q": LayerAdapter(torch.randn(4, D, generator=g), torch.randn(D, 4, generator=g), 3.0)})
    write_adapter(tmp_path, adapter)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"^q": 2}
    assert {n: (la.rank, la.scale) for n, la in read_adapter(tmp_path).layers.items()} == {"q": (2, 1.0),
                                                                                          "a.q": (4, 3.0)}
    layers = peft_lora_layers(peft.PeftModel.from_pretrained(Model(), tmp_path), peft)
    assert {n: (m.r["default"], m.scaling["default"]) for n, m in layers.items()} == {"q": (2, 1.0),
                                                                                     "a.q": (4, 3.0)}


def test_save_accepts_views_and_non_contiguous(tmp_path):
    buffer = torch.randn(4, 8)
    a = buffer[:2]  # shares memory with b
    b = buffer[2:].T  # (8, 2), not contiguous
    write_adapter(tmp_path, AdapterWeights({"layer": LayerAdapter(a, b, 1.0)}))
    layer = read_adapter(tmp_path).layers["layer"]
    assert torch.equal(layer.lora_a, a) and torch.equal(layer.lora_b, b)


def test_save_errors(tmp_path):
    a, b = torch.randn(4, 16), torch.randn(24, 4)
    with pytest.raises(ValueError, match=r"lora_b has shape \(24, 3\); expected \(N, 4\)"):
        write_adapter(tmp_path, AdapterWeights({"q": LayerAdapter(a, torch.randn(24, 3), 1.0)}))
    with pytest.raises(ValueError, match=r"lora_bias is \(16,\); expected a floating-point \(24,\)"):
        write_adapter(tmp_path, AdapterWeights({"q": LayerAdapter(a, b, 1.0, lora_bias=torch.zeros(16))}))
    with pytest.raises(ValueError, match="without the 'base_model.model.' prefix"):
        write_adapter(tmp_path, AdapterWeights({"base_model.model.q": LayerAdapter(a, b, 1.0)}))
    with pytest.raises(ValueError, match="2-D"):
        write_adapter(tmp_path, AdapterWeights({"q": LayerAdapter(a[0], b, 1.0)}))
    with pytest.raises(ValueError, match="scale=nan"):
        write_adapter(tmp_path, AdapterWeights({"q": LayerAdapter(a, b, float("nan"))}))
    with pytest.raises(ValueError, match="empty"):
        write_adapter(tmp_path, AdapterWeights({}))
    with pytest.raises(NotImplementedError, match="DoRA"):
        write_adapter(tmp_path, AdapterWeights({"q": LayerAdapter(a, b, 1.0)}, config={"use_dora": True}))
    with pytest.raises(TypeError, match="AdapterWeights"):
        write_adapter(tmp_path, {"q": LayerAdapter(a, b, 1.0)})
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        write_adapter(tmp_path, AdapterWeights({"q": LayerAdapter(a, b, 1.0)}, config={"note": object()}))
    assert not (tmp_path / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# bad input


def test_missing_files(plain_dir, tmp_path):
    tensors, _, directory = plain_dir
    with pytest.raises(FileNotFoundError, match="no LoRA adapter"):
        read_adapter(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        read_adapter(write(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        read_adapter(write(directory, tensors))


@pytest.mark.parametrize("drop", ["lora_A.weight", "lora_B.weight"])
def test_unpaired_factor(plain_dir, drop):
    tensors, config, directory = plain_dir
    path = PATHS[2]
    del tensors[key(path, drop)]
    keep = "lora_B.weight" if drop == "lora_A.weight" else "lora_A.weight"
    with pytest.raises(ValueError, match=rf"{key(path, keep)} has no matching {key(path, drop)}"):
        read_adapter(write(directory, tensors, config))


def test_shape_mismatch_between_a_and_b(plain_dir):
    tensors, config, directory = plain_dir
    tensors[key(PATHS[0], "lora_B.weight")] = torch.randn(H, 3)
    with pytest.raises(ValueError, match=r"q_proj.lora_B.weight has shape \(24, 3\); expected \(N, 4\) to match "
                                         r".*q_proj.lora_A.weight of shape \(4, 16\)"):
        read_adapter(write(directory, tensors, config))


@pytest.mark.parametrize("edit, where", [({"r": 8}, "r=8"),
                                         ({"rank_pattern": {"v_proj": 2}}, r"rank_pattern\['v_proj'\]=2")])
def test_rank_disagrees_with_config(plain_dir, edit, where):
    tensors, config, directory = plain_dir
    match = rf"lora_A.weight has shape \(4, \d+\), rank 4; adapter_config.json gives {where}"
    with pytest.raises(ValueError, match=match):
        read_adapter(write(directory, tensors, {**config, **edit}))


def test_malformed_tensors(plain_dir):
    tensors, config, directory = plain_dir
    for bad, err, match in [(torch.randn(16), ValueError, r"shape \(16,\); expected a 2-D"),
                            (torch.randn(4, 16, 1, 1), NotImplementedError, "convolution"),
                            (torch.ones(4, 16, dtype=torch.int32), ValueError, "int32")]:
        edited = {**tensors, key(PATHS[0]): bad}
        with pytest.raises(err, match=match):
            read_adapter(write(directory, edited, config))
    with pytest.raises(ValueError, match="lora_B.bias is present but adapter_config.json has lora_bias=false"):
        read_adapter(write(directory, {**tensors, key(PATHS[0], "lora_B.bias"): torch.zeros(H)}, config))
    with pytest.raises(ValueError, match="lora_bias=true but .*lora_B.bias is missing"):
        read_adapter(write(directory, tensors, {**config, "lora_bias": True}))
    with pytest.raises(ValueError, match="adapter name between"):
        read_adapter(write(directory, {k.replace("lora_A.", "lora_A.default."): v for k, v in tensors.items()}, config))
    with pytest.raises(NotImplementedError, match="classifier.weight.*not a LoRA linear factor"):
        read_adapter(write(directory, {**tensors, "base_model.model.classifier.weight": torch.zeros(2, 2)}, config))


def test_bad_config(plain_dir):
    tensors, config, directory = plain_dir
    write(directory, tensors)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter(directory)
    without_type = {k: v for k, v in config.items() if k != "peft_type"}
    with pytest.raises(ValueError, match="no 'peft_type'"):
        read_adapter(write(directory, config=without_type))
    with pytest.raises(ValueError, match="r=0"):
        read_adapter(write(directory, config={**config, "r": 0}))


def test_not_safetensors(plain_dir):
    _, config, directory = plain_dir
    write(directory, config=config)
    (directory / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        read_adapter(directory)


class Exploit:
    """Unpickling this writes a file: proof that something was unpickled unsafely."""

    marker = None

    def __reduce__(self):
        return (open, (str(Exploit.marker), "w"))


def test_pickles_are_never_unpickled_unsafely(plain_dir, tmp_path):
    _, config, _ = plain_dir
    Exploit.marker = tmp_path / "pwned"

    evil = write(tmp_path / "evil", config=config)
    torch.save({key(PATHS[0]): Exploit()}, evil / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"pickle-based checkpoint .* not unpickled.*allow_legacy_bin=True"):
        read_adapter(evil)
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\) refused"):
        read_adapter(evil, allow_legacy_bin=True)
    (evil / "adapter_model.bin").rename(evil / "adapter_model.safetensors")  # a pickle under the safe name
    with pytest.raises(ValueError, match=r"not a valid safetensors file .*looks like a torch.save pickle"):
        read_adapter(evil)
    assert not Exploit.marker.exists()


def test_legacy_bin_only_with_weights_only(plain_dir, tmp_path, monkeypatch):
    tensors, config, directory = plain_dir
    legacy = write(tmp_path / "legacy", config=config)
    torch.save(tensors, legacy / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle-based checkpoint"):
        read_adapter(legacy)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    adapter = read_adapter(legacy, allow_legacy_bin=True)
    assert calls == [True]
    reference = read_adapter(write(directory, tensors, config))
    for name, layer in reference.layers.items():
        assert torch.equal(adapter.layers[name].lora_a, layer.lora_a)
        assert torch.equal(adapter.layers[name].lora_b, layer.lora_b)
        assert adapter.layers[name].scale == layer.scale


@pytest.mark.parametrize("overrides, match", [
    (dict(use_dora=True), "DoRA"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "embedding"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["model.layers.1.self_attn.o_proj"], target_modules=["q_proj"]), "modules_to_save"),
], ids=["dora", "embedding", "bias_all", "modules_to_save"])
def test_unsupported_peft_adapters(peft, tmp_path, overrides, match):
    make_peft_model(peft, **overrides).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match=match):
        read_adapter(tmp_path)


def test_unsupported_conv_adapter(peft, tmp_path):
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, 3))
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["conv"])).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match=r"shape \(2, 3, 3, 3\): LoRA on a convolution"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("edit, match", [
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*rewritten base weights"),
    ({"peft_type": "LOHA"}, "peft_type='LOHA'"),
    ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
])
def test_unsupported_config(plain_dir, edit, match):
    tensors, config, directory = plain_dir
    with pytest.raises(NotImplementedError, match=match):
        read_adapter(write(directory, tensors, {**config, **edit}))


def test_dora_magnitude_key_without_dora_config(plain_dir):
    tensors, config, directory = plain_dir
    tensors[f"base_model.model.{PATHS[0]}.lora_magnitude_vector"] = torch.ones(H)
    with pytest.raises(NotImplementedError, match="DoRA"):
        read_adapter(write(directory, tensors, config))


# ---------------------------------------------------------------------------------------------------
# packaging


def test_import_needs_neither_safetensors_nor_peft():
    code = ("import sys, lora_kernels, lora_kernels.io; "
            "assert 'safetensors' not in sys.modules and 'peft' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
