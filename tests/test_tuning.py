"""The plan tables (lora_kernels.tuning) and the tuner (lora_kernels.tune): lookups, table files that
cannot serve (a warning and the defaults), the cache directory, the tuner's choice, checks, refusals and
time budget, the model's shapes and the command line. The tuner runs the real launchers (interpreted
on CPU) on tiny fp32 shapes, with a fake timer and a monkeypatched candidate list."""

import json
import subprocess
import sys
import types
import warnings

import pytest
import torch

from lora_kernels import tune as tune_module
from lora_kernels import tuning
from lora_kernels.tuning import MatmulConfig, Plan
from tests.helpers import DEVICE

FUSED_A = MatmulConfig(block_m=16, block_n=16, block_k=16, block_r=16, group_m=8, num_warps=4, num_stages=2)
FUSED_B = MatmulConfig(block_m=16, block_n=32, block_k=16, block_r=16, group_m=8, num_warps=4, num_stages=2, split_k=2)
FUSED_C = MatmulConfig(block_m=32, block_n=16, block_k=16, block_r=16, group_m=4, num_warps=4, num_stages=2)


@pytest.fixture(autouse=True)
def tuning_dir(tmp_path, monkeypatch):
    """A fresh user cache per test, and no table loaded before or kept after it."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", str(cache))
    tuning.clear_tables()
    yield cache
    tuning.clear_tables()


def entry(op="forward", dtype="float32", m=64, n=48, k=32, rank=8, strategy="fused", config=FUSED_A,
          fp32_precision=None):
    """A table entry; a float32 one measured at fp32_precision (default: the current precision)."""
    doc = {"op": op, "dtype": dtype, "m": m, "n": n, "k": k, "rank": rank, "strategy": strategy,
           "config": None if config is None else dict(vars(config)), "times_ms": {}, "skipped": {}}
    if dtype == "float32":
        doc["fp32_precision"] = fp32_precision or tuning.fp32_precision_now()
    return doc


def table(entries, kind=None, **fields):
    doc = {"format": tuning.FORMAT, "version": tuning.FORMAT_VERSION, "device_kind": kind or tuning.device_kind(DEVICE),
           "device_name": tuning.device_name(DEVICE), "torch": torch.__version__, "triton": None, "entries": entries}
    return json.dumps({**doc, **fields})


def write_user_table(text: str):
    path = tuning.user_table_path(DEVICE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def lookup(op="forward", m=64, n=48, k=32, rank=8, dtype=torch.float32):
    return tuning.plan_for(op, DEVICE, dtype, m, n, k, rank)


# ----------------------------------------------------------------------------- lookups


def test_lookup_hit_serves_the_bucket_and_a_miss_gets_split():
    write_user_table(table([entry(m=64, rank=8), entry(op="dx", m=4096, n=32, k=48, rank=64, strategy="split",
                                                     config=None)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup(m=64) == Plan("fused", FUSED_A)
        assert lookup(m=33, rank=16) == Plan("fused", FUSED_A)         # M bucket 64, rank bucket 16
        assert lookup(m=65) == tuning.SPLIT                             # bucket 128
        assert lookup(m=64, dtype=torch.float16) == tuning.SPLIT
        assert lookup(op="dx") == tuning.SPLIT
        assert lookup(m=64, n=32, k=48) == tuning.SPLIT
        assert lookup(op="dx", m=3000, n=32, k=48, rank=40) == tuning.SPLIT
        with tuning.forced_plan(Plan("fused", FUSED_B)):
            assert lookup(m=65) == Plan("fused", FUSED_B)
        with tuning.forced_plan("split"):
            assert lookup(m=64) == tuning.SPLIT


def test_no_table_anywhere_gives_the_default():
    assert not tuning.user_table_path(DEVICE).exists()
    assert lookup() == tuning.DEFAULT_PLAN == tuning.SPLIT


def test_tables_are_read_once_until_cleared(monkeypatch):
    write_user_table(table([entry()]))
    reads = []
    real_read = tuning.read_table
    monkeypatch.setattr(tuning, "read_table", lambda path, kind: reads.append(path) or real_read(path, kind))
    assert lookup() == Plan("fused", FUSED_A)
    assert lookup(m=33) == lookup() == Plan("fused", FUSED_A)
    assert len(reads) == 1
    write_user_table(table([entry(config=FUSED_C)]))
    assert lookup() == Plan("fused", FUSED_A)                           # still the table read first
    tuning.clear_tables()
    assert lookup() == Plan("fused", FUSED_C)
    assert len(reads) == 2


def test_user_cache_wins_over_the_shipped_table(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    (shipped / f"{tuning.device_kind(DEVICE)}.json").write_text(
        table([entry(config=FUSED_B), entry(n=96, config=FUSED_B)]))
    write_user_table(table([entry(config=FUSED_C)]))
    assert lookup() == Plan("fused", FUSED_C)
    assert lookup(n=96) == Plan("fused", FUSED_B)


def test_shipped_configs_dir_loads_without_tables():
    """No table is measured yet: the package's configs/ holds only its README, and loading copes."""
    assert tuning.SHIPPED_DIR.is_dir()
    assert tuning.load_tables(torch.device("cpu")) == {}


def test_plan_key_inlines_the_buckets():
    for m in [1, 15, 16, 17, 31, 32, 33, 1000, 1024, 1025]:
        for rank in [1, 8, 16, 17, 64, 65]:
            key = tuning.plan_key("dx", torch.bfloat16, m, 7, 9, rank)
            assert key == ("dx", "bfloat16", tuning.m_bucket(m), 7, 9, tuning.rank_bucket(rank))


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"),
    ("NVIDIA H100 NVL", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("AMD Instinct MI300X", "mi300x"), ("NVIDIA", "cuda"),
])
def test_gpu_slug(name, slug):
    assert tuning.gpu_slug(name) == slug


def test_device_kind(monkeypatch):
    assert tuning.device_kind("cpu") == tuning.device_kind(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert tuning.device_kind(torch.device("cuda", 0)) == "h100"
    assert tuning.user_table_path("cuda:0").name == "h100.json"


def test_tuning_dir_from_env(tmp_path, monkeypatch):
    assert tuning.user_table_path("cpu") == tmp_path / "cache" / "cpu.json"
    monkeypatch.delenv("LORA_KERNELS_TUNING_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.user_table_path("cpu") == tmp_path / "xdg" / "lora_kernels" / "cpu.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.user_table_path("cpu") == tmp_path / "home" / ".cache" / "lora_kernels" / "cpu.json"
    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", "  ")                 # blank: unset
    assert tuning.user_table_path("cpu") == tmp_path / "home" / ".cache" / "lora_kernels" / "cpu.json"


# ----------------------------------------------------------------------------- files that cannot serve


@pytest.mark.parametrize("text, reason", [
    ("{not json", "unreadable"),
    ("\udcff", "unreadable"),
    ("[]", "not a plan table"),
    (json.dumps({"format": "something else"}), "not a plan table"),
    (table([entry()], version=2), "format version 2"),
    (table([entry()], kind="h100", device_name="NVIDIA H100 80GB HBM3"), "measured on 'NVIDIA H100 80GB HBM3'"),
    (table({"forward": 1}), "is not a list"),
])
def test_a_table_that_cannot_serve_warns_and_gives_the_defaults(text, reason):
    path = tuning.user_table_path(DEVICE)
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.warns(UserWarning, match="plan table .*cache") as record:
        assert lookup() == tuning.SPLIT
    assert len(record) == 1 and reason in str(record[0].message) and str(path) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup() == tuning.SPLIT                                 # warned once: the table is remembered


@pytest.mark.parametrize("bad, reason", [
    (entry(strategy="fastest"), "strategy 'fastest'"),
    (entry(strategy="split"), "split strategy takes no config"),
    (entry(op="backward"), "op 'backward'"),
    (entry(dtype="float99"), "dtype 'float99'"),
    (entry(dtype="Tensor"), "dtype 'Tensor'"),
    (entry(m=0), "positive integers"),
    (entry(rank=8.0), "positive integers"),
    ({**entry(), "config": {**vars(FUSED_A), "block_m": 48}}, "powers of two"),
    ({**entry(), "config": {**vars(FUSED_A), "num_stages": 0}}, "positive integers"),
    ({**entry(), "config": {**vars(FUSED_A), "tile": 3}}, "unknown ['tile']"),
    ({**entry(), "config": {"block_m": 16}}, "missing"),
    ({**entry(), "config": [16, 16]}, "expected an object"),
    ({k: v for k, v in entry().items() if k != "n"}, "lacks ['n']"),
    ("forward", "is not an object"),
])
def test_a_bad_entry_is_skipped_with_a_warning(bad, reason):
    path = write_user_table(table([bad, entry(n=96, config=FUSED_B)]))
    with pytest.warns(UserWarning, match="entry 0 skipped") as record:
        assert lookup() == tuning.SPLIT
    assert len(record) == 1 and reason in str(record[0].message) and str(path) in str(record[0].message)
    assert lookup(n=96) == Plan("fused", FUSED_B)                       # the good entry still serves


def test_fused_with_the_heuristic_config_is_a_valid_entry():
    write_user_table(table([entry(config=None)]))
    assert lookup() == Plan("fused")


# ----------------------------------------------------------------------------- the tuner


def fake_timer(times: dict, calls: list):
    """Milliseconds per plan name; the timer runs under the forced plan, which plan_for returns."""
    def timer(fn):
        name = tuning.plan_name(lookup())
        calls.append(name)
        fn()
        return times[name]
    return timer


def tiny_tune(**kwargs):
    args = dict(tokens=[24], ranks=[4], dtype=torch.float32, device=DEVICE, verbose=False)
    return tune_module.tune([(32, 48)], **{**args, **kwargs})


@pytest.fixture
def candidates(monkeypatch):
    """fused_candidates -> FUSED_A, FUSED_B, FUSED_C for every shape (the search space under test is the
    tuner's bookkeeping, not the kernels' configs)."""
    from lora_kernels.triton import lora_linear

    monkeypatch.setattr(lora_linear, "fused_candidates", lambda op, m, n, k, rank, dtype: [FUSED_A, FUSED_B, FUSED_C],
                        raising=False)
    return lora_linear


A, B, C = (tuning.plan_name(Plan("fused", cfg)) for cfg in (FUSED_A, FUSED_B, FUSED_C))


def test_tuner_writes_the_fastest_and_the_next_lookup_reads_it(candidates, tuning_dir):
    # a table already there: its other entries stay; the shape measured again is replaced
    write_user_table(table([entry(n=999, config=FUSED_C), entry(m=24, n=48, k=32, rank=4, config=FUSED_C)]))
    assert lookup(m=24, rank=4) == Plan("fused", FUSED_C)               # loaded before tuning
    calls = []
    result = tiny_tune(timer=fake_timer({"split": 3.0, A: 2.0, B: 1.0, C: 1.5}, calls))
    assert result.complete and result.path == tuning.user_table_path(DEVICE)
    assert calls == ["split", A, B, C] * 2                              # forward, then dx
    assert lookup(m=24, n=48, k=32, rank=4) == Plan("fused", FUSED_B)   # no clear_tables: the tuner did it
    assert lookup(op="dx", m=24, n=32, k=48, rank=4) == Plan("fused", FUSED_B)
    assert lookup(n=999) == Plan("fused", FUSED_C)
    doc = json.loads(result.path.read_text())
    assert doc["device_kind"] == tuning.device_kind(DEVICE) and doc["torch"] == torch.__version__
    measured = [e for e in doc["entries"] if e["n"] != 999]
    assert [(e["op"], e["m"], e["n"], e["k"], e["rank"]) for e in measured] == [("forward", 24, 48, 32, 4),
                                                                                ("dx", 24, 32, 48, 4)]
    assert measured[0]["times_ms"] == {"split": 3.0, A: 2.0, B: 1.0, C: 1.5} and measured[0]["skipped"] == {}
    assert measured[0]["config"] == vars(FUSED_B)


def test_tuner_keeps_split_when_it_is_fastest_or_tied(candidates):
    result = tiny_tune(timer=fake_timer({"split": 1.0, A: 1.0, B: 2.0, C: 1.0}, []), ops=["forward"])
    assert result.entries[0]["strategy"] == "split" and result.entries[0]["config"] is None
    assert lookup(m=24, rank=4) == tuning.SPLIT


def test_tuner_skips_a_candidate_whose_output_is_wrong_or_that_raises(candidates, monkeypatch):
    real_forward = candidates.lora_linear_forward

    def forward(*args):
        config = lookup().config
        if config == FUSED_C:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448\nmore")
        y, hidden = real_forward(*args)
        return (y + 0.1 * y.abs().max() if config == FUSED_B else y), hidden

    monkeypatch.setattr(candidates, "lora_linear_forward", forward)
    calls = []
    result = tiny_tune(timer=fake_timer({"split": 3.0, A: 2.0, B: 0.5, C: 0.1}, calls), ops=["forward"])
    (measured,) = result.entries
    assert calls == ["split", A]                                        # B and C never timed
    assert measured["config"] == vars(FUSED_A) and measured["times_ms"] == {"split": 3.0, A: 2.0}
    assert measured["skipped"][B].startswith("max |out - split's out|")
    assert measured["skipped"][C] == ("RuntimeError: out of resource: shared memory, Required: 262144, "
                                      "Hardware limit: 232448")                # its first line


def test_tuner_stops_at_the_time_budget_and_keeps_what_it_measured(candidates, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tune_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def timer(fn):   # each measurement takes a second
        clock[0] += 1.0
        return 1.0 if lookup() == tuning.SPLIT else 2.0

    result = tiny_tune(timer=timer, tokens=[24, 100], ops=["forward"], time_budget_s=5.5)
    assert not result.complete
    assert [e["m"] for e in result.entries] == [24]                     # 4 candidates at M = 24; M = 128 stopped
    assert lookup(m=24, rank=4) == tuning.SPLIT and json.loads(result.path.read_text())["entries"] == result.entries

    clock[0] = 0.0
    result = tiny_tune(timer=timer, tokens=[100], ops=["forward"], time_budget_s=1.5)
    assert not result.complete and result.entries == [] and result.path is None


def test_tuner_measures_one_token_count_and_rank_per_bucket(candidates):
    result = tiny_tune(timer=lambda fn: 1.0, tokens=[1, 16, 17, 32, 5],
                       ranks=[4, 16, 20], ops=["forward"])
    assert [(e["m"], e["rank"]) for e in result.entries] == [(16, 16), (32, 16), (16, 20), (32, 20)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: do_bench times CUDA events")
def test_tuner_times_real_candidates_with_do_bench(monkeypatch):
    from lora_kernels.triton import lora_linear

    configs = lora_linear.fused_candidates("forward", 256, 1024, 1024, 16, torch.bfloat16)[:2]   # 2 compiles, ~5 s
    monkeypatch.setattr(lora_linear, "fused_candidates", lambda op, m, n, k, rank, dtype: configs)
    result = tune_module.tune([(1024, 1024)], tokens=[256], ranks=[16], dtype=torch.bfloat16, ops=["forward"],
                              verbose=False)
    (measured,) = result.entries
    names = {"split"} | {tuning.plan_name(Plan("fused", cfg)) for cfg in configs}
    assert set(measured["times_ms"]) | set(measured["skipped"]) == names and "split" in measured["times_ms"]
    assert all(0 < ms < 100 for ms in measured["times_ms"].values()), measured["times_ms"]
    best = min(measured["times_ms"], key=measured["times_ms"].get)
    assert tuning.plan_name(lookup(m=256, n=1024, k=1024, rank=16, dtype=torch.bfloat16)) == best


def test_tuner_refuses_another_devices_table_before_measuring(candidates, tmp_path):
    output = tmp_path / "other.json"
    output.write_text(table([entry()], kind="h100", device_name="NVIDIA H100 80GB HBM3"))
    calls = []
    with pytest.raises(ValueError, match="holds the plans of 'NVIDIA H100 80GB HBM3'"):
        tiny_tune(timer=fake_timer({}, calls), output=output)
    assert calls == []


def test_tuner_refuses_during_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during CUDA-graph capture"):
        tiny_tune(timer=lambda fn: 1.0)


def test_tuner_refuses_while_dynamo_traces(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="inside a torch.compile trace"):
        tiny_tune(timer=lambda fn: 1.0)


def test_tuner_refuses_inside_a_compiled_function(tmp_path):
    """Dynamo falls back to eager at the refusal's graph break, where is_compiling() is False: the
    refusal must still hold there."""
    def compiled(x):
        tiny_tune(timer=lambda fn: 1.0, output=tmp_path / "t.json")
        return x + 1

    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="inside a torch.compile trace"):
        torch.compile(compiled, backend="eager")(torch.zeros(2))
    assert not (tmp_path / "t.json").exists()


# ----------------------------------------------------------------------------- model shapes and the command line


@pytest.fixture
def llama_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=1, vocab_size=128)
    path = tmp_path / "llama"
    config.save_pretrained(path)
    return path


def test_model_shapes_from_a_transformers_config(llama_dir):
    # q (64, 64), k = v (64, 32: 2 kv heads of 16), o (64, 64) = q, gate = up (64, 160), down (160, 64)
    assert tune_module.model_shapes(str(llama_dir)) == ([(64, 64), (64, 32), (64, 160), (160, 64)], [])


def test_model_shapes_from_a_peft_adapter_dir(llama_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"base_model_name_or_path": str(llama_dir), "r": 8, "target_modules": ["v_proj", "q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert tune_module.model_shapes(str(adapter)) == ([(64, 64), (64, 32)], [8])
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "all-linear"}))
    assert tune_module.model_shapes(str(adapter)) == ([(64, 64), (64, 32), (64, 160), (160, 64)], [8])
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["lm_head"]}))
    with pytest.raises(ValueError, match="name none of"):
        tune_module.model_shapes(str(adapter))


def test_model_shapes_refuses_a_config_that_is_not_llama_style(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a Llama-style config"):
        tune_module.model_shapes(str(tmp_path))


@pytest.fixture
def tune_calls(monkeypatch):
    calls = []

    def fake_tune(shapes, **kwargs):
        calls.append((shapes, kwargs))
        return tune_module.TuneResult(None, [{}], True)

    monkeypatch.setattr(tune_module, "tune", fake_tune)
    return calls


def test_cli_flags(tune_calls, tmp_path):
    assert tune_module.main(["--shapes", "4096x4096, 4096X1024", "--tokens", "1,16,4096", "--ranks", "16,64",
                             "--dtype", "float16", "--time-budget", "90", "--output", str(tmp_path / "t.json"),
                             "--device", "cuda:1"]) == 0
    assert tune_calls == [([(4096, 4096), (4096, 1024)],
                           dict(tokens=[1, 16, 4096], ranks=[16, 64], dtype=torch.float16, device="cuda:1",
                                output=tmp_path / "t.json", time_budget_s=90.0))]


def test_cli_defaults_and_model(tune_calls, llama_dir):
    assert tune_module.main(["--model", str(llama_dir), "--shapes", "8x8"]) == 0
    (shapes, kwargs), = tune_calls
    assert shapes == [(8, 8), (64, 64), (64, 32), (64, 160), (160, 64)]
    assert kwargs == dict(tokens=list(tune_module.DEFAULT_TOKENS), ranks=[16], dtype=torch.bfloat16, device=None,
                          output=None, time_budget_s=None)


@pytest.mark.parametrize("argv", [[], ["--shapes", "4096by1024"], ["--shapes", "0x8"],
                                  ["--shapes", "8x8", "--tokens", "a"], ["--shapes", "8x8", "--ranks", "0"],
                                  ["--shapes", "8x8", "--dtype", "int8"]])
def test_cli_rejects_bad_arguments(tune_calls, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        tune_module.main(argv)
    assert exc.value.code == 2 and tune_calls == []


def test_importing_the_package_or_the_tables_imports_no_triton():
    code = ("import sys, lora_kernels, lora_kernels.tuning, lora_kernels.tune; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'transformers', 'peft')); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fp32_plans_serve_the_fp32_precision_they_were_measured_at(tmp_path, monkeypatch):
    """Tiles tuned for tf32 tensor-core dots are not those of exact fp32 (FMA dots, deeper tiles spill):
    a float32 entry serves lookups at its own fp32 precision only; one without a precision is skipped."""
    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", str(tmp_path))
    tuning.user_table_path(DEVICE).write_text(table([entry(fp32_precision="tf32")]))
    tuning.clear_tables()
    monkeypatch.setattr(tuning, "fp32_matmul_uses_tf32", lambda: True)
    assert lookup() == tuning.Plan("fused", FUSED_A)
    monkeypatch.setattr(tuning, "fp32_matmul_uses_tf32", lambda: False)
    assert lookup() == tuning.SPLIT
    no_precision = entry()
    del no_precision["fp32_precision"]
    tuning.user_table_path(DEVICE).write_text(table([no_precision]))
    tuning.clear_tables()
    with pytest.warns(UserWarning, match="fp32_precision None"):
        assert lookup() == tuning.SPLIT
    tuning.clear_tables()
