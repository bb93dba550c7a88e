"""Test set-up. TRITON_INTERPRET must be set before triton is first imported: without a GPU the
Triton kernels run interpreted on CPU tensors, so CPU CI exercises the real kernels."""

import os
import tempfile

# A fresh Inductor cache per run: its on-disk cache (/tmp/torchinductor_<user>) keys compiled graphs
# without our ops' schemas, so code compiled before a schema change calls the op with the old
# arguments ("missing value for argument 'backend'", seen when lora_linear_backward gained one).
_INDUCTOR_CACHE = tempfile.TemporaryDirectory(prefix="lora_kernels_inductor_")   # removed at exit
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_CACHE.name)
# An empty plan-table directory: a developer's own tuned table must not change which strategy the
# tests run (tests that want one force it with lora_kernels.tuning.forced_plan or write their own).
_TUNING_DIR = tempfile.TemporaryDirectory(prefix="lora_kernels_tuning_")
os.environ["LORA_KERNELS_TUNING_DIR"] = _TUNING_DIR.name

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lora_kernels  # noqa: E402
from tests.helpers import DEVICE, python_kernels_serve_cpu, skip_unless_backend_serves  # noqa: E402,F401

@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    lora_kernels.set_backend("auto")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each backend in turn, forced with set_backend; skipped with the reason it cannot run here."""
    lora_kernels.set_backend(request.param)
    return request.param


@pytest.fixture(params=["torch", "triton-split", "triton-fused"])
def single_backend(request):
    """For the single-adapter op: the torch backend, then the Triton backend under each strategy
    (forced with lora_kernels.tuning.forced_plan: README, "Strategies"). Returns the backend's name."""
    name, _, strategy = request.param.partition("-")
    lora_kernels.set_backend(name)
    if not strategy:
        yield name
        return
    from lora_kernels import tuning

    with tuning.forced_plan(strategy):
        yield name

