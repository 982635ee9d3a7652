"""The attention backends a model can run with: one table, name -> :class:`AttentionBackend`.

In the spirit of transformers' ``AttentionInterface``: each entry says how the backend is
installed (the ``attn_implementation`` transformers installs at load, or a plugin's
``configure_attention`` hook), what it needs, and whether it can run on a device. The core's
entries are ``eager``, ``sdpa``, ``triton`` and ``flash``; a plugin adds its own with
:func:`register_attention`. A name is validated here and nowhere else (:func:`backend`), and
``auto`` is resolved here, once, to the best entry the model supports on the device
(:func:`resolve`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from templated_llm.errors import AttentionUnavailableError

_logger = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class AttentionBackend:
    """One entry of the table.

    ``transformers_name`` is the ``attn_implementation`` transformers installs at load (``None``
    when only a plugin's ``configure_attention`` installs it); ``support_flag`` the class
    attribute a transformers model class sets when it implements the backend (``None``: every
    class does). ``needs`` says in words what it needs; ``unavailable(device)`` says why it
    cannot run on ``device`` in this environment, or returns ``None`` when it can. ``auto_rank``
    orders what ``auto`` tries, highest first; ``None`` keeps ``auto`` from choosing it.
    """

    name: str
    needs: str
    transformers_name: str | None = None
    support_flag: str | None = None
    unavailable: Callable[[str], str | None] = lambda device: None  # noqa: E731 - runs anywhere
    auto_rank: int | None = None


_FLASH_ATTN_MIN_VERSION = (2, 6)  # flash_attn_with_kvcache's cache_leftpad (left padding)


def _flash_attn_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    version = importlib.metadata.version("flash-attn").split("+")[0]
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _flash_unavailable(device: str) -> str | None:
    on_cuda = device.startswith("cuda")
    if not on_cuda or not _cuda_available():
        where = f"runs on {device!r}" if not on_cuda else "sees no CUDA GPU (torch.cuda)"
        return (f"attention backend 'flash' needs a CUDA GPU; this process {where}. "
                "Use attention='auto' or 'sdpa'.")
    version = _flash_attn_version()
    if version is None or version < _FLASH_ATTN_MIN_VERSION:
        found = "not installed" if version is None else ".".join(map(str, version))
        return ("attention backend 'flash' needs the flash-attn package, version "
                f"{'.'.join(map(str, _FLASH_ATTN_MIN_VERSION))} or later (found: {found}). "
                "Run `pip install flash-attn --no-build-isolation`, or use attention='auto'.")
    return None


def _triton_unavailable(device: str) -> str | None:
    if device.startswith("cuda"):
        if importlib.util.find_spec("triton") is None:
            return ("attention backend 'triton' compiles flex_attention to Triton kernels and "
                    "needs the triton package on CUDA. Run `pip install triton`, or use "
                    "attention='auto' or 'sdpa'.")
    elif not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return ("attention backend 'triton' on CPU compiles flex_attention to C++ and needs "
                "a C++ compiler (g++ or clang++) on PATH; none was found. Install one, or "
                "use attention='auto' or 'sdpa'.")
    return None


_TABLE: dict[str, AttentionBackend] = {}


def register_attention(backend: AttentionBackend) -> None:
    """Add ``backend`` to the table; a plugin calls this when it is imported.

    Raises :class:`ValueError` when the name is ``auto`` or another entry's.
    """
    if backend.name == AUTO or backend.name in _TABLE:
        raise ValueError(
            f"attention backend {backend.name!r} is already in the table: {backend_names()}"
        )
    _TABLE[backend.name] = backend


for _builtin in (
    AttentionBackend("eager", "nothing: every model implements it", "eager", auto_rank=1),
    AttentionBackend("sdpa", "torch's scaled_dot_product_attention (any device)", "sdpa",
                     "_supports_sdpa", auto_rank=2),
    AttentionBackend("triton", "flex_attention compiled: triton on CUDA, a C++ compiler on CPU",
                     "flex_attention", "_supports_flex_attn", _triton_unavailable),
    AttentionBackend("flash", f"a CUDA GPU and flash-attn >= "
                     f"{'.'.join(map(str, _FLASH_ATTN_MIN_VERSION))}, float16 or bfloat16 weights",
                     "flash_attention_2", "_supports_flash_attn", _flash_unavailable, auto_rank=3),
):
    register_attention(_builtin)


def backends() -> list[AttentionBackend]:
    """The table's entries, the core's first, then plugins' in the order they were added."""
    return list(_TABLE.values())


def backend_names() -> list[str]:
    """Every name a user may ask for: ``auto`` and the table's entries."""
    return [AUTO, *_TABLE]


def backend(name: str) -> AttentionBackend:
    """The entry named ``name``; raises :class:`AttentionUnavailableError` for any other name."""
    if name not in _TABLE:
        raise AttentionUnavailableError(
            f"unknown attention backend {name!r}; choose one of {backend_names()}"
        )
    return _TABLE[name]


def check_name(name: str) -> None:
    """Raise :class:`AttentionUnavailableError` unless ``name`` is ``auto`` or in the table."""
    if name != AUTO:
        backend(name)


def unavailable(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` in this environment, or ``None`` if it can.

    This checks the machine and the installed packages, not the model.
    """
    return backend(name).unavailable(device)


def resolve(
    requested: str, device: str, supported: Iterable[str] | None = None, owner: str = "this model"
) -> str:
    """The backend to run: ``requested`` checked, or what ``auto`` chooses.

    ``supported`` are the backends ``owner`` (the model, in words) implements; ``None``: every
    entry of the table. ``auto`` takes the highest-ranked supported backend that can run on
    ``device`` and logs its choice. An explicit backend that cannot run on ``device``, or that
    the model does not implement, raises :class:`AttentionUnavailableError` saying why.
    """
    check_name(requested)
    names = list(_TABLE) if supported is None else list(supported)
    if requested == AUTO:
        ranked = sorted((b for b in map(backend, names) if b.auto_rank is not None),
                        key=lambda b: b.auto_rank, reverse=True)
        for entry in ranked:
            if entry.unavailable(device) is None:
                _logger.info("attention 'auto' chose %r on %s", entry.name, device)
                return entry.name
        raise AttentionUnavailableError(f"no attention backend of {names} can run on {device!r}")
    if reason := unavailable(requested, device):
        raise AttentionUnavailableError(reason)
    if requested not in names:
        raise AttentionUnavailableError(
            f"{owner} does not implement attention backend {requested!r}; it supports {names}. "
            "Use one of those or 'auto', or install a plugin that provides the backend for "
            "this model."
        )
    return requested


def from_transformers(implementation: str) -> str:
    """The table's name for transformers' ``attn_implementation`` (itself when not in the table)."""
    return next((b.name for b in _TABLE.values() if b.transformers_name == implementation),
                implementation)
