"""What would be a host synchronisation or a host-to-device copy on CUDA, counted on CPU.

A TorchFunctionMode records the calls that read a tensor's values back to the host (item, tolist,
bool(t), int(t), nonzero, ...) and those that make a tensor from host data or move one to a device
(torch.tensor, new_tensor, .to(device)). Counted: a mixed-batch forward of a patched PEFT model (the
count must not grow with the number of layers: one copy of the batch's ids, nothing per layer) and
AdapterBatch construction (one sync with the id check on, nothing with it off). The device guard of
the Triton launchers is checked against a fake torch.cuda. tests/test_gpu_hazards.py checks the same
on a GPU with torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lora_kernels
from lora_kernels import AdapterBatch, fallback
from lora_kernels.metadata import set_check_adapter_ids

CPU = torch.device("cpu")
# reading values back: a device-to-host copy the host waits for
SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
         "unique", "equal", "allclose", "masked_select"}
# host data made a tensor: on CUDA, a host-to-device copy of it
FROM_HOST = {"tensor", "as_tensor", "new_tensor", "from_numpy"}
MOVES = {"to", "cuda", "copy_", "pin_memory"}


def _where() -> str:
    """file:line of the innermost lora_kernels frame of the current call (for the failure message)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "lora_kernels" in frame.f_code.co_filename and "tests" not in frame.f_code.co_filename:
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class HostTraffic(TorchFunctionMode):
    """Records syncs and host-to-device copies (name and place of each) while active and not paused."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.copies: list[str] = []
        self._paused = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self._paused:
            if name in SYNCS:
                self.syncs.append(f"{name} at {_where()}")
            elif name in FROM_HOST or (name in MOVES and _names_a_device(args[1:], kwargs)):
                self.copies.append(f"{name} at {_where()}")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def _names_a_device(args, kwargs) -> bool:
    """Whether a .to / .cuda / copy_ call names a destination device (or copies from another tensor)."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, int, torch.Tensor)) and not isinstance(a, bool)
                                     for a in args)


@pytest.fixture(autouse=True)
def _restore_id_check():
    yield
    set_check_adapter_ids(None)


# ---- PEFT mixed batch: one copy per batch, none per layer ----------------------------------------

def _peft_model(num_layers: int):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    targets = [str(i) for i in range(num_layers)]
    base = nn.Sequential(*[nn.Linear(16, 16) for _ in range(num_layers)])
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False), adapter_name="one")
    model.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    assert lora_kernels.patch_peft(model) == num_layers
    return model.eval()


def _mixed_forward_traffic(num_layers: int, monkeypatch) -> HostTraffic:
    """Host traffic of the second mixed-batch forward (the first builds each layer's scales and ranks),
    outside the backend's compute (the torch backend reads its groups on the host by design; the
    Triton launchers read nothing back, checked on a GPU)."""
    model = _peft_model(num_layers)
    x = torch.randn(4, 3, 16)                                     # 4 samples of 3 rows: M = 12
    with torch.no_grad():
        model(x, adapter_names=["one", "__base__", "two", "one"])
    traffic = HostTraffic()

    def paused(compute):
        def call(*args, **kwargs):
            with traffic.paused():
                return compute(*args, **kwargs)
        return call

    monkeypatch.setattr(fallback, "multi_lora_linear_forward", paused(fallback.multi_lora_linear_forward))
    # lora_kernels/_checks.check_scales reads scales only when they are on the CPU: skipped for CUDA scales
    monkeypatch.setattr("lora_kernels.ops.multi_lora_linear.check_scales", lambda scales: None)
    with torch.no_grad(), traffic:
        model(x, adapter_names=["two", "one", "__base__", "two"])
    return traffic


def test_peft_mixed_batch_copies_ids_once_per_batch_not_per_layer(monkeypatch):
    few, many = (_mixed_forward_traffic(n, monkeypatch) for n in (2, 6))
    assert few.syncs == [] and many.syncs == [], f"host syncs: {few.syncs} / {many.syncs}"
    assert len(few.copies) == len(many.copies) <= 1, f"copies with 2 layers: {few.copies}; with 6: {many.copies}"


def test_peft_mixed_batch_scales_follow_set_scale():
    """The per-layer scales live on the device until the scaling changes: set_scale takes effect."""
    model = _peft_model(2)
    x = torch.randn(3, 16)
    names = ["one", "two", "one"]
    with torch.no_grad():
        before = model(x, adapter_names=names)
        for layer in (model.base_model.model[0], model.base_model.model[1]):
            layer.set_scale("two", 3.0)     # scaling = 3 * lora_alpha / r
        after = model(x, adapter_names=names)
        lora_kernels.unpatch_peft(model)
        expected = model(x, adapter_names=names)
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


# ---- AdapterBatch: one sync with the check on, none (and no copy) off ----------------------------

IDS = [0, 2, -1, 1, 2, 0]
L = 3


def _traffic(build) -> HostTraffic:
    with HostTraffic() as traffic:
        build()
    return traffic


@pytest.mark.parametrize("ranks", [None, "tensor"])
def test_adapter_batch_checked_one_sync(ranks):
    ids = torch.tensor(IDS)
    ranks = torch.tensor([4, 2, 1]) if ranks else None
    traffic = _traffic(lambda: AdapterBatch(ids, L, ranks=ranks, check=True))
    assert len(traffic.syncs) <= 1 and traffic.copies == [], f"{traffic.syncs}, {traffic.copies}"


@pytest.mark.parametrize("ranks", [None, "tensor"])
def test_adapter_batch_unchecked_no_sync_no_copy(ranks):
    ids, other_ranks = torch.tensor(IDS), torch.tensor([1, 1, 1])
    ranks = torch.tensor([4, 2, 1]) if ranks else None
    traffic = _traffic(lambda: AdapterBatch(ids, L, ranks=ranks, check=False).with_ranks(other_ranks))
    assert traffic.syncs == [] and traffic.copies == [], f"{traffic.syncs}, {traffic.copies}"


def test_adapter_batch_ranks_list_is_one_copy():
    ids = torch.tensor(IDS)
    traffic = _traffic(lambda: AdapterBatch(ids, L, ranks=[4, 2, 1], check=False))
    assert traffic.syncs == [] and len(traffic.copies) == 1, f"{traffic.syncs}, {traffic.copies}"


@pytest.mark.parametrize("num_rows", [6, None])
@pytest.mark.parametrize("ranks", [None, "tensor"])
def test_from_segments_checked_one_sync(num_rows, ranks):
    starts, adapters = torch.tensor([0, 2, 3, 6]), torch.tensor([1, -1, 2])
    ranks = torch.tensor([4, 2, 1]) if ranks else None
    set_check_adapter_ids(True)
    traffic = _traffic(lambda: AdapterBatch.from_segments(starts, adapters, L, num_rows=num_rows, ranks=ranks))
    assert len(traffic.syncs) <= 1 and traffic.copies == [], f"{traffic.syncs}, {traffic.copies}"


def test_from_segments_unchecked_no_sync_no_copy():
    starts, adapters, ranks = torch.tensor([0, 2, 3, 6]), torch.tensor([1, -1, 2]), torch.tensor([4, 2, 1])
    set_check_adapter_ids(False)
    traffic = _traffic(lambda: AdapterBatch.from_segments(starts, adapters, L, num_rows=6, ranks=ranks))
    assert traffic.syncs == [] and traffic.copies == [], f"{traffic.syncs}, {traffic.copies}"
    traffic = _traffic(lambda: AdapterBatch.from_segments(starts, adapters, L))     # reads num_rows: one sync
    assert len(traffic.syncs) == 1 and traffic.copies == [], f"{traffic.syncs}, {traffic.copies}"


def test_checked_batch_reports_the_first_bad_id_and_the_true_max_rank():
    with pytest.raises(ValueError, match=r"adapter_ids\[1\] = 5"):
        AdapterBatch(torch.tensor([0, 5, -3, 1]), L, check=True)
    assert AdapterBatch(torch.tensor(IDS), L, ranks=[4, 9, 1], check=True).max_rank == 9
    batch = AdapterBatch.from_segments(torch.tensor([0, 2, 6]), torch.tensor([0, 1]), L, ranks=[0, 7, 3])
    assert batch.max_rank == 7 and batch.num_rows == 6


class FakePinnedCopies(TorchFunctionMode):
    """CPU stand-ins for pinned memory (a set of tensor ids) and for copies to "cuda" (each records the
    tensor it reads)."""

    def __init__(self):
        super().__init__()
        self.pinned: set[int] = set()
        self.sources: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "pin_memory":          # torch's: the tensor itself when it is pinned already
            if id(args[0]) in self.pinned:
                return args[0]
            out = args[0].clone()
        elif name == "is_pinned":
            return id(args[0]) in self.pinned
        elif name in ("empty", "empty_like") and kwargs.pop("pin_memory", False):
            out = func(*args, **kwargs)
        elif name == "to" and any(str(a).startswith("cuda") for a in (*args[1:], kwargs.get("device", ""))):
            self.sources.append(args[0])
            return args[0].clone()
        else:
            return func(*args, **kwargs)
        self.pinned.add(id(out))
        return out


def test_host_to_device_copy_reads_a_private_pinned_buffer(monkeypatch):
    """to_device's non-blocking copy reads pinned memory of its own: a caller's pinned tensor (a staging
    buffer reused for the next batch's ranks) may be written again before the copy has run."""
    from lora_kernels.metadata import to_device

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fake = FakePinnedCopies()
    with fake:
        staging = torch.tensor([4, 2, 1], dtype=torch.int32).pin_memory()
        to_device(staging, torch.device("cuda", 0))
    (source,) = fake.sources
    assert id(source) in fake.pinned, "the non-blocking copy must read pinned memory"
    assert source.data_ptr() != staging.data_ptr(), "the copy reads the caller's pinned tensor itself"


def test_host_to_device_copy_refused_inside_cuda_graph_capture(monkeypatch):
    """A captured copy re-reads its pinned staging buffer at every replay, after it was freed: refused
    with a clear error (as a pageable copy was, by CUDA) instead of replaying whatever is there then."""
    from lora_kernels.metadata import to_device

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="host-to-device copy .* inside CUDA-graph capture: build it before"):
        to_device(torch.tensor([4, 2, 1], dtype=torch.int32), torch.device("cuda", 0))


# ---- the device guard of the Triton launchers (a fake torch.cuda) --------------------------------

class _Entered(Exception):
    pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with device 0 current: entering torch.cuda.device(d) records d, and raises _Entered
    when `stop` is set (the launcher's body then never runs: fake devices hold no memory)."""
    state = SimpleNamespace(entered=[], stop=False, current=0, queries=0)

    def current_device():
        state.queries += 1
        return state.current

    @contextlib.contextmanager
    def device(d):
        state.entered.append(torch.device(d))
        if state.stop:
            raise _Entered(d)
        previous, state.current = state.current, torch.device(d).index
        try:
            yield
        finally:
            state.current = previous

    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_guard_enters_the_inputs_device_only_when_not_current(fake_cuda):
    from lora_kernels.triton._device import on_device_of

    @on_device_of("where")
    def launcher(n, where, other=None):
        return fake_cuda.current

    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert launcher(1, cuda1) == 1 and fake_cuda.entered == [cuda1] and fake_cuda.current == 0
    assert launcher(1, where=cuda1, other=cuda0) == 1 and fake_cuda.entered == [cuda1, cuda1]
    assert launcher(1, cuda0, cuda1) == 0 and len(fake_cuda.entered) == 2    # already current: no switch
    queries = fake_cuda.queries
    launcher(1, torch.empty(2), cuda1)                                       # CPU (the interpreter): nothing
    assert len(fake_cuda.entered) == 2 and fake_cuda.queries == queries


# The launchers the op layer calls, and the argument whose device each launches on.
GUARDED = {
    "lora_linear": {"lora_linear_forward": "x", "lora_linear_backward": "grad_y", "dropout_keep_mask": "device"},
    "multi_lora_linear": {"multi_lora_add_": "out", "multi_lora_linear_forward": "x",
                          "multi_lora_linear_backward": "grad_y"},
}


def test_guarded_launchers_are_those_the_op_layer_calls():
    """Every launcher function the op layer calls is in GUARDED (the next test checks each guard)."""
    pytest.importorskip("triton")
    import importlib

    ops = Path(lora_kernels.__file__).parent / "ops"
    called = set(re.findall(r"\.(\w+)\(", "".join(p.read_text() for p in ops.glob("*.py"))))
    for module_name, expected in GUARDED.items():
        module = importlib.import_module(f"lora_kernels.triton.{module_name}")
        launchers = {name for name, f in vars(module).items() if inspect.isfunction(f) and not name.startswith("_")}
        assert launchers & called == set(expected), module_name


@pytest.mark.parametrize("module_name,function", [(m, f) for m, fs in GUARDED.items() for f in fs])
def test_launcher_runs_under_its_inputs_device(fake_cuda, module_name, function):
    """Every argument on cuda:0 (current) except the guarded one, on cuda:1: the launcher enters
    cuda:1 before anything else (an unguarded launcher, or one guarding another argument, would run
    its body on these fake tensors and fail otherwise)."""
    pytest.importorskip("triton")
    import importlib

    launcher = getattr(importlib.import_module(f"lora_kernels.triton.{module_name}"), function)
    guarded = GUARDED[module_name][function]
    params = list(inspect.signature(launcher).parameters)

    def fake(name, index):
        if name == "device":
            return torch.device("cuda", index)
        return SimpleNamespace(device=torch.device("cuda", index), shape=(1, 1), dtype=torch.float32)

    fake_cuda.stop = True
    with pytest.raises(_Entered):
        launcher(*[fake(name, 1 if name == guarded else 0) for name in params])
    assert fake_cuda.entered == [torch.device("cuda", 1)]
