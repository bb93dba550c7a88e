"""Input validation and dtype policy shared by every layer above the kernels (backends, metadata, ops,
modules, adapter files, merging): every message names the tensor, what it is, and what was expected."""

from __future__ import annotations

import numbers

import torch

# Masks compare fp32 uniforms with fp32(dropout_p): larger p round to 1.0 and drop everything.
MAX_DROPOUT_P = 1.0 - 2.0**-24
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def hidden_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved rank intermediate T: fp32 for 16-bit and fp32 inputs, fp64 for fp64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, ndim: int | None = None, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} ({describe(t)}) must be floating point, one of {FLOAT_DTYPES}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} ({describe(t)}) must be {ndim}-D")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} ({describe(t)}) must have shape {expected}: {meaning}")


def check_same_dtype_and_device(reference_name: str, tensors: dict[str, torch.Tensor | None],
                                what: str = "tensors") -> None:
    """Every tensor given on the device and in the dtype of tensors[reference_name] (None: skipped);
    `what` names the group in the message ("all tensors must be on one device")."""
    reference = tensors[reference_name]
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{name} ({describe(t)}) is on {t.device} but {reference_name} is on "
                             f"{reference.device}: all {what} must be on one device")
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} ({describe(t)}) has dtype {t.dtype} but {reference_name} has "
                            f"{reference.dtype}: all {what} must share one dtype")


def check_dropout_p(dropout_p) -> float:
    if type(dropout_p) is float and 0.0 <= dropout_p <= MAX_DROPOUT_P:   # common case, no abc checks
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if float(dropout_p) > MAX_DROPOUT_P:
        raise ValueError(f"dropout_p={dropout_p!r} rounds to 1.0 in float32, where the masks compare it: "
                         f"at most {MAX_DROPOUT_P!r} (1 - 2**-24)")
    return float(dropout_p)


# The kernels hold a scale in fp32: a larger one would round to inf there (a float64 torch run would not).
MAX_SCALE = torch.finfo(torch.float32).max


def check_scale(scale) -> float:
    """A finite python number or 0-d tensor with |scale| <= MAX_SCALE (float32's largest), read once on
    the host (a device sync for a CUDA tensor); anything else raises, on every backend. A scale of 0
    still multiplies the LoRA term: NaN / Inf in it propagate as in the reference (0 · inf = NaN)."""
    if type(scale) is float and -MAX_SCALE <= scale <= MAX_SCALE:   # the common case (NaN fails both)
        return scale
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale ({describe(scale)}) must be a python float or a 0-d tensor")
        if scale.dtype is torch.bool or scale.is_complex():   # as for a python bool or complex
            raise TypeError(f"scale ({describe(scale)}) must be a real number: a floating or integer tensor")
        if scale.requires_grad:
            raise ValueError(f"scale ({describe(scale)}) must not require grad: LoRA scaling is a constant, "
                             "not a parameter")
        if scale.is_meta:
            raise ValueError(f"scale ({describe(scale)}) is a meta tensor: it holds no value, and the kernels "
                             "take the scale as a number; pass a python float")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a python float or a 0-d tensor, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:   # an int past float64's range
        value = float("inf")
    if not -MAX_SCALE <= value <= MAX_SCALE:
        raise ValueError(f"scale must be finite with |scale| <= {MAX_SCALE:.6e} (float32's largest: the kernels "
                         f"hold it in float32), got {value!r}")
    return value


def check_scales(scales: torch.Tensor) -> None:
    """The multi-adapter scales (L,) of a CPU tensor: check_scale's rule for each (about 1 µs at L = 8:
    one tolist, one sum). Callers skip it for GPU tensors (reading them back is a host sync per layer)."""
    values = scales.tolist()
    if sum(map(abs, values)) <= MAX_SCALE:   # NaN / inf make the sum fail; so, rarely, do many large scales
        return
    for index, value in enumerate(values):
        if not -MAX_SCALE <= value <= MAX_SCALE:
            raise ValueError(f"scales ({describe(scales)}) must be finite with |scale| <= {MAX_SCALE:.6e} "
                             f"(float32's largest: the kernels hold them in float32), got scales[{index}] = {value!r}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when elements of t certainly share memory: a dim of size > 1 with stride 0 (expand),
    torch's own test for in-place ops (at::has_internal_overlap's YES); shapes and strides only."""
    return t.numel() > 1 and any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))
