"""Checks of the benchmark harness and of the single-adapter script's main job, at tiny sizes.

Run by the test command (`pytest tests bench --benchmark-disable`): a broken harness would otherwise
only show when somebody runs the benchmark. No timing is asserted, only what the numbers mean.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lora_linear as single  # noqa: E402  (puts the repo root on sys.path too)
import harness  # noqa: E402
import providers as lora  # noqa: E402


def test_time_fn_cpu_counts_calls_and_orders_percentiles():
    calls = []
    timing = harness.time_fn(lambda: calls.append(1), "cpu", min_run_time=0.01)
    assert calls, "fn was never called"
    assert timing.method == "cpu" and timing.graph_error is None
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    assert timing.samples >= harness.CPU_MIN_SAMPLES


def test_time_fn_cuda_graph_is_ignored_on_cpu():
    timing = harness.time_fn(lambda: torch.ones(4).sum(), "cpu", min_run_time=0.01, cuda_graph=True)
    assert timing.method == "cpu" and timing.graph_error is None


def test_time_interleaved_reverses_the_order_every_other_round(monkeypatch):
    calls = []

    def fake_time_fn(fn, device, *, min_run_time, cuda_graph):
        calls.append((fn(), min_run_time))
        ms = 1.0 + len(calls)                  # rounds of one step: distinct medians
        return harness.Timing(ms, ms - 0.5, ms + 0.5, 5, "cpu")

    monkeypatch.setattr(harness, "time_fn", fake_time_fn)
    timings = harness.time_interleaved({"a": lambda: "a", "b": lambda: "b"}, "cpu", 0.75, repeats=3)
    assert calls == [(step, 0.25) for step in "abbaab"]      # A B, B A, A B: a third of the time each
    assert timings["a"].rounds_ms == (2.0, 5.0, 6.0) and timings["a"].median_ms == 5.0
    assert (timings["a"].p20_ms, timings["a"].p80_ms) == (1.5, 6.5)      # the lowest p20, the highest p80
    assert timings["b"].rounds_ms == (3.0, 4.0, 7.0) and timings["b"].method == "cpu"


def test_roofline_picks_the_binding_limit():
    peak = harness.Peak(tflops=100.0, gbps=1000.0, how="test")
    out = harness.roofline(50e9, 100e6, 1.0, peak)       # 50 TFLOP/s, 100 GB/s
    assert out["tflops"] == pytest.approx(50.0) and out["gbps"] == pytest.approx(100.0)
    assert out["peak_pct"] == pytest.approx(50.0)         # compute-bound: 50 of 100 TFLOP/s
    out = harness.roofline(1e9, 800e6, 1.0, peak)         # 1 TFLOP/s, 800 GB/s
    assert out["peak_pct"] == pytest.approx(80.0)         # memory-bound: 800 of 1000 GB/s
    assert harness.roofline(1e9, 1e6, None, peak) == {"tflops": None, "gbps": None, "peak_pct": None}
    assert harness.roofline(1e9, 1e6, 1.0, None)["peak_pct"] is None


def test_measure_peak_is_positive_and_says_what_it_ran():
    peak = harness.measure_peak("cpu", torch.float32, min_run_time=0.01)
    assert peak.tflops > 0 and peak.gbps > 0
    assert "GEMM" in peak.how and "copy" in peak.how


def test_progress_bar_lines():
    out = io.StringIO()
    bar = harness.Progress(4, file=out)
    bar.step("first")
    bar.step("second", count=2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(r"\[#####\.{15}\] 1/4  25%", lines[0]) and lines[0].endswith("| first")
    assert re.match(r"\[#{15}\.{5}\] 3/4  75%", lines[1]) and "left" in lines[1]
    assert harness.Progress(0, file=out).line().startswith("[" + "#" * harness.Progress.WIDTH + "]")


def test_write_results_with_a_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"shape": "s", "mode": "fwd", "m": m, "ours_ms": 0.1 * m, "base_ms": 0.05 * m if m > 1 else None}
            for m in (1, 16, 256)]
    stamp = {"device_kind": "cpu", "device_name": "test"}
    paths = harness.write_results("t", rows, stamp, notes=["a note"], results_dir=tmp_path,
                                  plot=harness.PlotSpec(("base", "ours"), panel=("shape", "mode")))
    assert [p.name for p in paths] == ["t-cpu.json", "t-cpu.md", "t-cpu.png"]
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths[1].read_text()
    assert "![time vs m per provider](t-cpu.png)" in md and "a note" in md
    assert json.loads(paths[0].read_text())["rows"][0]["ours_ms"] == pytest.approx(0.1)


def test_write_plot_without_times_writes_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"shape": "s", "m": 1, "ours_ms": None}]
    assert harness.write_plot(tmp_path / "x.png", rows, harness.PlotSpec(("ours",), panel=("shape",))) is None
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA H100 NVL", "h100"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("Tesla T4", "t4"),
    ("NVIDIA GH200 480GB", "gh200"), ("AMD Instinct MI300X", "mi300x"), ("NVIDIA", "cuda"),
])
def test_result_files_take_the_plan_tables_gpu_slug(monkeypatch, name, slug):
    """The GPU's model names result files as it names lora_kernels' plan tables (lora_kernels.tuning)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert harness.device_kind("cuda") == slug


def test_result_files_are_named_after_the_gpu_model(monkeypatch):
    """On CUDA, device_kind (the stamp's, hence the file names') is the GPU's slug, not "cuda"."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert harness.device_kind("cuda") == harness.device_kind(torch.device("cuda", 0)) == "h100"
    assert harness.device_kind("cpu") == "cpu"


def test_visible_columns_keeps_the_columns_whose_provider_ran():
    """A key or (key, header) needs ours; a third element names the provider needed (None: none)."""
    table = ["shape", ("ours_ms", "ours ms"), ("peft_ms", "peft ms", "peft")]
    cuda_columns = [("timed", "timed", None), ("ours_peak_mib", "ours MiB", "ours"),
                    ("peft_peak_mib", "peft MiB", "peft")]
    cols = harness.visible_columns([{}], ("base", "ours"), table, cuda_columns, "cuda")
    assert cols == [("shape", "shape"), ("ours_ms", "ours ms"), ("timed", "timed"), ("ours_peak_mib", "ours MiB")]
    assert harness.visible_columns([{}], ("peft",), table, cuda_columns, "cpu") == [("peft_ms", "peft ms")]
    assert harness.visible_columns([{"errors": "x"}], ("ours",), table[:1], cuda_columns, "cpu") == \
        [("shape", "shape"), ("errors", "errors")]


def test_min_bytes_counts_each_tensor_once():
    m, k, n, r = 3, 5, 7, 2
    # fwd: x (m·k) + W0 (n·k) + b (n) + A (r·k) + B (n·r) + y (m·n)
    assert lora.min_bytes("fwd", m, k, n, r, 2) == 2 * (15 + 35 + 7 + 10 + 14 + 21)
    # fwd_bwd adds dY (m·n), dX (m·k), dA (r·k), dB (n·r)
    assert lora.min_bytes("fwd_bwd", m, k, n, r, 4) == 4 * (15 + 35 + 7 + 10 + 14 + 21 + 21 + 15 + 10 + 14)


def test_timed_with_names_the_odd_provider():
    row = {"base_method": "cuda graph", "ours_method": "cuda graph", "peft_method": "cuda"}
    assert harness.timed_with(row, ("base", "ours", "peft")) == "cuda graph (peft: cuda)"
    assert harness.timed_with({"ours_method": "cpu"}, ("ours",)) == "cpu"
    assert harness.timed_with({}, ("ours",)) is None


def test_single_adapter_main_job_end_to_end(tmp_path, capsys):
    """The README's main command at one tiny shape: every provider checked, timed, tabled and written."""
    argv = ["--device", "cpu", "--tokens", "2", "--ranks", "4", "--min-run-time", "0.01",
            "--results-dir", str(tmp_path), "--name", "tiny"]
    orig = single.default_groups
    single.default_groups = lambda device: [single.Group(single.Shape("tiny", 32, 24), (4,), (2,))]
    try:
        assert single.main(argv) == 0
    finally:
        single.default_groups = orig
    out = capsys.readouterr().out
    assert "| tiny" in out and "ours % peak" in out
    rows = json.loads((tmp_path / "tiny-cpu.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["fwd", "fwd_bwd"]
    for row in rows:
        assert row["errors"] is None, row["errors"]
        assert all(row[f"{p}_ms"] > 0 for p in ("base", "ours", "lean_torch"))
        assert row["ours_peak_pct"] > 0 and row["timed"] == "cpu"


class _FakeCuda:
    """Just enough of torch.cuda for _capture_cuda_graph's control flow on a machine without a GPU:
    records the sync debug mode and the current stream; `graph` runs fn inside a fake capture."""

    def __init__(self, capture_error=None):
        self.mode, self.stream_now, self.capture_error, self.replays = 0, "default", capture_error, 0

    def get_sync_debug_mode(self):
        return self.mode

    def set_sync_debug_mode(self, mode):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)

    def synchronize(self):
        pass

    def current_stream(self):
        fake = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                pass

        return Stream(fake.stream_now)

    def Stream(self):  # noqa: N802 - torch's name
        return self.current_stream().__class__("side")

    def stream(self, s):
        fake = self

        class Ctx:
            def __enter__(self):
                self.prev, fake.stream_now = fake.stream_now, s.name

            def __exit__(self, *exc):
                fake.stream_now = self.prev

        return Ctx()

    def set_stream(self, s):
        self.stream_now = s.name

    def CUDAGraph(self):  # noqa: N802
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1

        return Graph()

    def graph(self, graph):
        fake = self

        class Capture:
            def __enter__(self):
                fake.stream_now = "capture"     # torch.cuda.graph switches to its capture stream

            def __exit__(self, exc_type, exc, tb):
                if exc is not None or fake.capture_error:       # capture_end raises, over fn's own error
                    raise RuntimeError("operation failed due to a previous error during capture")
                fake.stream_now = "default"

        return Capture()


def _patch_cuda(monkeypatch, fake):
    for name in ("get_sync_debug_mode", "set_sync_debug_mode", "synchronize", "current_stream", "Stream",
                 "stream", "set_stream", "CUDAGraph", "graph"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))


def test_capture_refuses_a_host_sync_before_capturing(monkeypatch):
    fake = _FakeCuda()
    _patch_cuda(monkeypatch, fake)

    def syncs():
        if fake.mode == 2:
            raise RuntimeError("called a synchronizing CUDA operation")

    reason = harness._capture_cuda_graph(syncs)
    assert isinstance(reason, str) and reason.startswith("synchronises with the host")
    assert "synchronizing CUDA operation" in reason
    assert fake.mode == 0 and fake.stream_now == "default"      # debug mode and stream as they were


def test_failed_capture_restores_the_stream_and_reports_the_cause(monkeypatch):
    fake = _FakeCuda()
    _patch_cuda(monkeypatch, fake)

    def fails_in_capture():
        if fake.stream_now == "capture":
            raise ValueError("the real cause")

    reason = harness._capture_cuda_graph(fails_in_capture)
    assert reason == "capture failed: ValueError: the real cause"
    assert fake.stream_now == "default"


def test_capture_of_a_clean_call_gives_a_graph(monkeypatch):
    fake = _FakeCuda()
    _patch_cuda(monkeypatch, fake)
    calls = []
    graph = harness._capture_cuda_graph(lambda: calls.append(fake.stream_now))
    assert not isinstance(graph, str) and fake.replays == 1
    assert calls == ["default", "side", "side", "side", "capture"]     # check, 3 warm-ups, the capture
