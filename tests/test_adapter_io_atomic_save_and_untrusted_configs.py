"""Adapter files under failure and from untrusted sources.

write_adapter replaces adapter_model.safetensors + adapter_config.json as a pair: a failure at any step
(each write, fsync and rename in turn) leaves the old pair and no temporary files; a process stopped
at any step leaves a directory where a plain reader (PEFT) never finds a config beside weights it was
not saved with, and the next save completes cleanly. Pattern keys and target_modules from a config are
regexes: crafted ones such as "(a+)+" must not backtrack exponentially (each such test runs under an
alarm that fires on the old code), and huge integers are a ValueError, not an OverflowError."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import re
import shutil
import signal

import pytest
import torch
from torch import nn

safetensors_torch = pytest.importorskip("safetensors.torch")

from lora_kernels.io import AdapterWeights, LayerAdapter, read_adapter, write_adapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:peft")

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
USER_FILES = {"README.md": "# my adapter\n", "tokenizer.json": "{}", "other/adapter_config.json": "{}"}


def make_adapter(rank: int, scale: float, seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    return AdapterWeights({n: LayerAdapter(torch.randn(rank, 8, generator=g), torch.randn(6, rank, generator=g), scale)
                           for n in NAMES})


# ranks differ, so new weights beside an old config (or the reverse) fail to load instead of passing
OLD, NEW, THIRD = make_adapter(2, 0.5, 0), make_adapter(4, 3.0, 1), make_adapter(3, 1.25, 2)


def which(adapter: AdapterWeights) -> str:
    for label, known in (("old", OLD), ("new", NEW), ("third", THIRD)):
        if adapter.layers.keys() == known.layers.keys() and all(
                torch.equal(adapter.layers[n].lora_a, known.layers[n].lora_a)
                and torch.equal(adapter.layers[n].lora_b, known.layers[n].lora_b)
                and adapter.layers[n].scale == known.layers[n].scale for n in NAMES):
            return label
    return "other"


def plain_reader_sees(directory: pathlib.Path, scratch: pathlib.Path) -> str:
    """What a reader that opens <dir>/adapter_config.json and <dir>/adapter_model.safetensors (as PEFT
    does) gets: "old", "new", "third", "no config", or "mixed" (a config beside other weights)."""
    if not (directory / "adapter_config.json").exists():
        return "no config"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if (directory / name).exists():
            shutil.copyfile(directory / name, scratch / name)
    try:
        return which(read_adapter(scratch))
    except (ValueError, FileNotFoundError) as e:
        return f"mixed ({e})"


def files_in(directory: pathlib.Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink()}


def directory_with_old_pair(root: pathlib.Path) -> pathlib.Path:
    shutil.rmtree(root, ignore_errors=True)
    for name, text in USER_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    write_adapter(root, OLD)
    return root


CLEAN = set(USER_FILES) | {"adapter_config.json", "adapter_model.safetensors"}
# every step of a save that writes, flushes or renames
STEPS = [(os, "replace"), (os, "rename"), (os, "fsync"), (safetensors_torch, "save_file"),
         (pathlib.Path, "write_text")]
# and those that delete: a process stopped at a step does none of the later ones
FROZEN_BY_A_STOP = STEPS + [(os, "remove"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")]


@contextlib.contextmanager
def calls_of(steps, fail_from: int | None = None, fail_until: int | None = None):
    """Record calls of `steps` (as "module.name"); calls number fail_from .. fail_until - 1 (0-based)
    raise OSError instead of running."""
    log = []
    with pytest.MonkeyPatch.context() as mp:
        for owner, name in steps:
            original = getattr(owner, name)

            def wrapper(*args, _original=original, _label=f"{getattr(owner, '__name__', owner)}.{name}", **kwargs):
                log.append(_label)
                if fail_from is not None and fail_from < len(log) and (fail_until is None or len(log) <= fail_until):
                    raise OSError(f"injected failure in call {len(log) - 1} ({_label})")
                return _original(*args, **kwargs)

            mp.setattr(owner, name, wrapper)
        yield log


def test_a_failure_at_any_step_leaves_the_old_pair(tmp_path):
    directory = tmp_path / "adapter"
    directory_with_old_pair(directory)
    with calls_of(STEPS) as log:
        write_adapter(directory, NEW)
    assert plain_reader_sees(directory, tmp_path / "scratch") == "new" and files_in(directory) == CLEAN
    assert "safetensors.torch.save_file" in log and "Path.write_text" in log, log
    for step in range(len(log)):
        directory_with_old_pair(directory)
        with calls_of(STEPS, fail_from=step, fail_until=step + 1), pytest.raises(OSError, match="injected"):
            write_adapter(directory, NEW)
        where = f"after a failure in step {step} ({log[step]}) of {log}"
        assert plain_reader_sees(directory, tmp_path / "scratch") == "old", where
        assert which(read_adapter(directory)) == "old", where
        assert files_in(directory) == CLEAN, where
        write_adapter(directory, NEW)  # and the next save works
        assert plain_reader_sees(directory, tmp_path / "scratch") == "new" and files_in(directory) == CLEAN, where
    for step in range(len(log)):  # and when every clean-up (rmtree) fails as well
        directory_with_old_pair(directory)
        with calls_of(STEPS, fail_from=step, fail_until=step + 1) as failed_log, \
                pytest.MonkeyPatch.context() as mp, pytest.raises(OSError, match="injected"):
            mp.setattr(shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(OSError("injected: no rmtree")))
            write_adapter(directory, NEW)
        where = f"after a failure in step {step} of {failed_log}, clean-up failing too"
        assert plain_reader_sees(directory, tmp_path / "scratch") == "old", where
        assert which(read_adapter(directory)) == "old", where
        write_adapter(directory, NEW)  # removes what the failed clean-up left
        assert files_in(directory) == CLEAN, where


def test_a_stop_at_any_step_never_shows_a_mixed_pair_and_the_next_save_recovers(tmp_path):
    """A process killed mid-save, imitated by failing one step and every later write, rename, fsync or
    delete (the roll-back included): the disk stays as the kill left it."""
    directory = tmp_path / "adapter"
    directory_with_old_pair(directory)
    with calls_of(FROZEN_BY_A_STOP) as log:
        write_adapter(directory, NEW)
    for step in range(len(log)):
        directory_with_old_pair(directory)
        with calls_of(FROZEN_BY_A_STOP, fail_from=step), pytest.raises(OSError, match="injected"):
            write_adapter(directory, NEW)
        where = f"after a stop at step {step} ({log[step]}) of {log}"
        assert plain_reader_sees(directory, tmp_path / "scratch") in ("old", "new", "no config"), where
        seen = which(read_adapter(directory))  # the committed pair, if any
        assert seen in ("old", "new"), where
        # the next save first completes the stopped one: even if it then fails, the pair is the one load saw
        with calls_of([(safetensors_torch, "save_file")], fail_from=0), pytest.raises(OSError, match="injected"):
            write_adapter(directory, THIRD)
        assert plain_reader_sees(directory, tmp_path / "scratch") == seen, where
        write_adapter(directory, THIRD)
        assert plain_reader_sees(directory, tmp_path / "scratch") == "third", where
        assert files_in(directory) == CLEAN, where


def test_save_over_a_peft_directory_keeps_its_files_and_peft_reads_it(tmp_path):
    peft = pytest.importorskip("peft")

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(8, 6), nn.Linear(8, 6)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Module()])
            self.model.layers[0].self_attn = Attention()

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(Model(), config).save_pretrained(tmp_path)  # writes README.md too
    (tmp_path / "tokenizer.json").write_text("{}")
    before = {name: (tmp_path / name).read_bytes() for name in ("README.md", "tokenizer.json")}
    write_adapter(tmp_path, NEW)
    assert files_in(tmp_path) == {"README.md", "tokenizer.json", "adapter_config.json", "adapter_model.safetensors"}
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    layers = {n.removeprefix("base_model.model."): m for n, m in
              peft.PeftModel.from_pretrained(Model(), tmp_path).named_modules() if hasattr(m, "lora_A")}
    for name in NAMES:
        assert layers[name].scaling["default"] == NEW.layers[name].scale
        assert torch.equal(layers[name].lora_A["default"].weight, NEW.layers[name].lora_a)


# ---------------------------------------------------------------------------------------------------
# configs from untrusted files

BACKTRACKING_KEYS = ["(a+)+", "(a|a)*", "(a|aa)+", "(a*)*b", "(.*a){20}"]
LONG_NAME = "model." + "a" * 40 + "!"  # each key above backtracks ~2**40 times on it in `re`


@contextlib.contextmanager
def alarm(seconds: int):
    """TimeoutError after `seconds`; `re` checks signals while it backtracks, so this ends the old code."""
    if not hasattr(signal, "SIGALRM"):
        pytest.skip("needs signal.SIGALRM (POSIX) to bound the old, exponential behaviour")

    def fire(*_):
        raise TimeoutError(f"still matching after {seconds} s: the pattern backtracks")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_peft_files(directory: pathlib.Path, names: list[str], rank: int, config: dict) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name in names:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.ones(rank, 8)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.ones(6, rank)
    safetensors_torch.save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return directory


@pytest.mark.parametrize("key", BACKTRACKING_KEYS)
def test_crafted_pattern_keys_are_matched_without_backtracking(tmp_path, key):
    directory = write_peft_files(tmp_path, [LONG_NAME, "model.aaaa"], 2, {
        "r": 2, "lora_alpha": 4, "rank_pattern": {key: 2}, "alpha_pattern": {key: 6}})
    with alarm(10):
        layers = read_adapter(directory).layers
    matched = re.match(rf"(.*\.)?({key})$", "model.aaaa") is not None  # fast on the short name
    assert layers["model.aaaa"].scale == (3.0 if matched else 2.0)
    assert layers[LONG_NAME].scale == 2.0  # no key matches "aaa…a!"


def test_crafted_target_modules_and_layer_names_save_without_backtracking(tmp_path):
    layer = LayerAdapter(torch.ones(2, 8), torch.ones(6, 2), 1.0)
    wide = LayerAdapter(torch.ones(4, 8), torch.ones(6, 4), 1.0)
    # target_modules as a string is a regex PEFT fullmatches; names become rank_pattern keys when ranks differ
    adapter = AdapterWeights({"x." + "a" * 40 + "!": layer, "x.(a+)+": wide},
                             config={"target_modules": r"x\.(a|a)*", "r": 2, "lora_alpha": 2})
    with alarm(10):
        write_adapter(tmp_path, adapter)
    loaded = read_adapter(tmp_path).layers
    assert {n: la.rank for n, la in loaded.items()} == {"x." + "a" * 40 + "!": 2, "x.(a+)+": 4}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == sorted(adapter.layers)


@pytest.mark.parametrize("key, same_as", [("(){4000000000}", ""), ("(a{0}){4000000000}", ""),
                                           ("((){10000}){100000}q_proj", "q_proj")])
def test_a_repeated_empty_group_takes_no_time_to_build(tmp_path, key, same_as):
    """A group that matches only "" adds no automaton state, so MAX_STATES does not bound how often a
    count repeats it: building it must not loop the count's times (4e9 here; `re` compiles the key,
    and runs out of memory matching it)."""
    directory = write_peft_files(tmp_path, NAMES, 2, {"r": 2, "lora_alpha": 2, "alpha_pattern": {key: 6}})
    with alarm(10):
        layers = read_adapter(directory).layers
    matched = [re.match(rf"(.*\.)?({same_as})$", n) is not None for n in NAMES]
    assert matched == [True, False] if same_as else matched == [False, False]
    assert [layers[n].scale for n in NAMES] == [3.0 if m else 1.0 for m in matched]


def test_crafted_key_and_long_layer_names_take_bounded_memory(tmp_path):
    """Each character of a crafted name can lead a crafted key's automaton to a new set of states
    (here: where the 'a's of the last 400 characters are); a cache of every set seen grew by ~17 kB per
    character of the file's layer names (~170 MB for this 10k-character name)."""
    import tracemalloc

    from lora_kernels.io import _peft_key_matcher

    matches = _peft_key_matcher(r"(a|b)*a.{400}x")
    rng = random.Random(0)
    name = "".join(rng.choice("ab.") for _ in range(10_000))
    tracemalloc.start()
    try:
        assert not matches(name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"matching one {len(name)}-character name took {peak / 1e6:.0f} MB"


def test_a_key_equal_to_the_module_path_applies_even_when_it_does_not_match_as_a_regex(tmp_path):
    # PEFT: rank_pattern.get(get_pattern_key(keys, path), r), and get_pattern_key returns the path itself
    # when no key matches; "x.q+" does not match "x.q+" as a regex ("+" repeats the "q")
    directory = write_peft_files(tmp_path, ["x.q+"], 3, {"r": 2, "lora_alpha": 6, "rank_pattern": {"x.q+": 3}})
    assert read_adapter(directory).layers["x.q+"].rank == 3


@pytest.mark.parametrize("key", [r"(q)\1", "(?=q)q_proj", "(?i)Q_PROJ", r"\bq_proj+", "q_proj{", "a" * 1001])
def test_pattern_keys_outside_the_safe_subset_are_refused(tmp_path, key):
    directory = write_peft_files(tmp_path, NAMES, 2, {"r": 2, "lora_alpha": 2, "rank_pattern": {key: 2}})
    with pytest.raises(ValueError, match=re.escape(f"rank_pattern key {key!r} is refused")):
        read_adapter(directory)


@pytest.mark.parametrize("field, config", [
    ("lora_alpha", {"lora_alpha": 10**400}),
    ("alpha_pattern", {"alpha_pattern": {"q_proj": -10**400}}),
    ("rank_pattern", {"use_rslora": True, "rank_pattern": {"q_proj": 10**400}}),
    ("r", {"use_rslora": True, "r": 10**400}),
])
def test_huge_integers_are_a_value_error_naming_the_field(tmp_path, field, config):
    directory = write_peft_files(tmp_path, NAMES, 2, {"r": 2, "lora_alpha": 2, **config})
    with pytest.raises(ValueError, match=rf"{field}(\[.*\])?=-?1000"):
        read_adapter(directory)
    with pytest.raises(ValueError, match="scale=1000"):
        write_adapter(tmp_path / "out", AdapterWeights({"q": LayerAdapter(torch.ones(2, 8), torch.ones(6, 2), 10**400)}))


def test_regex_keys_give_the_ranks_peft_gives(tmp_path):
    """Keys that use quantifiers, groups and alternation (matched by SafeRegex) pick the same modules
    as PEFT's own re.match."""
    peft = pytest.importorskip("peft")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 6), "v_proj": nn.Linear(8, 6)})
                                         for _ in range(3)])

    rank_pattern = {r"layers\.(0|1)\.q_proj": 3, r"^layers\.2\..*": 5, r"layers\.[01]\.(v_)+proj": 6}
    torch.manual_seed(0)
    model = peft.get_peft_model(Model(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                         rank_pattern=rank_pattern))
    model.save_pretrained(tmp_path)
    expected = {n.removeprefix("base_model.model."): m.r["default"] for n, m in model.named_modules()
                if hasattr(m, "lora_A")}
    assert sorted(set(expected.values())) == [3, 5, 6]  # each key takes its own modules
    assert {n: la.rank for n, la in read_adapter(tmp_path).layers.items()} == expected


def test_safe_regex_answers_as_re_does():
    """SafeRegex against re.match / re.fullmatch on random patterns and texts over a small alphabet,
    PEFT's "(.*\\.)?(key)$" wrapper included; cases where `re` itself takes over 0.5 s are skipped."""
    from lora_kernels._safe_regex import SafeRegex

    rng = random.Random(0)
    atoms = ["a", "b", ".", r"\.", "_", r"\d", r"\w", r"\W", r"\s", "[ab]", "[^a]", "[a-c]", "[.]", "[]a]", "[a-]",
             r"[\d.]", "^", "$", "\n", "}", "]", "(?:)"]
    quantifiers = ["*", "+", "?", "{2}", "{0,2}", "{1,}", "{,2}", "{,}", "*?", "??", "{1,3}?"]

    def pattern(depth=0):
        roll = rng.random()
        if depth > 3 or roll < 0.35:
            return rng.choice(atoms)
        if roll < 0.55:
            return pattern(depth + 1) + pattern(depth + 1)
        if roll < 0.7:
            return "(" + rng.choice(["", "?:"]) + pattern(depth + 1) + "|" + pattern(depth + 1) + ")"
        return "(" + pattern(depth + 1) + ")" + rng.choice(quantifiers)

    compared = 0
    for _ in range(400):
        key = pattern()
        for regex in (key, rf"(.*\.)?({key})$"):
            try:
                compiled = re.compile(regex)
            except re.error:
                continue
            safe = SafeRegex(regex)
            for _ in range(4):
                text = "".join(rng.choice("ab._0\n") for _ in range(rng.randrange(8)))
                try:
                    with alarm(1):
                        expected = (compiled.match(text) is not None, compiled.fullmatch(text) is not None)
                except TimeoutError:
                    continue
                assert (safe.match(text), safe.fullmatch(text)) == expected, (regex, text)
                compared += 1
    assert compared > 2000


def test_safe_regex_docstring_examples():
    import doctest

    from lora_kernels import _safe_regex

    result = doctest.testmod(_safe_regex)
    assert result.attempted > 0 and result.failed == 0
