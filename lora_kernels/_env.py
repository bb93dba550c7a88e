"""The one reader of ``LORA_KERNELS_*`` environment variables.

Read at call time (not import time), so a test or a script may set them after ``import lora_kernels``.
"""

import functools
import os
from pathlib import Path

BACKENDS = ("auto", "triton", "torch")


def backend_from_env() -> str:
    """``LORA_KERNELS_BACKEND``: ``auto`` (default) | ``triton`` | ``torch``."""
    return _parse_backend(os.environ.get("LORA_KERNELS_BACKEND", "auto"))


@functools.lru_cache(maxsize=16)
def _parse_backend(raw: str) -> str:
    """Parsed once per distinct raw value: every op call reads the variable (a decode step pays for each µs)."""
    value = raw.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"LORA_KERNELS_BACKEND={value!r}: expected one of {BACKENDS}")
    return value


def triton_interpreter_enabled() -> bool:
    """``TRITON_INTERPRET=1`` runs Triton kernels on CPU tensors (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def check_ids_from_env(default: bool) -> bool:
    """``LORA_KERNELS_CHECK_IDS``: ``1`` checks adapter ids when an AdapterBatch is built (one host
    sync per batch on CUDA), ``0`` skips the check; unset: `default`."""
    value = os.environ.get("LORA_KERNELS_CHECK_IDS", "").strip().lower()
    if value == "":
        return default
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"LORA_KERNELS_CHECK_IDS={value!r}: expected 0 or 1")


def tuning_dir_from_env() -> Path:
    """Where the tuner writes its plan tables and the lookups read them: ``LORA_KERNELS_TUNING_DIR``,
    else ``$XDG_CACHE_HOME/lora_kernels``, else ``~/.cache/lora_kernels``."""
    value = os.environ.get("LORA_KERNELS_TUNING_DIR", "").strip()
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lora_kernels"


def extension_enabled_from_env() -> bool:
    """``LORA_KERNELS_EXTENSION``: ``0`` leaves the C++ extension unloaded (the pure-Python ops serve);
    anything else, or unset, loads it when it is built. Read once, when lora_kernels is imported."""
    return os.environ.get("LORA_KERNELS_EXTENSION", "").strip() != "0"
