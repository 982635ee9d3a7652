"""Linear layers laid out for fast CPU inference: prepacked for oneDNN, or, for bfloat16 weights
larger than the CPU's caches, run weight-major.

``nn.Linear`` on CPU hands the weight to the BLAS as a transposed view on every call. oneDNN can
instead reorder each weight once, at load, into the blocked layout its kernels read; the decode
and prefill matmuls of the benchmark's MPT then ran about twice as fast (docs/benchmarks.md).
This is the packing torch.compile's CPU backend applies when it freezes weights, without the
compile. In bfloat16, where the weights outgrow the CPU's caches (7B models), multiplying by the
weight as it is stored (``W @ x.T``, a matrix-vector product for one row) read them faster than
the packed layout at every batch size, with the weight in its own layout. Either way the
arithmetic is the same multiply-add in a different summation order, so outputs agree with
``nn.Linear`` to rounding.

A model loaded in its checkpoint's dtype and run in another is converted here too, one tensor at
a time (``convert_weights``), for the same reason packing hands pages back: the weights resident
once, not twice.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

_logger = logging.getLogger(__name__)

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
_MAPS = "/proc/self/maps"
_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward on a weight reordered once for oneDNN. Inference only.

    Its state is ``nn.Linear``'s: ``state_dict`` holds the plain ``weight`` (a saved model is an
    ordinary checkpoint) and ``load_state_dict`` packs the weight it is given. ``.to()``,
    ``.half()``, ``.cuda()``... convert the weight too: packed again where oneDNN can run it (a
    CPU dtype it packs), else unpacked into a plain ``weight`` parameter run by ``F.linear``,
    until a later conversion brings it back where it packs. ``copy.deepcopy`` and pickling
    carry the weight's values and pack them again.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # A plain attribute, not a parameter: the packed layout is opaque to autograd, and
        # nothing but this forward may read it. None once unpacked.
        self._packed: torch.Tensor | None = _pack(linear.weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        return in_row_buckets(x, lambda rows: torch.ops.mkldnn._linear_pointwise(
            rows, self._packed, self.bias, "none", [], ""))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self._packed is not None:
            destination[prefix + "weight"] = self._packed.to_dense()  # the exact original values
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key, shape = prefix + "weight", (self.out_features, self.in_features)
        if self._packed is not None and key in state_dict:
            if tuple(state_dict[key].shape) == shape:
                self._packed = _pack(state_dict[key].to("cpu", self._packed.dtype))
            else:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(state_dict[key].shape)} from checkpoint, the shape in "
                                  f"current model is {shape}.")
        elif self._packed is not None and strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self._packed is not None and key in unexpected_keys:  # no parameter of that name
            unexpected_keys.remove(key)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)
        if self._packed is None:
            # Unpacked by an earlier cast or move: packed again once back where oneDNN runs it
            # (.half() then .float()), so the layer is fast again.
            if self.weight.device.type == "cpu" and packing_available(self.weight.dtype):
                self._packed = _pack(self.weight)
                del self.weight
            return self
        probe = torch.empty(0, dtype=self._packed.dtype)
        changed = fn(probe)
        if (changed.device, changed.dtype) == (probe.device, probe.dtype):
            return self  # .to("cpu") on a CPU model, .float() on a float32 one: nothing to do
        weight = fn(self._packed.to_dense())
        if weight.device.type == "cpu" and packing_available(weight.dtype):
            self._packed = _pack(weight)
        else:
            self._packed = None
            self.weight = nn.Parameter(weight, requires_grad=False)
        return self

    def __getstate__(self) -> dict:
        # The packed tensor is opaque (no storage to copy or pickle): deepcopy and pickle carry
        # its dense values, and __setstate__ packs them again.
        state = super().__getstate__()
        if self._packed is not None:
            state["_packed"] = self._packed.to_dense()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self._packed is not None:
            self._packed = _pack(self._packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self._packed is not None}")


def linear_gelu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(layer(x))`` (exact, erf GELU); one oneDNN call where ``layer`` is packed.

    Fused, the activation is applied to each output as the matmul writes it, instead of in a
    second pass over a tensor four times the hidden size: a 512-token prefill of the benchmark's
    MPT ran 1.16x (float32) and 1.21x (bfloat16) as fast, side by side, decode the same.
    Identical in float32; in bfloat16 the product is rounded once, after the activation, not
    before it too. (Fusing the residual sum into the next layer the same way slowed decode.)
    """
    if isinstance(layer, PackedLinear) and layer._packed is not None:
        return in_row_buckets(x, lambda rows: torch.ops.mkldnn._linear_pointwise(
            rows, layer._packed, layer.bias, "gelu", [], "none"))
    return F.gelu(layer(x))


# oneDNN builds (compiles) a bfloat16 kernel for every new number of input rows it meets, 2-5 ms
# per layer shape on this project's CPUs, against under 1 ms for the product itself at 300 rows.
# A prefill pass has as many rows as tokens, a new count nearly every pass: most passes paid
# that, and a server meets more counts than oneDNN's cache of 1024 kernels keeps. So inputs of
# more than _EXACT_ROWS rows run padded up to one of a few counts: a multiple of 32 up to 512
# rows, then of an eighth of the power of two below the count (at most 31 rows or an eighth
# more; 38 counts from 65 to 4096 rows).
# Decode steps (a row per sequence) of up to 64 sequences, the engine's default being at most 32,
# stay exact: their few counts repeat every step. Beyond 64 they are padded like the rest.
_EXACT_ROWS = 64


def bucket_rows(rows: int) -> int:
    """The row count an input of ``rows`` rows runs padded to (see ``_EXACT_ROWS``)."""
    if rows <= _EXACT_ROWS:
        return rows
    step = max(32, 1 << (rows.bit_length() - 4))
    return -(-rows // step) * step


def in_row_buckets(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run`` (a row-wise product: each output row depends on its input row only) on ``x``,
    in bfloat16 with its rows padded to :func:`bucket_rows`; the padding's output is dropped."""
    rows = x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    padded = bucket_rows(count) if x.dtype == torch.bfloat16 else count
    if padded != count:
        rows = F.pad(rows, (0, 0, 0, padded - count))
    out = run(rows)[:count]  # the first rows of a contiguous output: a contiguous view
    return out.view(*x.shape[:-1], out.shape[-1])


class WeightMajorLinear(nn.Linear):
    """``nn.Linear`` whose bfloat16 forward multiplies by the weight as stored: ``W @ x.T``, and
    torch's matrix-vector product for a single row.

    ``nn.Linear`` computes ``x @ W.T``, and oneDNN's bfloat16 kernel then reorders blocks of the
    transposed weight on every call; with the weight as the left operand it reads the weight in
    its own layout and reorders only the few rows of ``x``. With mpt-7b's layers, measured faster
    than ``nn.Linear`` and than the packed layout at every batch size from 1 to 64
    (docs/benchmarks.md). Only the forward differs: the weight stays the module's parameter, so
    ties, ``state_dict``, ``.to()`` and saving behave as ``nn.Linear``'s; inputs in another
    dtype or off the CPU take ``nn.Linear``'s own forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16 or x.device.type != "cpu":
            return super().forward(x)
        return in_row_buckets(x, self._weight_major)

    def _weight_major(self, rows: torch.Tensor) -> torch.Tensor:
        out = (torch.mv(self.weight, rows[0]).unsqueeze(0) if rows.shape[0] == 1
               else torch.mm(self.weight, rows.t()).t().contiguous())
        if self.bias is not None:
            out += self.bias
        return out


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packing_available(dtype: torch.dtype) -> bool:
    """Whether this CPU build can pack weights of ``dtype``."""
    if dtype not in _PACKABLE_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _file_mappings() -> list[tuple[int, int]] | str:
    """Address ranges of this process's file-backed memory mappings, or why they are unknown."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return f"handing pages back (/proc/self/maps, madvise) is implemented on Linux only, not {sys.platform}"
    ranges = []
    try:
        with open(_MAPS) as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError as err:
        return f"cannot read {_MAPS} ({err})"
    return ranges


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _release_file_pages(weight: torch.Tensor, mappings: list[tuple[int, int]]) -> str | None:
    """Hand back the pages of a replaced weight that lies in a memory-mapped weights file;
    return why that failed, if it did.

    transformers memory-maps safetensors; reading a weight to pack it faults its pages in, and
    the mapping keeps them resident while any other tensor of the file lives, so packed and
    original weights would both count. Dropping the pages that lie wholly inside this (now
    unused) weight keeps peak memory near one copy of the weights; they are file-backed, so
    the kernel can always read them again.
    """
    start, end = weight.data_ptr(), weight.data_ptr() + weight.nbytes
    if not any(low <= start and end <= high for low, high in mappings):
        return None
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first),
                                        mmap.MADV_DONTNEED) != 0:
        errno = ctypes.get_errno()
        return f"madvise(MADV_DONTNEED) failed: {os.strerror(errno)} (errno {errno})"
    return None


def _kept_resident(dtype: torch.dtype, why: str) -> list[tuple[int, int]]:
    """Say that converting goes on without handing pages back; no mappings to hand back from."""
    _logger.warning("converting the weights to %s, the originals stay resident until loading "
                    "ends: %s", dtype, why)
    return []


def convert_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Convert the model's floating-point CPU parameters and persistent buffers to ``dtype``, in
    place, one tensor at a time; return how many were converted.

    For a model loaded in its checkpoint's dtype from a memory-mapped file. ``Module.to`` (and
    transformers converting while it loads) keeps every original resident in its mapping until
    the last is gone: the peak is both copies. Here each original's pages are handed back as soon
    as its copy exists. Tied tensors stay tied; modules transformers keeps in float32
    (``_keep_in_fp32_modules``) and non-persistent buffers (computed at init, in the precision
    the model chose) are left as they are.
    """
    mappings = _file_mappings()
    if isinstance(mappings, str):
        mappings = _kept_resident(dtype, mappings)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    tensors = [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())]
    shared = {key for key, count in Counter(map(id, tensors)).items() if count > 1}
    del tensors
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared: id -> (original, copy)
    converted = 0
    for module_name, module in model.named_modules():
        if any(part in keep for part in module_name.split(".")):
            continue
        persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
        for table, names in ((module._parameters, list(module._parameters)), (module._buffers, persistent)):
            for name in names:
                tensor = table[name]
                if (tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype
                        or tensor.device.type != "cpu"):
                    continue
                if id(tensor) in done:
                    table[name] = done[id(tensor)][1]
                    continue
                copy = tensor.detach().to(dtype)
                if isinstance(tensor, nn.Parameter):
                    copy = nn.Parameter(copy, requires_grad=tensor.requires_grad)
                if id(tensor) in shared:
                    done[id(tensor)] = (tensor, copy)  # the original stays alive: its id stays its own
                table[name] = copy
                converted += 1
                if failure := _release_file_pages(tensor, mappings):
                    mappings = _kept_resident(dtype, failure)
    _logger.info("converted %d weights to %s", converted, dtype)
    return converted


def pack_linear_layers(model: nn.Module) -> int:
    """Lay out the model's CPU ``nn.Linear`` layers for inference; return how many changed.

    Where the bfloat16 linear weights are larger than the CPU's last-level cache, every step
    streams them from memory, and run as :class:`WeightMajorLinear` (the same modules with
    another forward, output layers tied to the embeddings included; untied weights are moved
    out of the file mapping, as packing does) they were read faster than packed, at every
    batch size; smaller ones stay in the cache, where the packed layout computed faster.

    Every other layer is packed (:class:`PackedLinear`) except: layers whose weight another
    module shares (packing replaces the weight, and a tied output layer must keep reading the
    embeddings'), off-CPU or meta weights, dtypes oneDNN cannot pack here, and everything where
    the pages of the replaced weights cannot be handed back (anywhere but Linux, or without
    ``/proc``): the weights would be resident twice. The reason is logged.
    """
    # Parents and names only: a list of the layers themselves would keep every replaced weight
    # alive until the end, and weights not backed by a file (converted at load) would be twice
    # in memory.
    places = [(parent, name) for parent in model.modules()
              for name, child in parent.named_children() if type(child) is nn.Linear]
    # How many modules hold each weight: a shared (tied) weight must stay where it is.
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    weight_major = _run_weight_major(places, owners)
    if weight_major:
        places = [(parent, name) for parent, name in places if type(getattr(parent, name)) is nn.Linear]
    return weight_major + _pack_layers(places, owners)


def _run_weight_major(places: list[tuple[nn.Module, str]], owners: Counter) -> int:
    layers = {id(layer): layer for layer in (getattr(parent, name) for parent, name in places)
              if layer.weight.device.type == "cpu" and layer.weight.dtype == torch.bfloat16}
    if not layers or not packing_available(torch.bfloat16):
        return 0
    weights = sum({id(layer.weight): layer.weight.nbytes for layer in layers.values()}.values())
    cache = last_level_cache_bytes()
    if weights <= cache:
        return 0
    mappings = _file_mappings()
    for layer in layers.values():
        layer.__class__ = WeightMajorLinear  # the same module: parameters and ties kept
        if not isinstance(mappings, str) and owners[id(layer.weight)] == 1:
            mappings = _move_to_anonymous_memory(layer, mappings)
    _logger.info("running %d bfloat16 linear layers weight-major: their %.1f GB of weights "
                 "outgrow the CPU's %.0f MB last-level cache", len(layers), weights / 1e9, cache / 1e6)
    return len(layers)


def _move_to_anonymous_memory(layer: nn.Linear, mappings: list[tuple[int, int]]) -> list[tuple[int, int]] | str:
    """Give the layer a copy of its weight in anonymous memory and hand back the file's pages,
    as packing does; return the mappings, or why no more pages can be handed back.

    Pages of a file mapping are page cache, which the kernel reclaims under pressure (another
    copy of the model being read, say) and faults in again on the next step: decode then runs
    at a fraction of its speed. A copy is resident until the process ends.
    """
    weight = layer.weight
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if failure := _release_file_pages(weight, mappings):
        _logger.warning("stopped moving weights out of the file mapping: %s", failure)
        return failure
    return mappings


def last_level_cache_bytes() -> int:
    """The largest CPU cache, as Linux reports it (32 MiB where it does not say)."""
    sizes = []
    for entry in _CACHES.glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 * 2**20)


def _pack_layers(places: list[tuple[nn.Module, str]], owners: Counter) -> int:
    mappings = _file_mappings()
    if isinstance(mappings, str):
        _logger.warning("linear layers not packed for oneDNN (a speed-up only): %s, and the "
                        "weights would be resident twice", mappings)
        return 0
    packed = 0
    for parent, name in places:
        weight = getattr(parent, name).weight
        if (weight.device.type != "cpu" or owners[id(weight)] > 1
                or not packing_available(weight.dtype)):
            continue
        setattr(parent, name, PackedLinear(getattr(parent, name)))
        packed += 1
        if failure := _release_file_pages(weight, mappings):
            _logger.warning("stopped packing linear layers for oneDNN after %d: %s, and the "
                            "weights would be resident twice", packed, failure)
            return packed
    _logger.info("packed %d linear layers for oneDNN", packed)
    return packed
