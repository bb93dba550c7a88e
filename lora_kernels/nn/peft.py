"""PEFT integration: put a PEFT model's LoRA linear layers on the fused ops, in place.

patch_peft(model) gives every PEFT ``lora.Linear`` of `model` a forward that calls lora_linear (one
or several active adapters) or multi_lora_linear (``adapter_names=`` mixed batches, which then also
train: PEFT refuses them in training mode, we give each row's gradient to its own adapter). Nothing else
changes: the same modules, parameters, state_dict, save/load, merge/unmerge and adapter switching.
Whatever the fused path cannot serve goes to PEFT's own forward, per call (a dtype it cannot take,
dropout on several summed adapters, lora_bias in a mixed batch) or per layer (DoRA and other
variants, fan_in_fan_out, a base layer that is not an nn.Linear); patch_peft reports the layers.
Adapters added later (add_adapter, load_adapter) are patched as PEFT creates their layers.
PEFT is imported only when these functions are called.

A patch swaps the module's class for a fused subclass of its PEFT class: FusedLoraLinear for a
lora.Linear, a Fused<LoraModel> (mixed-batch training, patching of later adapters) for the LoraModel;
the instance itself is unchanged. Copies (copy.copy, copy.deepcopy, nn.DataParallel's replicas) keep
the class, so they stay patched and run on their own weights. The fused classes pickle as their PEFT
class: a saved patched model names nothing of lora_kernels and loads as plain PEFT, with or without
lora_kernels (patch_peft it again after loading). unpatch_peft swaps the PEFT class back.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import copy
import copyreg
import warnings
import weakref

import torch
from torch import nn

from ..metadata import AdapterBatch, to_device
from ..ops.lora_linear import lora_linear
from ..ops.multi_lora_linear import multi_lora_linear


class PatchResult(int):
    """The number of layers now on the fused path (an int), with `.fallbacks`: {layer name: why
    it stays on PEFT's forward} for the PEFT LoRA layers that were not patched."""

    fallbacks: dict[str, str]

    def __new__(cls, count: int, fallbacks: dict[str, str]):
        result = super().__new__(cls, count)
        result.fallbacks = fallbacks
        return result


def _lora_linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


_FUSED_CLASSES: dict[type, type] = {}   # PEFT class -> its fused subclass (FusedLoraLinear, Fused<LoraModel>)
_PEFT_FORWARD = None   # PEFT's lora.Linear.forward as it was when lora_kernels first patched or created a layer


def _remember_peft_forward() -> None:
    """The fused forward's fallback calls this reference, not lora.Linear.forward looked up per call:
    a library that replaces that method later and routes it back through the patched layer's own
    forward would otherwise make the two call each other until RecursionError."""
    global _PEFT_FORWARD
    if _PEFT_FORWARD is None:
        _PEFT_FORWARD = _lora_linear_class().forward


class _PicklesAsPeft(abc.ABCMeta):
    """The fused classes' metaclass: its own type, so that copyreg can pickle a fused class, wherever
    it appears (a module's class, a LoraConfig's custom-module mapping), as its PEFT class."""


def _pickle_as_peft(cls):
    peft_class = cls.__bases__[0]
    if _FUSED_CLASSES.get(peft_class) is not cls:
        return cls.__qualname__                  # someone's own subclass of a fused class: by name, as usual
    return copy.copy, (peft_class,)              # copy.copy of a class is the class itself


def _register_fused_class(peft_class: type, fused_class: type) -> type:
    """Records `fused_class` as the fused subclass of `peft_class`; the first one also registers the
    fused classes' pickling (so importing lora_kernels registers nothing)."""
    if not _FUSED_CLASSES:
        copyreg.pickle(_PicklesAsPeft, _pickle_as_peft)
    _FUSED_CLASSES[peft_class] = fused_class
    return fused_class


def _is_fused(module: nn.Module) -> bool:
    """Whether `module`'s class is one of the fused classes (patched, or created by register_fused_peft)."""
    return _FUSED_CLASSES.get(type(module).__bases__[0]) is type(module)


def fused_lora_linear_class() -> type:
    """FusedLoraLinear: PEFT's lora.Linear with the fused forward. patch_peft gives this class to
    lora.Linear layers; PEFT's custom-module route (register_fused_peft) creates layers of it. Pickled,
    the class is PEFT's lora.Linear: a saved model loads as plain PEFT, without lora_kernels."""
    peft_class = _lora_linear_class()
    if peft_class not in _FUSED_CLASSES:
        _remember_peft_forward()
        _register_fused_class(peft_class, _PicklesAsPeft("FusedLoraLinear", (peft_class,), {
            "forward": _fused_forward, "__module__": __name__,
            "__doc__": "PEFT's lora.Linear on lora_kernels' fused ops (see lora_kernels.nn.peft)."}))
    return _FUSED_CLASSES[peft_class]


def register_fused_peft(config) -> None:
    """Registers FusedLoraLinear for nn.Linear in a peft.LoraConfig (PEFT's experimental
    `_register_custom_module`): get_peft_model / add_adapter with this config then create every
    nn.Linear LoRA layer on the fused path, no patch_peft needed.

    >>> import torch, peft, lora_kernels
    >>> config = peft.LoraConfig(r=2, target_modules=["0"])
    >>> lora_kernels.register_fused_peft(config)
    >>> model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), config)
    >>> type(model.base_model.model[0]).__name__
    'FusedLoraLinear'
    """
    config._register_custom_module({nn.Linear: fused_lora_linear_class()})


def unfusable_reason(layer) -> str | None:
    """Why a PEFT lora.Linear cannot take the fused path at all, or None."""
    if type(layer) not in (_lora_linear_class(), _FUSED_CLASSES.get(_lora_linear_class())):
        return f"{type(layer).__name__} is not peft's lora.Linear"
    if type(layer.get_base_layer()) is not nn.Linear:
        return f"base layer is {type(layer.get_base_layer()).__name__}, not nn.Linear"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D-style weights)"
    if getattr(layer, "lora_variant", None):
        return f"LoRA variants (DoRA, ...) on adapters {sorted(layer.lora_variant)}"
    return None


def _module_hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _hooked(layer, base: nn.Linear) -> bool:
    """Whether something expects the base layer or the LoRA factors' modules to be called (forward
    hooks, pre-hooks such as weight_norm, accelerate / ZeRO-3 / FSDP weight gathering, a replaced
    forward): the fused path reads their weights directly, so PEFT's forward must run instead."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    modules = [base, *layer.lora_A.values(), *layer.lora_B.values(), *layer.lora_dropout.values()]
    return any(_module_hooked(m) for m in modules)


def _dropout_p(layer, adapter: str) -> float | None:
    """The adapter's dropout probability now (0 in eval), or None for a dropout we do not know."""
    module = layer.lora_dropout[adapter]
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p if module.training else 0.0
    return None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """FusedLoraLinear's forward: the fused ops where they give PEFT's result, PEFT's own
    lora.Linear.forward otherwise."""
    peft_forward = _PEFT_FORWARD
    adapter_names = kwargs.get("adapter_names")
    if args or set(kwargs) - {"adapter_names"} or self.disable_adapters or self.merged \
            or unfusable_reason(self) is not None:
        return peft_forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    if x.dtype != base.weight.dtype or x.device != base.weight.device \
            or torch.is_autocast_enabled(x.device.type) or _hooked(self, base):
        return peft_forward(self, x, *args, **kwargs)
    result = (_mixed_forward(self, base, x, adapter_names) if adapter_names is not None
              else _active_forward(self, base, x))
    return result if result is not None else peft_forward(self, x, *args, **kwargs)


def _factors(layer, adapter: str, dtype: torch.dtype):
    """(A (r, K), B (N, r)) in the activations' dtype: PEFT keeps adapters in fp32 under bf16
    autocast; the small factors are cast, never x."""
    return layer.lora_A[adapter].weight.to(dtype), layer.lora_B[adapter].weight.to(dtype)


def _active_forward(layer, base: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """Base + Σ over the active adapters (PEFT sums them): one fused call; several adapters are
    concatenated into one of rank Σ r_i with the scales folded into B (exact; only without dropout)."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return base(x)
    dropouts = [_dropout_p(layer, a) for a in active]
    if any(p is None for p in dropouts) or (len(active) > 1 and any(dropouts)):
        return None
    bias = base.bias
    for adapter in active:   # lora_bias: lora_B's bias, scaled like the rest of the LoRA term
        lora_bias = layer.lora_B[adapter].bias
        if lora_bias is not None:
            term = layer.scaling[adapter] * lora_bias.to(x.dtype)
            bias = term if bias is None else bias + term
    if len(active) == 1:
        lora_a, lora_b = _factors(layer, active[0], x.dtype)
        return lora_linear(x, base.weight, bias, lora_a, lora_b, layer.scaling[active[0]], dropout_p=dropouts[0])
    factors = [_factors(layer, a, x.dtype) for a in active]
    lora_a = torch.cat([a for a, _ in factors])                                             # (Σr, K)
    lora_b = torch.cat([b * layer.scaling[name] for (_, b), name in zip(factors, active)], dim=1)   # (N, Σr)
    return lora_linear(x, base.weight, bias, lora_a, lora_b, 1.0)


# The AdapterBatches of the mixed batch in flight, shared by its layers: {key: (adapter_names, batch)},
# set by FusedLoraModel._enable_peft_forward_hooks for one forward (or one generate), None elsewhere.
# A ContextVar: nn.DataParallel runs its replicas in threads, each with its own batch.
_MIXED_BATCHES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lora_kernels_mixed_batches",
                                                                             default=None)
# Per layer: (key, scales (L,) fp32, ranks (L,) int32) on the layer's device, rebuilt when the key (its
# adapters, their scaling and ranks, the device) changes. Weak: copies and replicas keep their own.
_LAYER_CONSTANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mixed_batch(names: tuple, adapter_names, rows_per_sample: int, device: torch.device) -> AdapterBatch:
    """The AdapterBatch of one row per (sample, position): sample i uses the layer slot of adapter_names[i].
    Built once per batch, not per layer, inside FusedLoraModel's forward: every layer with the same
    adapters (in the same order) reuses it, so a batch costs one host-to-device copy of its ids.
    Keyed on the names list itself (PEFT hands every layer the same list; the cache holds it, so its
    id is not reused while cached). Built per call elsewhere (a LoraModel patch_peft has not patched,
    as with register_fused_peft alone; a layer called directly) and inside a torch.compile trace."""
    batches = None if torch.compiler.is_compiling() else _MIXED_BATCHES.get()
    key = (id(adapter_names), names, rows_per_sample, device)
    if batches is not None and key in batches:
        return batches[key][1]
    slot = {name: index for index, name in enumerate(names)}
    sample_ids = to_device(torch.tensor([slot.get(name, -1) for name in adapter_names], dtype=torch.int64),
                           device)                                                         # (B,)
    ids = sample_ids[:, None].expand(-1, rows_per_sample).reshape(-1)                       # (M,)
    batch = AdapterBatch(ids, len(names), check=False)   # valid by construction: no sync
    if batches is not None:
        batches[key] = (adapter_names, batch)
    return batch


def _layer_constants(layer, names: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales (L,) fp32, ranks (L,) int32) of the layer's adapters on `device`, copied to the device
    only when they change (the first call, set_scale, an adapter added or removed): not per call.
    Inside a torch.compile trace: built afresh (the graph holds them)."""
    key = (names, tuple(float(layer.scaling[a]) for a in names),
           tuple(layer.lora_A[a].weight.shape[0] for a in names), device)
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else _LAYER_CONSTANTS.get(layer)
    if cached is None or cached[0] != key:
        scales = to_device(torch.tensor(key[1], dtype=torch.float32), device)
        ranks = to_device(torch.tensor(key[2], dtype=torch.int32), device)
        cached = (key, scales, ranks)
        if not compiling:
            _LAYER_CONSTANTS[layer] = cached
    return cached[1], cached[2]


def _mixed_forward(layer, base: nn.Linear, x: torch.Tensor, adapter_names) -> torch.Tensor | None:
    """PEFT's mixed batch (one adapter name per sample, "__base__" for none) on multi_lora_linear:
    this layer's adapters stacked (padded to the largest rank, true ranks kept), one id per row.
    Per layer call: no host sync, no host-to-device copy (the batch's ids are copied once per batch,
    see _mixed_batch; the scales and ranks when they change, see _layer_constants)."""
    if len(adapter_names) != len(x):
        raise ValueError(f"adapter_names has {len(adapter_names)} names but the input has {len(x)} samples "
                         "(x's first dim): one name per sample")
    names = tuple(layer.lora_A)
    dropouts = [_dropout_p(layer, a) for a in names]
    if any(layer.lora_B[a].bias is not None for a in names) or any(p is None or p > 0 for p in dropouts):
        return None   # per-row lora_bias / dropout (or a dropout module we do not know): PEFT's mixed forward
    rows_per_sample = x.numel() // max(x.shape[-1], 1) // max(len(x), 1)
    scales, ranks = _layer_constants(layer, names, x.device)
    batch = _mixed_batch(names, adapter_names, rows_per_sample, x.device).with_ranks(ranks)
    factors = [_factors(layer, a, x.dtype) for a in names]
    max_rank = max(a.shape[0] for a, _ in factors)
    lora_a = torch.stack([nn.functional.pad(a, (0, 0, 0, max_rank - a.shape[0])) for a, _ in factors])   # (L, R, K)
    lora_b = torch.stack([nn.functional.pad(b, (0, max_rank - b.shape[1])) for _, b in factors])         # (L, N, R)
    return multi_lora_linear(x, base.weight, base.bias, lora_a, lora_b, scales, batch)


def _fused_lora_model_class(peft_class: type) -> type:
    """Fused<LoraModel>: the LoraModel class `peft_class` with mixed-batch training and the patching
    of adapters added later (one class per PEFT class, created when first needed)."""
    if peft_class in _FUSED_CLASSES:
        return _FUSED_CLASSES[peft_class]

    class FusedLoraModel(peft_class, metaclass=_PicklesAsPeft):
        @contextlib.contextmanager
        def _enable_peft_forward_hooks(self, *args, **kwargs):
            """PEFT's own set-up of ``adapter_names=`` (name checks, the hooks that hand the names
            to every LoRA layer), minus its refusal in training mode: a mixed batch trains on the
            fused path, each row's gradient going to its own adapter. The refusal reads the
            LoraModel's own `training` flag only; it is lowered just while PEFT checks."""
            training = self.training
            mixed = kwargs.get("adapter_names") is not None
            if mixed and training:
                if any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules()):
                    raise ValueError("mixed adapter batches (adapter_names=) cannot train with gradient "
                                     "checkpointing: the recomputation in backward would run without the "
                                     "adapter names. Disable gradient checkpointing for these steps")
                self.training = False
            try:
                hooks = super()._enable_peft_forward_hooks(*args, **kwargs)
                hooks.__enter__()
            finally:
                self.training = training
            batches = _MIXED_BATCHES.set({}) if mixed else None   # the layers' shared AdapterBatches
            try:
                yield
            finally:
                if batches is not None:
                    _MIXED_BATCHES.reset(batches)
                hooks.__exit__(None, None, None)

        def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
            """PEFT's inject_adapter (under add_adapter and load_adapter), then the new adapter's
            layers on the fused path; a warning names the layers where the new adapter stays on
            PEFT's forward, as patch_peft's `.fallbacks` would."""
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            fallbacks = patch_peft(self).fallbacks
            here = {name: why for name, why in fallbacks.items()
                    if adapter_name in getattr(self.get_submodule(name), "scaling", {})}   # LoRA layers of every kind
            if here:
                listed = "; ".join(f"{name}: {why}" for name, why in here.items())
                warnings.warn(f"lora_kernels: adapter {adapter_name!r} runs on PEFT's forward, not fused, in "
                              f"{len(here)} layer(s): {listed}", stacklevel=3)

    FusedLoraModel.__name__ = FusedLoraModel.__qualname__ = "Fused" + peft_class.__name__
    FusedLoraModel.__doc__ = f"PEFT's {peft_class.__name__} with lora_kernels' patch (see lora_kernels.nn.peft)."
    return _register_fused_class(peft_class, FusedLoraModel)


def patch_peft(model: nn.Module) -> PatchResult:
    """Puts every PEFT lora.Linear of `model` on the fused path, in place; returns how many (an int
    whose `.fallbacks` names the LoRA layers left on PEFT's forward, and why). Idempotent.

    >>> import torch, peft, lora_kernels
    >>> model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
    ...                             peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    >>> x = torch.randn(3, 8)
    >>> expected = model(x)
    >>> lora_kernels.patch_peft(model)
    1
    >>> torch.allclose(model(x), expected, atol=1e-6)
    True
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.lora.model import LoraModel

    count, fallbacks = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraModel) and not _is_fused(module):
            module.__class__ = _fused_lora_model_class(type(module))
        if not isinstance(module, LoraLayer):
            continue
        reason = unfusable_reason(module)
        if reason is not None:
            fallbacks[name] = reason
            continue
        if type(module) is _lora_linear_class():
            module.__class__ = fused_lora_linear_class()
        count += 1
    return PatchResult(count, fallbacks)


def unpatch_peft(model: nn.Module) -> int:
    """Gives every LoRA layer and LoraModel on a fused class (patch_peft's, or register_fused_peft's
    layers) its PEFT class back; returns how many LoRA layers."""
    from peft.tuners.lora.layer import LoraLayer

    count = 0
    for module in model.modules():
        if _is_fused(module):
            count += isinstance(module, LoraLayer)
            module.__class__ = type(module).__bases__[0]
    return count
