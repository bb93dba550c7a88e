"""multi_lora_linear and AdapterBatch: bad input fails with a clear ValueError / TypeError naming the
offending tensor and what was expected, never a wrong answer. With the id check off
(set_check_adapter_ids(False) or LORA_KERNELS_CHECK_IDS=0), out-of-range ids mean "no adapter"."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lora_kernels import AdapterBatch, multi_lora_linear
from lora_kernels.reference import multi_lora_linear_reference
from lora_kernels.metadata import set_check_adapter_ids

from ..helpers import DEVICE, skip_unless_backend_serves
from ..tolerance import assert_close

M, K, N, L, R = 6, 8, 5, 3, 4


@pytest.fixture(autouse=True)
def _restore_id_check():
    yield
    set_check_adapter_ids(None)


def _inputs():
    """Valid x (M, K), weight (N, K), bias (N,), lora_a (L, R, K), lora_b (L, N, R), scales (L,), ids (M,)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (M, K), "weight": (N, K), "bias": (N,), "lora_a": (L, R, K), "lora_b": (L, N, R)}
    args = {name: torch.randn(shape, generator=g).to(DEVICE) for name, shape in shapes.items()}
    args["scales"] = torch.tensor([0.5, -1.0, 2.0], device=DEVICE)
    args["adapter_ids"] = torch.tensor([0, 2, -1, 1, 2, 0], device=DEVICE)
    return args


def _call(**overrides):
    args = _inputs()
    args.update(overrides)
    return multi_lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                             args["scales"], args["adapter_ids"])


def _shape(*dims) -> str:
    """Regex for a shape as the messages print it: tuple(t.shape)."""
    return re.escape(str(tuple(dims)))


def _starts(*values):
    return torch.tensor(values, device=DEVICE)


def test_valid_inputs_do_not_raise():
    """The baseline every case below perturbs in one place."""
    assert _call().shape == (M, N)


# ---------------------------------------------------------------------------------------------
# adapter ids
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [L, L + 5, -2, -100])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_ids_out_of_range(bad, index_dtype):
    ids = torch.tensor([0, 1, 2, bad, 0, 1], dtype=index_dtype, device=DEVICE)
    with pytest.raises(ValueError, match=rf"adapter_ids .* must be in \[-1, {L}\).*adapter_ids\[3\] = {bad}"):
        _call(adapter_ids=ids)
    with pytest.raises(ValueError, match=rf"must be in \[-1, {L}\)"):
        AdapterBatch(ids, L)


def test_ids_out_of_range_in_3d_batch_names_flat_row():
    x = torch.randn(2, 3, K, device=DEVICE)
    ids = torch.tensor([0, 1, 2, 0, 7, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r"adapter_ids\[4\] = 7"):
        _call(x=x, adapter_ids=ids)


@pytest.mark.parametrize("length", [M - 1, M + 1, 0])
def test_ids_wrong_length(length):
    ids = torch.zeros(length, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=rf"has {length} rows but x has M={M} rows"):
        _call(adapter_ids=ids)


def test_ids_wrong_length_for_3d_x():
    x = torch.randn(2, 3, K, device=DEVICE)
    with pytest.raises(ValueError, match=r"has 3 rows but x has M=6 rows \(x flattened to \(M, K\)\)"):
        _call(x=x, adapter_ids=torch.zeros(3, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_ids_wrong_dtype(dtype):
    ids = torch.zeros(M, device=DEVICE).to(dtype)
    with pytest.raises(TypeError, match=r"adapter_ids \(.*dtype " + re.escape(str(dtype)) + r".*must be int32 or int64"):
        _call(adapter_ids=ids)


def test_ids_not_a_tensor():
    with pytest.raises(TypeError, match=r"adapter_ids must be a torch.Tensor of int32/int64, got list"):
        _call(adapter_ids=[0, 1, 2, -1, 0, 1])


def test_ids_2d():
    """ids shaped like x's leading dims are not flattened silently."""
    x = torch.randn(2, 3, K, device=DEVICE)
    ids = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=rf"adapter_ids \(shape {_shape(2, 3)}.*must be 1-D"):
        _call(x=x, adapter_ids=ids)


# ---------------------------------------------------------------------------------------------
# stacks, scales, shapes, dtypes
# ---------------------------------------------------------------------------------------------

def test_lora_b_adapter_count_mismatch():
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(L + 1, N, R)}.*must have shape {_shape(L, N, R)}"):
        _call(lora_b=torch.randn(L + 1, N, R, device=DEVICE))


def test_scales_adapter_count_mismatch():
    for length in (L - 1, L + 1):
        with pytest.raises(ValueError, match=rf"scales \(shape {_shape(length)}.*must have shape {_shape(L)}"):
            _call(scales=torch.ones(length, device=DEVICE))


def test_lora_a_adapter_count_mismatch_with_everything_else():
    """lora_a sets L: with one more adapter than lora_b and scales, lora_b is the one reported."""
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(L, N, R)}.*must have shape {_shape(L + 1, N, R)}"):
        _call(lora_a=torch.randn(L + 1, R, K, device=DEVICE))


def test_rank_mismatch_between_lora_a_and_lora_b():
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(L, N, R + 1)}.*must have shape {_shape(L, N, R)}"):
        _call(lora_b=torch.randn(L, N, R + 1, device=DEVICE))


def test_lora_b_transposed_per_adapter():
    """(L, r, N) instead of (L, N, r) is rejected, not read transposed."""
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(L, R, N)}.*must have shape {_shape(L, N, R)}"):
        _call(lora_b=torch.randn(L, R, N, device=DEVICE))


def test_x_in_features_mismatch():
    with pytest.raises(ValueError, match=rf"x \(shape {_shape(M, K + 1)}.*last dim K={K}.*weight \(shape {_shape(N, K)}"):
        _call(x=torch.randn(M, K + 1, device=DEVICE))


def test_lora_a_wrong_k():
    with pytest.raises(ValueError, match=rf"lora_a \(shape {_shape(L, R, K + 1)}.*must have shape {_shape(L, R, K)}"):
        _call(lora_a=torch.randn(L, R, K + 1, device=DEVICE))


def test_lora_b_wrong_n():
    with pytest.raises(ValueError, match=rf"lora_b \(shape {_shape(L, N + 1, R)}.*must have shape {_shape(L, N, R)}"):
        _call(lora_b=torch.randn(L, N + 1, R, device=DEVICE))


def test_bias_wrong_n():
    with pytest.raises(ValueError, match=rf"bias \(shape {_shape(N - 1)}.*must have shape {_shape(N)}"):
        _call(bias=torch.randn(N - 1, device=DEVICE))


@pytest.mark.parametrize("name, shape", [("lora_a", (R, K)), ("lora_b", (N, R)), ("scales", ()),
                                         ("scales", (L, 1))])
def test_wrong_number_of_dims(name, shape):
    """A single adapter's lora_a / lora_b (lora_linear's shapes), a 0-d or 2-D scales."""
    ndim = {"lora_a": 3, "lora_b": 3, "scales": 1}[name]
    with pytest.raises(ValueError, match=rf"{name} \(shape {_shape(*shape)}.*must be {ndim}-D"):
        _call(**{name: torch.ones(shape, device=DEVICE)})


@pytest.mark.parametrize("shape", [(0, R, K), (L, 0, K)])
def test_empty_stack(shape):
    with pytest.raises(ValueError, match=r"lora_a .* must be \(L, r_max, K\) with L >= 1 adapters and r_max >= 1"):
        _call(lora_a=torch.randn(shape, device=DEVICE), lora_b=torch.randn(shape[0], N, shape[1], device=DEVICE),
              scales=torch.ones(shape[0], device=DEVICE))


@pytest.mark.parametrize("name", ["weight", "bias", "lora_a", "lora_b"])
def test_mixed_dtypes(name):
    other = _inputs()[name].to(torch.float16)
    with pytest.raises(TypeError, match=rf"{name} \(.*\) has dtype torch.float16 but x has torch.float32: "
                                        r"all tensors must share one dtype"):
        _call(**{name: other})


def test_integer_scales():
    with pytest.raises(TypeError, match=r"scales \(.*dtype torch.int64.*must be floating point"):
        _call(scales=torch.tensor([1, 2, 3], device=DEVICE))


def test_scales_not_a_tensor():
    with pytest.raises(TypeError, match=r"scales must be a torch.Tensor, got list"):
        _call(scales=[0.5, 1.0, 2.0])


def test_scales_in_another_float_dtype_are_accepted():
    """scales are constants: fp64 or fp16 scales with fp32 x are fine (cast once)."""
    y = _call()
    torch.testing.assert_close(_call(scales=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, device=DEVICE)), y)
    torch.testing.assert_close(_call(scales=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16, device=DEVICE)), y)


def test_scales_requiring_grad():
    with pytest.raises(ValueError, match=r"scales \(.*\) must not require grad: LoRA scaling is a constant"):
        _call(scales=torch.ones(L, device=DEVICE, requires_grad=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (a GPU)")
def test_scales_on_another_device():
    args = {name: t.to("cuda") for name, t in _inputs().items()}
    args["scales"] = args["scales"].cpu()
    with pytest.raises(ValueError, match=r"scales \(.*\) is on cpu but x is on cuda"):
        _call(**args)


def test_x_integer():
    with pytest.raises(TypeError, match=r"x \(.*dtype torch.int64.*must be floating point"):
        _call(x=torch.zeros(M, K, dtype=torch.int64, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# AdapterBatch built for something else, malformed segments, ranks
# ---------------------------------------------------------------------------------------------

def test_batch_for_another_num_adapters():
    batch = AdapterBatch(_inputs()["adapter_ids"], L + 1)
    with pytest.raises(ValueError, match=rf"was built for {L + 1} adapters but lora_a stacks L={L}"):
        _call(adapter_ids=batch)


def test_batch_for_another_num_rows():
    batch = AdapterBatch(torch.zeros(M + 2, dtype=torch.int64, device=DEVICE), L)
    with pytest.raises(ValueError, match=rf"has {M + 2} rows but x has M={M} rows"):
        _call(adapter_ids=batch)


def test_batch_from_segments_for_another_num_rows():
    batch = AdapterBatch.from_segments(_starts(0, 2, M + 1), _starts(0, 1), L)
    with pytest.raises(ValueError, match=rf"has {M + 1} rows but x has M={M} rows"):
        _call(adapter_ids=batch)


@pytest.mark.parametrize("num_adapters", [0, -1, True, 2.0, None])
def test_bad_num_adapters(num_adapters):
    with pytest.raises(ValueError, match=r"num_adapters must be an int >= 1"):
        AdapterBatch(_inputs()["adapter_ids"], num_adapters)
    with pytest.raises(ValueError, match=r"num_adapters must be an int >= 1"):
        AdapterBatch.from_segments(_starts(0, M), _starts(0), num_adapters)


@pytest.mark.parametrize("starts", [(1, 3, M), (0, 4, 2, M), (0, 3, M - 1), (0, 3, M + 1), (-1, 3, M)],
                         ids=["not_from_0", "decreasing", "short", "long", "negative"])
def test_from_segments_bad_indptr(starts):
    adapters = _starts(*range(len(starts) - 1)) % L
    with pytest.raises(ValueError, match=rf"segment_starts \(.*must rise from 0 to num_rows={M}"):
        AdapterBatch.from_segments(_starts(*starts), adapters, L, num_rows=M)


def test_from_segments_decreasing_without_num_rows():
    with pytest.raises(ValueError, match=r"segment_starts \(.*must rise from 0 to num_rows=6, got \[0, 4, 2, 6\]"):
        AdapterBatch.from_segments(_starts(0, 4, 2, 6), _starts(0, 1, 2), L)


@pytest.mark.parametrize("bad", [L, -2])
def test_from_segments_adapter_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"segment_adapters \(.*must be in \[-1, {L}\)"):
        AdapterBatch.from_segments(_starts(0, 2, 4, M), _starts(0, bad, 1), L)


@pytest.mark.parametrize("num_segment_adapters", [2, 4])
def test_from_segments_length_mismatch(num_segment_adapters):
    adapters = _starts(*([0] * num_segment_adapters))
    with pytest.raises(ValueError, match=r"segment_starts \(.*must have one more entry than segment_adapters"):
        AdapterBatch.from_segments(_starts(0, 2, 4, M), adapters, L)


def test_from_segments_wrong_dtypes():
    with pytest.raises(TypeError, match=r"segment_starts \(.*must be int32 or int64"):
        AdapterBatch.from_segments(torch.tensor([0.0, 2.0, 6.0], device=DEVICE), _starts(0, 1), L)
    with pytest.raises(TypeError, match=r"segment_adapters \(.*must be int32 or int64"):
        AdapterBatch.from_segments(_starts(0, 2, 6), torch.tensor([0.0, 1.0], device=DEVICE), L)
    with pytest.raises(ValueError, match=r"segment_starts \(shape \(1, 3\).*must be 1-D"):
        AdapterBatch.from_segments(_starts(0, 2, 6)[None], _starts(0, 1), L)


@pytest.mark.parametrize("ranks", [[4, 4], [4, 4, 4, 4], []], ids=["short", "long", "empty"])
def test_ranks_wrong_length(ranks):
    with pytest.raises(ValueError, match=rf"ranks \(.*must have one entry per adapter: shape \({L},\)"):
        AdapterBatch(_inputs()["adapter_ids"], L, ranks=ranks)
    with pytest.raises(ValueError, match=r"ranks \(.*must have one entry per adapter"):
        AdapterBatch.from_segments(_starts(0, 2, M), _starts(0, 1), L, ranks=ranks)


def test_ranks_negative():
    with pytest.raises(ValueError, match=r"ranks \(.*must be >= 0, got -1"):
        AdapterBatch(_inputs()["adapter_ids"], L, ranks=[4, -1, 2])


def test_ranks_wrong_dtype_or_dims():
    with pytest.raises(TypeError, match=r"ranks \(.*dtype torch.float32.*must be int32 or int64"):
        AdapterBatch(_inputs()["adapter_ids"], L, ranks=torch.tensor([4.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"ranks \(shape \(1, 3\).*must be 1-D"):
        AdapterBatch(_inputs()["adapter_ids"], L, ranks=torch.tensor([[4, 1, 2]]))


def test_ranks_float_list_rejected_not_truncated():
    with pytest.raises(TypeError, match=r"ranks must hold ints"):
        AdapterBatch(_inputs()["adapter_ids"], L, ranks=[1.5, 2, 3])


def test_ranks_above_r_max():
    batch = AdapterBatch(_inputs()["adapter_ids"], L, ranks=[R, R + 1, 2])
    with pytest.raises(ValueError, match=rf"rank {R + 1} but the stacks hold r_max={R}"):
        _call(adapter_ids=batch)


@pytest.mark.parametrize("starts", [(0, 2, 4), (2, 5), (-2, 1), (0, 3, 0, 3)],
                         ids=["short", "past_the_end", "negative", "overlapping"])
def test_from_segments_malformed_with_check_off_stays_in_bounds(backend, starts):
    """Unchecked malformed segments (e.g. during CUDA-graph capture) are made well formed: every row
    in at most one segment, none past the end, and both backends agree."""
    skip_unless_backend_serves(backend, torch.float32)
    set_check_adapter_ids(False)
    num_rows = 3 if starts == (2, 5) or starts == (-2, 1) else M
    adapters = _starts(*[j % L for j in range(len(starts) - 1)])
    batch = AdapterBatch.from_segments(_starts(*starts), adapters, L, num_rows=num_rows)
    s = batch.segment_starts.tolist()
    assert s[0] == 0 and s[-1] == num_rows and s == sorted(s)
    args = _inputs()
    x = args["x"][:num_rows]
    y = multi_lora_linear(x, args["weight"], args["bias"], args["lora_a"], args["lora_b"], args["scales"], batch)
    expected = multi_lora_linear_reference(*(t.double() for t in (x, args["weight"], args["bias"], args["lora_a"],
                                                                  args["lora_b"], args["scales"])), batch.adapter_ids)
    baseline = multi_lora_linear_reference(x, args["weight"], args["bias"], args["lora_a"], args["lora_b"],
                                           args["scales"], batch.adapter_ids)
    assert_close(y, expected, baseline, "y")


# ---------------------------------------------------------------------------------------------
# the id check off: out-of-range ids mean "no adapter", never a crash
# ---------------------------------------------------------------------------------------------

def _check_off_rows(backend, make_batch):
    """Runs with the check off; rows whose id is out of range equal F.linear bit for bit, the
    others match the reference in which those rows are -1."""
    skip_unless_backend_serves(backend, torch.float32)
    args = _inputs()
    raw_ids = torch.tensor([0, L, 2, -7, 1, 1000], device=DEVICE)
    set_check_adapter_ids(False)
    batch = make_batch(raw_ids)
    y = _call(adapter_ids=batch)
    clean = torch.where((raw_ids >= 0) & (raw_ids < L), raw_ids, -1)
    expected = multi_lora_linear_reference(*(args[n].double() for n in ("x", "weight", "bias", "lora_a", "lora_b",
                                                                        "scales")), clean)
    baseline = multi_lora_linear_reference(*(args[n] for n in ("x", "weight", "bias", "lora_a", "lora_b", "scales")),
                                           clean)
    assert_close(y, expected, baseline, "y")
    base = F.linear(args["x"], args["weight"], args["bias"])
    out_of_range = clean < 0
    assert torch.equal(y[out_of_range], base[out_of_range])
    return batch


def test_check_off_ids_out_of_range_mean_no_adapter(backend):
    _check_off_rows(backend, lambda ids: ids)
    grouped = AdapterBatch(torch.tensor([0, L, 2, -7, 1, 1000], device=DEVICE), L)
    assert grouped.counts.tolist() == [1, 1, 1]                  # out-of-range rows belong to no adapter


def test_check_off_with_adapter_batch(backend):
    _check_off_rows(backend, lambda ids: AdapterBatch(ids, L))


def test_check_off_segment_adapters_out_of_range_mean_no_adapter(backend):
    def make(ids):
        return AdapterBatch.from_segments(torch.arange(M + 1, device=DEVICE), ids, L)

    batch = _check_off_rows(backend, make)
    assert batch.segment_adapters.tolist() == [0, -1, 2, -1, 1, -1]


def test_check_off_gradients_ignore_out_of_range_rows(backend):
    skip_unless_backend_serves(backend, torch.float32)
    args = _inputs()
    set_check_adapter_ids(False)
    ids = torch.tensor([0, 0, L + 3, 0, -5, 0], device=DEVICE)     # only adapter 0 is ever used
    a = args["lora_a"].requires_grad_(True)
    b = args["lora_b"].requires_grad_(True)
    y = multi_lora_linear(args["x"], args["weight"], args["bias"], a, b, args["scales"], ids)
    grad_a, grad_b = torch.autograd.grad(y.sum(), [a, b])
    assert torch.count_nonzero(grad_a[1:]) == 0 and torch.count_nonzero(grad_b[1:]) == 0
    assert torch.count_nonzero(grad_a[0]) > 0


def test_check_restored_to_default():
    set_check_adapter_ids(False)
    AdapterBatch(torch.tensor([L]), L)
    set_check_adapter_ids(None)
    with pytest.raises(ValueError, match=r"must be in \[-1, 3\)"):
        AdapterBatch(torch.tensor([L]), L)


def test_check_env_variable(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_CHECK_IDS", "0")
    AdapterBatch(torch.tensor([L]), L)                             # off: accepted
    set_check_adapter_ids(True)                                     # the setter overrides the env
    with pytest.raises(ValueError, match=r"must be in \[-1, 3\)"):
        AdapterBatch(torch.tensor([L]), L)
    set_check_adapter_ids(None)
    monkeypatch.setenv("LORA_KERNELS_CHECK_IDS", "1")
    with pytest.raises(ValueError, match=r"must be in \[-1, 3\)"):
        AdapterBatch(torch.tensor([L]), L)
    monkeypatch.setenv("LORA_KERNELS_CHECK_IDS", "maybe")
    with pytest.raises(ValueError, match=r"LORA_KERNELS_CHECK_IDS='maybe': expected 0 or 1"):
        AdapterBatch(torch.tensor([0]), L)
