"""The op layer and the plan tables against what a hostile user (or environment) does to them.

- A plan forced around a forward (tuning.forced_plan, a ContextVar) must serve its backward's dX even
  when autograd runs that backward on another thread: on a GPU it runs on the CUDA device thread, which
  sees none of the caller's contextvars (torch 2.13). Simulated on CPU by a backward on a new thread.
- A table entry whose fused config passes the file checks but that no GPU can compile (a reduction tile
  under tl.dot's 16, more than 1024 threads a block) must be skipped when the table loads, not crash a
  user's call at its first launch.
- A tuning directory that cannot be searched (stat raises: EACCES for a directory of another user,
  ENAMETOOLONG) or no home directory at all must give a warning and the defaults, not an error in every
  call on the Triton backend.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import pwd

import pytest
import torch

import lora_kernels
from lora_kernels import tuning
from lora_kernels.tuning import MatmulConfig, Plan

from .helpers import DEVICE, skip_unless_backend_serves


@pytest.fixture(autouse=True)
def fresh_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", str(tmp_path / "cache"))
    tuning.clear_tables()
    yield
    tuning.clear_tables()


# ----------------------------------------------------------------------------- forced plan across threads


def test_a_backward_on_another_thread_runs_the_plan_forced_around_its_forward(monkeypatch):
    triton_launch = pytest.importorskip("lora_kernels.triton.lora_linear", reason="needs triton")
    skip_unless_backend_serves("triton", torch.float32)
    looked_up = []
    plan_for = triton_launch.plan_for

    def recording_plan_for(op, *args):
        plan = plan_for(op, *args)
        looked_up.append((op, plan.strategy))
        return plan

    monkeypatch.setattr(triton_launch, "plan_for", recording_plan_for)
    gen = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*shape, generator=gen).to(DEVICE) for shape in ((8, 32), (16, 32), (4, 32), (16, 4)))
    x.requires_grad_(True)
    with lora_kernels.use_backend("triton"), tuning.forced_plan("fused"):
        y = lora_kernels.lora_linear(x, w, None, a, b, 0.5)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:   # a thread of its own: none of this one's contextvars
        (grad_x,) = pool.submit(torch.autograd.grad, y, x, torch.ones_like(y)).result()
    assert looked_up == [("forward", "fused"), ("dx", "fused")]
    expected = torch.ones_like(y) @ w + 0.5 * (torch.ones_like(y) @ b) @ a
    torch.testing.assert_close(grad_x, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- configs no GPU can launch


def _table(config: dict) -> str:
    entry = {"op": "forward", "dtype": "bfloat16", "m": 64, "n": 48, "k": 32, "rank": 8, "strategy": "fused",
             "config": config}
    return json.dumps({"format": tuning.FORMAT, "version": tuning.FORMAT_VERSION, "device_kind": "cpu",
                       "device_name": "cpu", "entries": [entry]})


@pytest.mark.parametrize("field, value", [("block_k", 8), ("block_r", 8), ("block_k", 1), ("num_warps", 64)])
def test_a_table_config_no_gpu_can_launch_is_skipped_when_the_table_loads(tmp_path, field, value):
    good = {"block_m": 64, "block_n": 64, "block_k": 32, "block_r": 16, "group_m": 8, "num_warps": 4,
            "num_stages": 3, "split_k": 1}
    path = tmp_path / "cpu.json"
    path.write_text(_table({**good, field: value}))
    with pytest.warns(UserWarning, match="entry 0 skipped.*" + re.escape(f"['{field}']")):
        assert tuning.read_table(path, "cpu") == {}
    path.write_text(_table(good))
    assert list(tuning.read_table(path, "cpu").values()) == [Plan("fused", MatmulConfig(**good))]


# ----------------------------------------------------------------------------- a cache that cannot be read


def _lookup() -> Plan:
    return tuning.plan_for("forward", torch.device("cpu"), torch.float32, 8, 16, 32, 4)


def test_a_tuning_dir_whose_files_cannot_be_stat_ed_warns_and_gives_the_defaults(monkeypatch, tmp_path):
    # a 300-character name: stat fails with ENAMETOOLONG, which Path.is_file raises (as EACCES, for a
    # directory of another user, when not root) instead of answering False
    monkeypatch.setenv("LORA_KERNELS_TUNING_DIR", str(tmp_path / ("x" * 300)))
    with pytest.warns(UserWarning, match="plan table .*File name too long"):
        assert _lookup() == tuning.SPLIT


def test_no_home_directory_warns_and_gives_the_defaults(monkeypatch):
    for name in ("LORA_KERNELS_TUNING_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)   # a container's arbitrary uid, no HOME: Path.home() raises
    with pytest.warns(UserWarning, match="plan table"):
        assert _lookup() == tuning.SPLIT
