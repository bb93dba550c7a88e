"""LoRALinear: a frozen nn.Linear plus one trainable low-rank adapter, on the fused op.

Parameter names and layouts follow PEFT's ``lora.Linear`` for one adapter: ``base_layer`` (the
original nn.Linear), ``lora_A.weight`` (r, K) and ``lora_B.weight`` (N, r), so a PEFT adapter's
tensors load without transposes (PEFT's saved files use exactly these names, minus the adapter
name). The module holds state only; the maths is lora_kernels.lora_linear.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..ops.lora_linear import lora_linear
from ..reference import lora_scaling


@contextlib.contextmanager
def fused_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *factors: torch.Tensor):
    """Yields (x, weight, bias, *factors) in the dtype the fused op runs in. Inside a torch.autocast
    region: all in autocast's dtype, with autocast paused (the op's inner GEMMs must not re-cast).
    Else as given, except the LoRA factors, cast to x's dtype (fp32 adapters with 16-bit
    activations: the small factors are cast, never x nor W0)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            yield tuple(None if t is None else t.to(dtype) for t in (x, weight, bias, *factors))
    else:
        yield (x, weight, bias, *(f.to(x.dtype) for f in factors))


class LoRALinear(nn.Module):
    """y = base_layer(x) + scaling · (dropout(x) Aᵀ) Bᵀ, fused; base_layer frozen.

    >>> import torch, lora_kernels
    >>> layer = lora_kernels.LoRALinear.from_linear(torch.nn.Linear(8, 6), r=2, lora_alpha=4)
    >>> torch.equal(layer(torch.ones(3, 8)), layer.base_layer(torch.ones(3, 8)))   # B starts at zero
    True
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_layer = base_layer.requires_grad_(False)   # frozen, as PEFT leaves it
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)     # weight (r, K)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)    # weight (N, r)
        self.reset_lora_parameters()
        self.merged = False
        self.disable_adapter = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> LoRALinear:
        """Wraps `linear` (kept as base_layer, frozen: its parameters stop requiring grad)."""
        return cls(linear, r, lora_alpha, lora_dropout, use_rslora)

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: A Kaiming-uniform (a = sqrt(5)), B zeros: the layer starts
        as the base layer."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A (N, K), computed in fp32 (at least), returned in the base weight's dtype."""
        weight = self.base_layer.weight
        compute = torch.promote_types(weight.dtype, torch.float32)
        delta = (self.lora_B.weight.to(compute) @ self.lora_A.weight.to(compute)) * self.scaling
        return delta.to(weight.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = True) -> None:
        """W0 += scaling · B A, in place; forward then runs the base layer alone. safe_merge checks
        the merged weight for NaN/Inf before writing it (as PEFT's safe_merge), leaving W0 as it was."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): already merged")
        weight = self.base_layer.weight
        merged = weight + self.delta_weight()
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError("LoRALinear.merge(): the merged weight has NaN or Inf; the base weight is unchanged")
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 -= scaling · B A, undoing merge() (up to the rounding of W0's dtype)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): not merged")
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.disable_adapter and self.merged:   # the base layer without the merged adapter
            return nn.functional.linear(x, base.weight - self.delta_weight(), base.bias)
        if self.merged or self.disable_adapter:
            return base(x)
        dropout_p = self.lora_dropout if self.training else 0.0
        with fused_inputs(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight) as inputs:
            return lora_linear(*inputs, self.scaling, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, merged={self.merged}")
