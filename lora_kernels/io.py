"""Read and write LoRA adapter files in PEFT's on-disk layout, without PEFT and without unpickling.

A PEFT LoRA adapter is a directory holding two files:

- ``adapter_config.json``: the ``LoraConfig`` as JSON (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``lora_bias``, ...).
- ``adapter_model.safetensors``: for every adapted ``nn.Linear`` at module path ``<m>`` of the base
  model, ``base_model.model.<m>.lora_A.weight`` (r, K) and ``base_model.model.<m>.lora_B.weight``
  (N, r), plus ``base_model.model.<m>.lora_B.bias`` (N,) when ``lora_bias=True``. The adapter name
  (``"default"``) is not part of the saved keys.

The layer computes ``y = x W0ᵀ + b + scale · (x Aᵀ) Bᵀ (+ scale · lora_bias)`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and ``lora_alpha``
come from ``rank_pattern`` / ``alpha_pattern`` when a key there matches the module path (first
matching key wins, matched as PEFT does: ``re.match(rf"(.*\\.)?({key})$", path)``, but without
backtracking, so a crafted key such as ``(a+)+`` cannot take exponential time; keys using regex features
beyond SafeRegex's subset (back-references, look-arounds, inline flags) raise ValueError).

Only that plain-LoRA-on-Linear content is supported. Anything else that PEFT may store (DoRA, LoRA on
embeddings or convolutions, ``fan_in_fan_out``, trained base biases, ``modules_to_save``, other PEFT
methods, initialisations that rewrite the base weights such as PiSSA) raises ``NotImplementedError``
instead of loading into something that would compute a different function. A file that is not a
consistent adapter raises ``ValueError`` naming the key, its shape and what was expected.

``safetensors`` is imported only inside the functions, so ``import lora_kernels`` never needs it. Files
are never unpickled: PEFT's legacy ``adapter_model.bin`` (a ``torch.save`` pickle) is refused unless
``allow_legacy_bin=True`` is passed, and is then read with ``torch.load(weights_only=True)`` only.

>>> import tempfile, torch
>>> from lora_kernels.io import AdapterWeights, LayerAdapter, read_adapter, write_adapter
>>> layer = LayerAdapter(lora_a=torch.ones(4, 16), lora_b=torch.zeros(32, 4), scale=2.0)
>>> with tempfile.TemporaryDirectory() as path:
...     write_adapter(path, AdapterWeights({"model.layers.0.self_attn.q_proj": layer}))
...     loaded = read_adapter(path)
>>> q = loaded.layers["model.layers.0.self_attn.q_proj"]
>>> q.rank, q.in_features, q.out_features, q.scale
(4, 16, 32, 2.0)
>>> loaded.config["r"], loaded.config["lora_alpha"], loaded.config["target_modules"]
(4, 8, ['model.layers.0.self_attn.q_proj'])
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._safe_regex import SafeRegex
from .reference import lora_scaling

__all__ = [
    "CONFIG_NAME",
    "LEGACY_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "AdapterWeights",
    "LayerAdapter",
    "read_adapter",
    "write_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"

_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model
# write_adapter's transaction (see its docstring): the new pair is written into a staging directory,
# which is renamed to _PENDING (the commit point), from where the pair is moved into place.
_STAGING_PREFIX = ".lora_kernels_save."  # + random + ".tmp"
_PENDING = ".lora_kernels_save.pending"
_OLD = "old."  # inside _PENDING: the replaced pair, kept until the new one is in place
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
_NAMED_ADAPTER_KEY_RE = re.compile(r"\.lora_[AB]\.[^.]+\.(weight|bias)$")

# LoraConfig defaults, used for fields an adapter_config.json leaves out (as PEFT itself does).
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8

# LoraConfig fields that switch on a LoRA variant with a different forward, or content this module does
# not represent; any truthy value is refused.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA (use_dora=True) adds a magnitude vector and a weight-norm to the forward",
    "velora_config": "VeLoRA (velora_config) changes the forward",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) activates the adapter per token",
    "monteclora_config": "MonteCLoRA (monteclora_config) changes the forward",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token",
    "kasa_config": "KaSA (kasa_config) changes the forward",
    "use_qalora": "QA-LoRA (use_qalora=True) pools the input before lora_A",
    "modules_to_save": "modules_to_save stores whole trained modules next to the LoRA factors",
    "trainable_token_indices": "trainable_token_indices stores trained embedding rows",
    "target_parameters": "target_parameters puts LoRA on nn.Parameters (e.g. MoE experts), not nn.Linear layers",
    "layer_replication": "layer_replication targets layers that exist only after PEFT duplicates them",
}
# init_lora_weights values whose adapters pair with the base model as it is (the saved factors are final).
_PLAIN_INITS = {"gaussian", "eva", "orthogonal"}


@dataclass
class LayerAdapter:
    """One adapted linear layer: ``delta(x) = scale · (x lora_aᵀ) lora_bᵀ (+ scale · lora_bias)``.

    lora_a: (r, K)   lora_b: (N, r)   scale: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    lora_bias: (N,) or None; PEFT's ``lora_B.bias`` (``lora_bias=True``), scaled like lora_b.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    lora_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """r, the number of rows of lora_a."""
        return int(self.lora_a.shape[0])

    @property
    def in_features(self) -> int:
        """K, the layer's input width."""
        return int(self.lora_a.shape[1])

    @property
    def out_features(self) -> int:
        """N, the layer's output width."""
        return int(self.lora_b.shape[0])


@dataclass
class AdapterWeights:
    """A LoRA adapter: its layers by module path in the base model (``"model.layers.0.self_attn.q_proj"``,
    without PEFT's ``base_model.model.`` prefix) and the raw ``adapter_config.json`` as a dict."""

    layers: dict[str, LayerAdapter]
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# config


_MAX_RANK = 2**63 - 1  # the largest tensor dimension
_MAX_PATTERN_CHARS = 1000  # a module path is ~60 characters; the matching cost grows with the length
_REGEX_OPERATORS = frozenset("*+?{}|()")


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= _MAX_RANK


def _is_number(value) -> bool:
    """A finite int or float that a float can hold (10**400 is an int but no float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _module_matcher(regex: str, user_part: str, whole: bool):
    """name -> bool: ``re.fullmatch(regex, name)`` (whole) or ``re.match(regex, name)``, where `regex` is
    `user_part`, a pattern from a config, as PEFT embeds it. ValueError for a pattern that is invalid or
    outside SafeRegex's subset (back-references, look-arounds, flags).

    The cost is bounded by len(name) · len(user_part): a user part without quantifiers, groups or
    alternation (a module path such as "model.layers.0.q_proj" — the common case) goes to `re`, which
    then has at most one loop to retry (PEFT's own "(.*\\.)?" prefix); any other runs on SafeRegex,
    which never backtracks ("(a+)+" against "aaa…a!" would take ~2**len(name) steps in `re`)."""
    if len(user_part) > _MAX_PATTERN_CHARS:
        raise ValueError(f"longer than {_MAX_PATTERN_CHARS} characters")
    try:
        compiled = re.compile(regex)  # compiling does not backtrack; it gives re's own message for invalid syntax
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None
    except RecursionError:
        raise ValueError("groups nested too deeply") from None
    if _REGEX_OPERATORS.isdisjoint(user_part):
        find = compiled.fullmatch if whole else compiled.match
        return lambda name: find(name) is not None
    safe = SafeRegex(regex)
    return safe.fullmatch if whole else safe.match


def _peft_key_matcher(key: str):
    """name -> whether PEFT's get_pattern_key takes `key` for module path `name`:
    ``re.match(rf"(.*\\.)?({key})$", name)``, with the cost bounded (_module_matcher)."""
    return _module_matcher(rf"(.*\.)?({key})$", key, whole=False)


def _check_supported(config: dict, source: str) -> None:
    """NotImplementedError for content a LayerAdapter cannot represent faithfully."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{source}: no 'peft_type'; a PEFT LoRA adapter config has \"peft_type\": \"LORA\"")
    if peft_type != "LORA":
        raise NotImplementedError(f"{source}: peft_type={peft_type!r}; only LoRA adapters (\"LORA\") are supported")
    for name, why in _UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise NotImplementedError(f"{source}: {name}={config[name]!r} is not supported: {why}")
    if config.get("fan_in_fan_out"):
        raise NotImplementedError(
            f"{source}: fan_in_fan_out=True (GPT-2 style Conv1D base weights stored (K, N)) is not supported")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise NotImplementedError(
            f"{source}: bias={bias!r} is not supported: the adapter then carries trained base-layer biases; "
            "only bias=\"none\" is")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _PLAIN_INITS:
        raise NotImplementedError(
            f"{source}: init_lora_weights={init!r} is not supported: PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA "
            "adapters are trained against rewritten base weights and MiCA is a LoRA variant; convert the adapter "
            "to plain LoRA first (PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")


@dataclass
class _Spec:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: list  # [(key, matcher: name -> bool, r)] in the config's order
    alpha_pattern: list  # [(key, matcher, lora_alpha)]
    lora_bias: bool

    def resolve(self, module: str) -> tuple[int, float, str | None, str | None]:
        """(r, lora_alpha, rank_pattern key used, alpha_pattern key used) for a module path."""
        r_key, r = _match_pattern(self.rank_pattern, module, self.r)
        alpha_key, alpha = _match_pattern(self.alpha_pattern, module, self.lora_alpha)
        return r, alpha, r_key, alpha_key

    def scale(self, r: int, alpha: float) -> float:
        return lora_scaling(r, alpha, self.use_rslora)


def _match_pattern(patterns: list, module: str, default):
    # peft.utils.other.get_pattern_key: the first key (in the config's order) for which the module path
    # is the key, or ends with "." + key, with the key read as a regex; failing that, PEFT looks the
    # path itself up (pattern.get(path, default)).
    for key, matches, value in patterns:
        if matches(module):
            return key, value
    for key, _, value in patterns:
        if key == module:
            return key, value
    return None, default


def _spec(config: dict, source: str) -> _Spec:
    """The fields that decide ranks and scales, checked."""
    r = config.get("r", _DEFAULT_R)
    if not _is_rank(r):
        raise ValueError(f"{source}: r={r!r}; expected a positive integer (at most 2**63 - 1)")
    alpha = config.get("lora_alpha", _DEFAULT_ALPHA)
    if not _is_number(alpha):
        raise ValueError(f"{source}: lora_alpha={alpha!r}; expected a finite number within float range")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"{source}: use_rslora={use_rslora!r}; expected true or false")
    lora_bias = config.get("lora_bias", False)
    if not isinstance(lora_bias, bool):
        raise ValueError(f"{source}: lora_bias={lora_bias!r}; expected true or false")
    patterns = {}
    for name, check, expected in (("rank_pattern", _is_rank, "a positive integer (at most 2**63 - 1)"),
                                  ("alpha_pattern", _is_number, "a finite number within float range")):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise ValueError(f"{source}: {name}={pattern!r}; expected an object mapping module patterns to values")
        patterns[name] = []
        for key, value in pattern.items():
            if not check(value):
                raise ValueError(f"{source}: {name}[{key!r}]={value!r}; expected {expected}")
            if not isinstance(key, str):
                raise ValueError(f"{source}: {name} key {key!r} is not a string")
            try:
                patterns[name].append((key, _peft_key_matcher(key), value))
            except ValueError as e:
                raise ValueError(
                    f"{source}: {name} key {key!r} is refused as a module pattern: {e} (keys are regular "
                    "expressions; read_adapter evaluates them without backtracking and supports literals, '.', "
                    "classes, groups, '|', quantifiers, '^' and '$')") from None
    return _Spec(r, alpha, use_rslora, patterns["rank_pattern"], patterns["alpha_pattern"], lora_bias)


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: a PEFT adapter keeps {CONFIG_NAME} next to its weights") from None
    try:
        config = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer of more than sys.get_int_max_str_digits() digits
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}; expected an object")
    return config


# ----------------------------------------------------------------------------------------------------
# load


def _locate(path) -> tuple[Path, Path]:
    """(weights file, config file) for a directory or a weights file."""
    p = Path(os.fspath(path))
    pending = p / _PENDING
    if (pending / CONFIG_NAME).is_file():  # a write_adapter interrupted after its commit point: its new pair
        weights = pending / WEIGHTS_NAME
        return (weights if weights.is_file() else p / WEIGHTS_NAME), pending / CONFIG_NAME
    if p.is_dir():
        for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
            if (p / name).is_file():
                return p / name, p / CONFIG_NAME
        raise FileNotFoundError(f"{p} holds neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    if p.is_file():
        return p, p.parent / CONFIG_NAME
    raise FileNotFoundError(f"no LoRA adapter at {p}: no such directory or file")


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save zip, or a raw pickle


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("reading LoRA adapters needs the 'safetensors' package: pip install safetensors") from None
    try:
        return load_file(os.fspath(path), device="cpu")
    except OSError:
        raise
    except Exception as e:  # safetensors_rust.SafetensorError and friends
        hint = (" (it looks like a torch.save pickle; those are never unpickled here)"
                if _looks_like_pickle(path) else "")
        raise ValueError(f"{path} is not a valid safetensors file{hint}: {e}") from None


def _read_legacy_bin(path: Path, allow_legacy_bin: bool) -> dict[str, torch.Tensor]:
    if not allow_legacy_bin:
        raise ValueError(
            f"{path} is a pickle-based checkpoint (torch.save); it is not unpickled. Convert it to "
            f"{WEIGHTS_NAME}, or pass allow_legacy_bin=True to read it with torch.load(weights_only=True)")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        raise RuntimeError(
            f"refusing to read {path}: torch.load(weights_only=True) before torch 2.6 can run code from a "
            "crafted file (CVE-2025-32434); upgrade torch or convert the file to safetensors")
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: torch.load(weights_only=True) refused or failed to read it: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a dict of named tensors")
    return state


def _reject_key(key: str, source: Path) -> None:
    if "lora_magnitude_vector" in key:
        raise NotImplementedError(f"{source}: {key!r} is a DoRA magnitude vector; DoRA adapters are not supported")
    if "lora_embedding_A" in key or "lora_embedding_B" in key:
        raise NotImplementedError(f"{source}: {key!r} is LoRA on an embedding layer; only linear layers are supported")
    if _NAMED_ADAPTER_KEY_RE.search(key):
        raise ValueError(
            f"{source}: {key!r} has an adapter name between lora_A/lora_B and the parameter; PEFT saves keys "
            "without it (<module>.lora_A.weight)")
    raise NotImplementedError(
        f"{source}: tensor {key!r} is not a LoRA linear factor (<module>.lora_A.weight, <module>.lora_B.weight or "
        "<module>.lora_B.bias): modules_to_save, trained biases or another PEFT method are not supported")


def _check_factor(key: str, t: torch.Tensor, source) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{source}: {key} has dtype {t.dtype}; expected a floating-point tensor")
    if t.ndim in (3, 4, 5):
        raise NotImplementedError(
            f"{source}: {key} has shape {tuple(t.shape)}: LoRA on a convolution; only linear layers are supported")
    if t.ndim != 2 or 0 in t.shape:
        raise ValueError(f"{source}: {key} has shape {tuple(t.shape)}; expected a 2-D non-empty matrix")


def _parse_layers(tensors: dict[str, torch.Tensor], spec: _Spec, source: Path) -> dict[str, LayerAdapter]:
    if not tensors:
        raise ValueError(f"{source} holds no tensors")
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = collections.defaultdict(dict)
    for key, t in tensors.items():
        name = key.removeprefix(_PREFIX)
        m = _KEY_RE.match(name)
        if m is None:
            _reject_key(key, source)
        module, param = m.group("module"), m.group("param")
        if param in grouped[module]:
            raise ValueError(f"{source}: {key} and {grouped[module][param][0]} are the same parameter of {module}")
        grouped[module][param] = (key, t)

    layers = {}
    for module in sorted(grouped):
        entries = grouped[module]
        stem = next(iter(entries.values()))[0].rsplit(".lora_", 1)[0]
        a_key, b_key, bias_key = (entries.get(p, (f"{stem}.{p}",))[0]
                                  for p in ("lora_A.weight", "lora_B.weight", "lora_B.bias"))
        for have, need in (("lora_A.weight", "lora_B.weight"), ("lora_B.weight", "lora_A.weight"),
                           ("lora_B.bias", "lora_A.weight")):
            if have in entries and need not in entries:
                raise ValueError(f"{source}: {entries[have][0]} has no matching {stem}.{need}")
        a, b = entries["lora_A.weight"][1], entries["lora_B.weight"][1]
        _check_factor(a_key, a, source)
        _check_factor(b_key, b, source)
        r = a.shape[0]
        if b.shape[1] != r:
            raise ValueError(
                f"{source}: {b_key} has shape {tuple(b.shape)}; expected (N, {r}) to match {a_key} of shape "
                f"{tuple(a.shape)} (lora_A is (r, K), lora_B is (N, r))")
        r_expected, alpha, r_key, _ = spec.resolve(module)
        if r != r_expected:
            where = f"rank_pattern[{r_key!r}]" if r_key is not None else "r"
            raise ValueError(
                f"{source}: {a_key} has shape {tuple(a.shape)}, rank {r}; {CONFIG_NAME} gives {where}={r_expected} "
                f"for {module}")
        bias = entries.get("lora_B.bias", (None, None))[1]
        if bias is not None:
            if not spec.lora_bias:
                raise ValueError(f"{source}: {bias_key} is present but {CONFIG_NAME} has lora_bias=false")
            if not bias.is_floating_point() or tuple(bias.shape) != (b.shape[0],):
                raise ValueError(
                    f"{source}: {bias_key} has shape {tuple(bias.shape)} and dtype {bias.dtype}; expected a "
                    f"floating-point ({b.shape[0]},) vector to match {b_key} of shape {tuple(b.shape)}")
        elif spec.lora_bias:
            raise ValueError(f"{source}: {CONFIG_NAME} has lora_bias=true but {bias_key} is missing")
        layers[module] = LayerAdapter(lora_a=a, lora_b=b, scale=spec.scale(r, alpha), lora_bias=bias)
    return layers


def read_adapter(path, device="cpu", dtype: torch.dtype | None = None, *,
                 allow_legacy_bin: bool = False) -> AdapterWeights:
    """Read a PEFT LoRA adapter: a directory with ``adapter_model.safetensors`` and ``adapter_config.json``,
    or the ``.safetensors`` file itself with the config beside it.

    Returns AdapterWeights whose layers are keyed by module path (PEFT's ``base_model.model.`` prefix
    stripped; keys saved without it are accepted too), each with lora_a (r, K), lora_b (N, r), the
    per-module scale PEFT would use (rank_pattern / alpha_pattern / use_rslora applied) and lora_bias
    (N,) or None; ``config`` is the JSON as read. Tensors go to `device`, and to `dtype` when given.

    Raises FileNotFoundError (no adapter or no config), ValueError (an inconsistent file: unpaired or
    mis-shaped factors, a rank that disagrees with the config, not safetensors) and NotImplementedError
    (DoRA, embeddings, convolutions, fan_in_fan_out, other PEFT methods; see the module docstring).

    PEFT's legacy ``adapter_model.bin`` is refused unless ``allow_legacy_bin=True``, and then read with
    ``torch.load(weights_only=True)`` (torch >= 2.6 only); nothing is ever fully unpickled.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r}; expected a floating-point torch.dtype or None")
    weights_file, config_file = _locate(path)
    config = _read_config(config_file)
    _check_supported(config, str(config_file))
    spec = _spec(config, str(config_file))
    if weights_file.suffix == ".bin":
        tensors = _read_legacy_bin(weights_file, allow_legacy_bin)
    else:
        tensors = _read_safetensors(weights_file)
    layers = _parse_layers(tensors, spec, weights_file)
    for layer in layers.values():
        layer.lora_a = layer.lora_a.to(device=device, dtype=dtype)
        layer.lora_b = layer.lora_b.to(device=device, dtype=dtype)
        if layer.lora_bias is not None:
            layer.lora_bias = layer.lora_bias.to(device=device, dtype=dtype)
    return AdapterWeights(layers=layers, config=config)


# ----------------------------------------------------------------------------------------------------
# save


def _check_layers(adapter: AdapterWeights) -> None:
    if not isinstance(adapter, AdapterWeights):
        raise TypeError(f"expected an AdapterWeights, got {type(adapter).__name__}")
    if not isinstance(adapter.config, dict):
        raise TypeError(f"AdapterWeights.config must be a dict, got {type(adapter.config).__name__}")
    if not isinstance(adapter.layers, dict) or not adapter.layers:
        raise ValueError("AdapterWeights.layers is empty; nothing to save")
    for name, layer in adapter.layers.items():
        if (not isinstance(name, str) or not name or name.startswith(".") or name.endswith(".")
                or ".." in name or name.startswith(_PREFIX) or _KEY_RE.match(name)):
            raise ValueError(
                f"layer name {name!r}: expected a module path such as 'model.layers.0.self_attn.q_proj' "
                f"(without the {_PREFIX!r} prefix or a lora_A/lora_B suffix)")
        if not isinstance(layer, LayerAdapter):
            raise TypeError(f"layers[{name!r}] is a {type(layer).__name__}; expected a LayerAdapter")
        for attr in ("lora_a", "lora_b"):
            t = getattr(layer, attr)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"layers[{name!r}].{attr} is a {type(t).__name__}; expected a tensor")
            _check_factor(f"layers[{name!r}].{attr}", t, "write_adapter")
        a, b = layer.lora_a, layer.lora_b
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"write_adapter: layers[{name!r}].lora_b has shape {tuple(b.shape)}; expected (N, {a.shape[0]}) to "
                f"match lora_a of shape {tuple(a.shape)} (lora_a is (r, K), lora_b is (N, r))")
        if layer.lora_bias is not None:
            bias = layer.lora_bias
            if (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                    or tuple(bias.shape) != (b.shape[0],)):
                shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(
                    f"write_adapter: layers[{name!r}].lora_bias is {shape}; expected a floating-point "
                    f"({b.shape[0]},) vector to match lora_b of shape {tuple(b.shape)}")
        if not _is_number(layer.scale):
            raise ValueError(f"write_adapter: layers[{name!r}].scale={layer.scale!r}; expected a finite number")


def _targets(config: dict, names) -> bool:
    """Whether PEFT, given this config, puts a LoRA layer on every module in `names`
    (peft.tuners.tuners_utils.check_target_module_exists, without the parts we do not verify)."""
    if config.get("layers_to_transform") is not None or config.get("layers_pattern"):
        return False
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")

    def matcher(spec):  # a string is a regex PEFT fullmatches; a list holds module paths or their ends
        if isinstance(spec, str):
            return _module_matcher(spec, spec, whole=True)
        return lambda name: any(name == t or name.endswith("." + t) for t in spec)

    try:
        if not targets or targets == "all-linear":
            return False
        is_target, is_excluded = matcher(targets), (matcher(excluded) if excluded else lambda name: False)
        return all(is_target(n) and not is_excluded(n) for n in names)
    except (ValueError, TypeError):  # a pattern we do not evaluate: target_modules is rewritten instead
        return False


def _reproduces(config: dict, adapter: AdapterWeights) -> bool:
    """Whether the config's r / lora_alpha / patterns give every layer its rank and (close to) its scale."""
    try:
        spec = _spec(config, CONFIG_NAME)
    except ValueError:
        return False
    for name, layer in adapter.layers.items():
        r, alpha, _, _ = spec.resolve(name)
        if r != layer.rank or not math.isclose(spec.scale(r, alpha), layer.scale, rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def _plain(value: float):
    """An alpha as JSON writes it best: an int when it is one (up to rounding)."""
    nearest = round(value)
    return int(nearest) if math.isclose(value, nearest, rel_tol=1e-12, abs_tol=1e-12) else value


def _pattern_keys(names: list[str]) -> dict[str, str]:
    """A rank/alpha pattern key per module that matches that module and no other of `names`.

    The module path itself is what PEFT users write and what older PEFT (< 0.15) finds by exact lookup;
    where a path also matches another module (one path ends with '.' + the other), use '^' + the escaped
    path, which PEFT >= 0.15 matches exactly."""
    keys = {}
    for name in names:
        try:
            matches = _peft_key_matcher(name)
            plain = matches(name) and not any(matches(n) for n in names if n != name)
        except ValueError:  # not a regex we evaluate (e.g. a crafted name such as "(a+)+")
            plain = False
        keys[name] = name if plain else "^" + re.escape(name)
    return keys


def _rebuild_ranks(config: dict, adapter: AdapterWeights) -> None:
    use_rslora = bool(config.get("use_rslora", False))
    names = sorted(adapter.layers)
    ranks = {n: adapter.layers[n].rank for n in names}
    alphas = {n: _plain(adapter.layers[n].scale * (math.sqrt(ranks[n]) if use_rslora else ranks[n])) for n in names}
    r = collections.Counter(ranks[n] for n in names).most_common(1)[0][0]
    alpha = collections.Counter(alphas[n] for n in names).most_common(1)[0][0]
    keys = _pattern_keys(names)
    config.update(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern={keys[n]: ranks[n] for n in names if ranks[n] != r},
        alpha_pattern={keys[n]: alphas[n] for n in names if alphas[n] != alpha},
    )


def _config_for_save(adapter: AdapterWeights) -> dict:
    config = copy.deepcopy(adapter.config)
    for key, value in config.items():  # as PeftConfig.save_pretrained: sets (target_modules) become lists
        if isinstance(value, (set, frozenset)):
            config[key] = sorted(value)
    config.setdefault("peft_type", "LORA")
    _check_supported(config, "AdapterWeights.config")
    if not _targets(config, adapter.layers):
        config.update(target_modules=sorted(adapter.layers), exclude_modules=None,
                      layers_to_transform=None, layers_pattern=None)
    if not _reproduces(config, adapter):
        _rebuild_ranks(config, adapter)
        if not _reproduces(config, adapter):  # cannot happen: every deviating layer has its own key
            raise RuntimeError("write_adapter: could not express the layers' ranks and scales as a LoRA config")
    config["lora_bias"] = any(layer.lora_bias is not None for layer in adapter.layers.values())
    # PEFT creates every targeted layer with this init before it loads the saved factors: with True, a
    # targeted module that has no saved factors starts at B = 0, i.e. adds nothing.
    config["init_lora_weights"] = True
    for key, value in (("task_type", None), ("base_model_name_or_path", None), ("bias", "none"),
                       ("fan_in_fan_out", False), ("lora_dropout", 0.0), ("inference_mode", True),
                       ("use_dora", False), ("modules_to_save", None)):
        config.setdefault(key, value)
    return {key: config[key] for key in sorted(config)}


def _fsync(path: Path) -> None:
    """Make a file's contents, or a directory's entries, durable (directories: POSIX only)."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_pending_save(directory: Path) -> None:
    """Complete a save that stopped after its commit point (process killed while moving the pair into
    place, or a failed roll-back), and remove staging directories of saves killed before it."""
    pending = directory / _PENDING
    if pending.is_dir():
        if (pending / CONFIG_NAME).exists():  # the new pair is not in place yet
            if os.path.lexists(directory / CONFIG_NAME):  # the old config goes first: no mixed pair
                os.replace(directory / CONFIG_NAME, pending / (_OLD + CONFIG_NAME))
            for name in (WEIGHTS_NAME, CONFIG_NAME):  # the new config comes last
                if (pending / name).exists():
                    os.replace(pending / name, directory / name)
            _fsync(directory)
        shutil.rmtree(pending)
    for staging in directory.glob(_STAGING_PREFIX + "*.tmp"):
        shutil.rmtree(staging)


def _install_pending(directory: Path) -> None:
    """Move the committed pair from _PENDING into `directory`: old config out, old weights out, new
    weights in, new config in, so that a config is only ever present beside its own weights. On an
    error, the moves are undone in reverse order (restoring the old pair) before it is raised."""
    pending = directory / _PENDING
    moves = []  # (source, destination), done
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if os.path.lexists(directory / name):
                os.replace(directory / name, pending / (_OLD + name))
                moves.append((directory / name, pending / (_OLD + name)))
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(pending / name, directory / name)
            moves.append((pending / name, directory / name))
        _fsync(directory)
    except BaseException:
        for source, destination in reversed(moves):
            os.replace(destination, source)
        os.remove(pending / CONFIG_NAME)  # un-commit first: a leftover _PENDING must not be rolled forward
        shutil.rmtree(pending)
        raise
    shutil.rmtree(pending)


def write_adapter(path, adapter: AdapterWeights) -> None:
    """Write `adapter` as a PEFT LoRA adapter directory: ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight`` (r, K), ``...lora_B.weight`` (N, r), ``...lora_B.bias``
    (N,)) and ``adapter_config.json``, so that ``peft.PeftModel.from_pretrained(base_model, path)``
    rebuilds the same layers; read_adapter(path) gives the adapter back.

    ``adapter.config`` is kept when it already gives every layer its rank and scale and targets every
    layer (e.g. an adapter from read_adapter); otherwise ``r``, ``lora_alpha``, ``rank_pattern`` and
    ``alpha_pattern`` (and ``target_modules``: the layers' paths) are rewritten from the layers, with
    ``use_rslora`` as the config has it. ``init_lora_weights`` is set to true and ``lora_bias`` to
    whether any layer has one (layers without a bias then get zeros). Tensors are written from CPU
    copies in their own dtypes. Raises ValueError / TypeError for inconsistent layers and
    NotImplementedError for a config that asks for something read_adapter refuses.

    The two files are replaced as a pair; other files in `path` (README.md, tokenizer files, other
    adapters' subdirectories) are left alone. Both new files are written and fsynced in a staging
    directory inside `path`, which is then renamed to ``.lora_kernels_save.pending`` (the commit point);
    from there the old config, then the old weights move out and the new weights, then the new config
    move in. So a config is never beside weights it was not saved with: a reader that looks at `path`
    meanwhile (PEFT included) finds the old pair, the new pair, or no ``adapter_config.json`` (an error,
    never a mixed adapter).

    - An exception anywhere (writing either file, fsync, any rename) leaves the old pair (or no pair,
      if there was none) and no temporary files, then propagates. (Should undoing fail as well, the
      new pair stays committed, as after a kill.)
    - A process killed before the commit point leaves the old pair and a stale staging directory; one
      killed after it leaves the new pair committed: read_adapter(path) then reads the new pair, and
      the next write_adapter(path) first completes it and removes stale staging directories.
    - One writer at a time: concurrent write_adapter calls on the same `path` are not supported.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("writing LoRA adapters needs the 'safetensors' package: pip install safetensors") from None
    _check_layers(adapter)
    config = _config_for_save(adapter)

    tensors = {}
    for name in sorted(adapter.layers):
        layer = adapter.layers[name]
        # clone: safetensors refuses tensors that share memory (e.g. views of one buffer)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_a.detach().to("cpu", copy=True).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_b.detach().to("cpu", copy=True).contiguous()
        if config["lora_bias"]:
            bias = layer.lora_bias
            if bias is None:
                bias = torch.zeros(layer.out_features, dtype=layer.lora_b.dtype)
            tensors[f"{_PREFIX}{name}.lora_B.bias"] = bias.detach().to("cpu", copy=True).contiguous()

    try:
        text = json.dumps(config, indent=2) + "\n"  # not sort_keys: the order of pattern keys matters
    except (TypeError, ValueError) as e:
        raise TypeError(f"write_adapter: AdapterWeights.config cannot be written as JSON: {e}") from None

    directory = Path(os.fspath(path))
    directory.mkdir(parents=True, exist_ok=True)
    _finish_pending_save(directory)
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=_STAGING_PREFIX, suffix=".tmp"))
    try:
        save_file(tensors, os.fspath(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(text, encoding="utf-8")
        for file in (staging / WEIGHTS_NAME, staging / CONFIG_NAME, staging):
            _fsync(file)
        os.rename(staging, directory / _PENDING)  # the commit point
        _fsync(directory)
    except BaseException:
        if not staging.exists() and (directory / _PENDING).is_dir():  # renamed, then the fsync failed
            staging = directory / _PENDING
            os.remove(staging / CONFIG_NAME)  # un-commit
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _install_pending(directory)
