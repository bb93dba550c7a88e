"""Malformed metadata and unusual tensors: the same well-formed reading on both backends, or a clear error.

* Unchecked ranks (AdapterBatch(..., check=False), with_ranks): negative ranks mean 0 and ranks past the
  stacks' r_max mean r_max, on both backends (the torch backend once sliced [:, :-1] for rank -1).
* add_multi_lora_ into an `out` whose elements share memory (an expand()ed tensor): ValueError on both
  backends (Triton once wrote wrong values silently).
* Meta tensors: scales or ranks on the meta device give a clear error (they need values); all-meta
  inputs infer shapes, for AdapterBatch, multi_lora_linear and add_multi_lora_ (lora_linear's: a meta
  scale in tests/test_errors.py, all-meta inputs in tests/test_lora_linear.py).
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels import AdapterBatch
from lora_kernels.reference import multi_lora_linear_reference
from lora_kernels.metadata import set_check_adapter_ids

from ..helpers import DEVICE, skip_unless_backend_serves
from ..tolerance import assert_close

M, K, N, L, R = 7, 8, 6, 3, 4
IDS = [0, 1, 2, -1, 1, 0, 2]


@pytest.fixture(autouse=True)
def _restore_id_check():
    yield
    set_check_adapter_ids(None)


def _inputs(requires_grad: bool = False):
    """x (M, K), weight (N, K), bias (N,), lora_a (L, R, K), lora_b (L, N, R), scales (L,)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(M, K), (N, K), (N,), (L, R, K), (L, N, R)]
    tensors = [torch.randn(shape, generator=g).to(DEVICE) for shape in shapes]
    for t in (tensors[0], tensors[3], tensors[4]):
        t.requires_grad_(requires_grad)
    return (*tensors, torch.tensor([0.5, -1.0, 2.0], device=DEVICE))


# ---------------------------------------------------------------------------------------------
# unchecked ranks are clamped into [0, r_max], the same way on both backends
# ---------------------------------------------------------------------------------------------

def _check_against_clamped_reference(backend, make_batch, raw_ranks):
    """Forward and gradients with the batch make_batch(ids) built from raw (malformed) ranks, against
    the float64 reference with the ranks clamped into [0, R]."""
    skip_unless_backend_serves(backend, torch.float32)
    ids = torch.tensor(IDS, device=DEVICE)
    clamped = torch.tensor([min(max(r, 0), R) for r in raw_ranks], device=DEVICE)
    tensors = _inputs(requires_grad=True)
    batch = make_batch(ids)
    y = lora_kernels.multi_lora_linear(*tensors, batch)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad(y, [tensors[0], tensors[3], tensors[4]], grad_y)
    for label, cast in (("ref64", torch.Tensor.double), ("baseline", torch.clone)):
        copies = [cast(t.detach()) for t in tensors]
        leaves = [copies[i].requires_grad_() for i in (0, 3, 4)]
        out = multi_lora_linear_reference(*copies, ids, clamped)
        results = (out, *torch.autograd.grad(out, leaves, grad_y.to(out.dtype)))
        if label == "ref64":
            reference = results
        else:
            baseline = results
    for name, actual, ref64, base in zip(("y", "dx", "dlora_a", "dlora_b"), (y, *grads), reference, baseline):
        assert_close(actual, ref64, base, name)
    for j, rank in enumerate(clamped.tolist()):   # past the clamped rank: exactly zero gradients
        assert torch.count_nonzero(grads[1][j, rank:]) == 0 and torch.count_nonzero(grads[2][j, :, rank:]) == 0


@pytest.mark.parametrize("raw_ranks", [[2, -1, 1], [-5, 3, -1], [R + 3, 2, 100]],
                         ids=["one_negative", "negatives", "past_r_max"])
def test_unchecked_ranks_are_clamped_on_both_backends(backend, raw_ranks):
    _check_against_clamped_reference(backend, lambda ids: AdapterBatch(ids, L, ranks=raw_ranks, check=False),
                                     raw_ranks)


def test_unchecked_negative_ranks_read_as_zero_in_the_batch():
    batch = AdapterBatch(torch.tensor(IDS, device=DEVICE), L, ranks=[2, -1, 1], check=False)
    assert batch.ranks.tolist() == [2, 0, 1]
    assert batch.ranks.dtype == torch.int32 and batch.ranks.device.type == DEVICE.type


def test_unchecked_ranks_with_the_global_switch_off(backend):
    set_check_adapter_ids(False)
    _check_against_clamped_reference(backend, lambda ids: AdapterBatch(ids, L, ranks=[-2, R, 1]), [-2, R, 1])


def test_with_ranks_negative_and_too_large_on_both_backends(backend):
    """with_ranks takes the ranks unchecked (no copy, no sync): the backends read them the same way."""
    raw_ranks = [-3, R + 1, 2]
    ranks = torch.tensor(raw_ranks, dtype=torch.int32, device=DEVICE)
    _check_against_clamped_reference(backend, lambda ids: AdapterBatch(ids, L).with_ranks(ranks), raw_ranks)


# ranks and segment adapters past int32's range: narrowed to int32 for the kernels, they wrapped
# (2**32 + 1 read as rank or adapter 1, 2**31 as rank -2**31 even when checked)
PAST_INT32 = [2**32 + 1, 2**31, 1]


def test_unchecked_ranks_past_int32_are_clamped_not_wrapped(backend):
    ranks = torch.tensor(PAST_INT32, dtype=torch.int64)
    _check_against_clamped_reference(backend, lambda ids: AdapterBatch(ids, L, ranks=ranks, check=False), PAST_INT32)


def test_with_ranks_past_int32_are_clamped_not_wrapped(backend):
    ranks = torch.tensor(PAST_INT32, dtype=torch.int64, device=DEVICE)
    _check_against_clamped_reference(backend, lambda ids: AdapterBatch(ids, L).with_ranks(ranks), PAST_INT32)


@pytest.mark.parametrize("rank", [2**32 + 1, 2**31])
def test_checked_ranks_past_int32_raise(rank):
    x, w, bias, a, b, scales = _inputs()
    batch = AdapterBatch(torch.tensor(IDS, device=DEVICE), L, ranks=torch.tensor([rank, 1, 1]))
    with pytest.raises(ValueError, match="ranks must be <= r_max"):
        lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, batch)


def test_unchecked_segment_adapter_past_int32_means_none(backend):
    """Both backends read segment 0's adapter 2**32 + 1 as none (-1), like an out-of-range id."""
    skip_unless_backend_serves(backend, torch.float32)
    set_check_adapter_ids(False)
    x, w, bias, a, b, scales = _inputs()
    starts = torch.tensor([0, 3, M], device=DEVICE)
    batch = AdapterBatch.from_segments(starts, torch.tensor([2**32 + 1, 1], device=DEVICE), L)
    y = lora_kernels.multi_lora_linear(x, w, bias, a, b, scales, batch)
    ids = torch.tensor([-1] * 3 + [1] * (M - 3))
    expected = multi_lora_linear_reference(*(t.double() for t in (x, w, bias, a, b, scales)), ids)
    assert_close(y, expected, multi_lora_linear_reference(x, w, bias, a, b, scales, ids), "y")


def test_unchecked_ranks_in_add_multi_lora_(backend):
    skip_unless_backend_serves(backend, torch.float32)
    x, w, _, a, b, scales = _inputs()
    ids = torch.tensor(IDS, device=DEVICE)
    out = x @ w.T
    base = out.clone()
    with torch.no_grad():
        lora_kernels.add_multi_lora_(out, x, a, b, scales, AdapterBatch(ids, L, ranks=[-1, 2, R + 2], check=False))
    zero_w = torch.zeros(N, K, device=DEVICE)
    clamped = torch.tensor([0, 2, R], device=DEVICE)
    lora64 = multi_lora_linear_reference(x.double(), zero_w.double(), None, a.double(), b.double(), scales.double(),
                                         ids, clamped)
    lora = multi_lora_linear_reference(x, zero_w, None, a, b, scales, ids, clamped)
    assert_close(out, base.double() + lora64, base + lora, "out")
    assert torch.equal(out[ids == 0], base[ids == 0])               # adapter 0 has rank 0: its rows keep their bits


# ---------------------------------------------------------------------------------------------
# add_multi_lora_ refuses an `out` with internal overlap
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["rows", "columns", "3d"])
def test_add_into_overlapping_out_raises(backend, shape):
    skip_unless_backend_serves(backend, torch.float32)
    x, _, _, a, b, scales = _inputs()
    ids = torch.tensor(IDS, device=DEVICE)
    if shape == "rows":                       # every row is one memory row
        out = torch.zeros(1, N, device=DEVICE).expand(M, N)
    elif shape == "columns":                  # every column is one element per row
        out = torch.zeros(M, 1, device=DEVICE).expand(M, N)
    else:
        x = x.reshape(1, M, K)
        out = torch.zeros(1, 1, N, device=DEVICE).expand(1, M, N)
    before = out.clone()
    with torch.no_grad(), pytest.raises(ValueError, match=r"out \(shape .*strides .*\) has internal overlap"):
        lora_kernels.add_multi_lora_(out, x, a, b, scales, ids)
    assert torch.equal(out, before)            # nothing written


def test_add_into_broadcast_but_not_overlapping_out_is_accepted(backend):
    """A stride-0 dim of size 1, and a size-1 output: no two elements share memory."""
    skip_unless_backend_serves(backend, torch.float32)
    x, w, _, a, b, scales = _inputs()
    x1 = x[:1]
    out = (x1 @ w.T).as_strided((1, N), (0, 1))
    expected = multi_lora_linear_reference(x1.double(), w.double(), None, a.double(), b.double(), scales.double(),
                                           torch.tensor([1]))
    with torch.no_grad():
        lora_kernels.add_multi_lora_(out, x1, a, b, scales, torch.tensor([1], device=DEVICE))
    baseline = multi_lora_linear_reference(x1, w, None, a, b, scales, torch.tensor([1]))
    assert_close(out, expected, baseline, "out")


# ---------------------------------------------------------------------------------------------
# meta tensors
# ---------------------------------------------------------------------------------------------

META = torch.device("meta")


def test_meta_scales_with_real_inputs_is_a_clear_error():
    x, w, bias, a, b, scales = _inputs()
    with pytest.raises(ValueError, match=r"scales \(.*device meta\) is on meta but x is on"):
        lora_kernels.multi_lora_linear(x, w, bias, a, b, scales.to(META), torch.tensor(IDS, device=DEVICE))


def test_meta_ranks_with_real_ids_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ranks \(.*device meta\) is a meta tensor \(no values\)"):
        AdapterBatch(torch.tensor(IDS), L, ranks=torch.tensor([1, 2, 3], device=META), check=False)


@pytest.mark.parametrize("check", [None, False])
def test_adapter_batch_on_meta_ids_infers_shapes(check):
    """Meta ids hold no values: nothing to check (as under torch.compile), the grouping has its shapes."""
    set_check_adapter_ids(True)
    batch = AdapterBatch(torch.tensor(IDS, device=META), L, ranks=[1, -2, 4], check=check)
    assert batch.device == META and batch.num_rows == M and batch.num_adapters == L
    assert batch.sorted_rows.shape == (M,) and batch.adapter_starts.shape == (L + 1,)
    assert batch.ranks.shape == (L,) and batch.ranks.is_meta


def test_adapter_batch_on_meta_ids_refuses_an_explicit_check():
    with pytest.raises(ValueError, match=r"adapter_ids \(.*device meta\) is a meta tensor: it holds no values to check"):
        AdapterBatch(torch.tensor(IDS, device=META), L, check=True)


def test_from_segments_on_meta():
    starts, adapters = torch.tensor([0, 3, M], device=META), torch.tensor([1, -1], device=META)
    batch = AdapterBatch.from_segments(starts, adapters, L, num_rows=M)
    assert batch.num_rows == M and batch.segment_starts.shape == (3,) and batch.segment_rows.is_meta
    with pytest.raises(ValueError, match=r"segment_starts \(.*device meta\) is a meta tensor \(no values\): pass num_rows"):
        AdapterBatch.from_segments(starts, adapters, L)


def _meta(tensors):
    return [t.detach().to(META).requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("ids_kind", ["tensor", "batch", "segments"])
def test_all_meta_multi_lora_linear_infers_shapes_and_gradients(ids_kind):
    x, w, bias, a, b, scales = _meta(_inputs(requires_grad=True))
    ids = torch.tensor(IDS, device=META)
    if ids_kind == "batch":
        ids = AdapterBatch(ids, L, ranks=[2, 3, 4])
    elif ids_kind == "segments":
        ids = AdapterBatch.from_segments(torch.tensor([0, 3, M], device=META), torch.tensor([1, -1], device=META),
                                         L, num_rows=M)
    y = lora_kernels.multi_lora_linear(x.reshape(1, M, K), w, bias, a, b, scales, ids)
    assert y.is_meta and y.shape == (1, M, N)
    grads = torch.autograd.grad(y.sum(), [x, a, b])
    assert [g.shape for g in grads] == [(M, K), (L, R, K), (L, N, R)] and all(g.is_meta for g in grads)


def test_all_meta_add_multi_lora_():
    x, w, _, a, b, scales = _meta(_inputs())
    out = torch.empty(M, N, device=META)
    with torch.no_grad():
        returned = lora_kernels.add_multi_lora_(out, x, a, b, scales, torch.tensor(IDS, device=META))
    assert returned is out and out.shape == (M, N)
