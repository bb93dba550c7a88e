"""scripts/gpu_check.sh where CPU CI can check it: without a CUDA device it stops at once with one line
saying why, and what it would run on a GPU (the sanitizer's test selection, the --quick benchmark
options) still matches the tests and the benchmarks' command lines."""

from __future__ import annotations

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
