"""AdapterBatch: which rows of a batch go through which adapter, built once per batch.

Every layer of a model reuses one AdapterBatch (build it once per forward, pass it to every
multi_lora_linear). Construction runs on the ids' device. Its cost per batch on CUDA: with the id check
on (see ``set_check_adapter_ids``), ONE host synchronisation, however many conditions it checks; with
it off, none (``from_segments`` without ``num_rows``: one, to read it); ``ranks`` given as a list or a
CPU tensor: one host-to-device copy (pinned, non-blocking: it does not wait for the device).

Two views of the same grouping:

* **by adapter** (``sorted_rows``, ``adapter_starts``): row indices sorted by adapter id (stable:
  rows keep their order within an adapter); adapter j's rows are
  ``sorted_rows[adapter_starts[j]:adapter_starts[j + 1]]``; rows with no adapter (-1) come last.
  The weight gradients (dA[j], dB[j]) and the torch backend read this view.
* **segments** (``segment_rows``, ``segment_starts``, ``segment_adapters``): what the Triton forward
  kernels walk. Segment s covers positions ``segment_starts[s]:segment_starts[s + 1]`` of
  ``segment_rows`` and uses adapter ``segment_adapters[s]`` (-1: none). From ids, the segments are
  the adapters (S = L) over ``sorted_rows`` and ``segment_adapters`` is None; from
  ``from_segments``, they are the caller's own segments over the rows in place (no gather, no sort
  on the forward path).

What the Triton kernels read besides (device tensors, built once per batch with no sync):
``row_tile`` (16 or 64 rows, from the number of rows and of segments holding rows), ``segment_tiles``
and ``adapter_tiles`` (tile_map of each view: row tile -> (segment, first position), so a program
finds its rows in two loads instead of scanning every segment) and ``active_adapters`` (the adapters
with rows first: the weight gradients' programs and fp32 partials cover only them).
"""

from __future__ import annotations

import copy
from typing import NamedTuple, Optional

import torch

from ._dtensor import replicated_local
from ._env import check_ids_from_env
from ._checks import describe

INDEX_DTYPES = (torch.int32, torch.int64)

_check_override: bool | None = None


def set_check_adapter_ids(enabled: bool | None) -> None:
    """Turn the adapter-id check on or off for every later AdapterBatch (None: back to the default).

    On (the default, unless ``LORA_KERNELS_CHECK_IDS=0`` or ``python -O``): ids outside [-1, L) and
    malformed segments raise ValueError when the batch is built. On CUDA that costs one host
    synchronisation per batch (not per layer). Off, or while a CUDA graph is being captured or
    torch.compile traces, or for meta tensors (no values): nothing is read back, out-of-range ids are
    treated as -1 (base layer only) and ranks are clamped into [0, r_max]: the kernels never address
    memory outside the adapter stacks, and both backends read malformed metadata the same way."""
    global _check_override
    _check_override = enabled


def check_adapter_ids_enabled(device: torch.device) -> bool:
    if torch.compiler.is_compiling() or device.type == "meta":   # meta tensors hold no values to check
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    if _check_override is not None:
        return _check_override
    return check_ids_from_env(default=__debug__)


def _check_index_tensor(name: str, t, ndim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32/int64, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} ({describe(t)}) must be int32 or int64")
    if t.dim() != ndim:
        raise ValueError(f"{name} ({describe(t)}) must be {ndim}-D")


_INT32_MAX = 2**31 - 1

# Row tiles of the segmented kernels: 16 rows when segments are short on average (decode: a one-row
# segment wastes 15 masked rows rather than 63), 64 when they are long (prefill, training).
SHORT_ROW_TILE, LONG_ROW_TILE = 16, 64


def row_tile(num_rows: int, active_segments: int) -> int:
    """The row tile of a batch: 64 once the segments holding rows average at least 32 rows (and there
    are more than 64 rows), else 16. active_segments: those with rows and an adapter when known (a
    checked batch reads it with its check), else every segment (at most num_rows of them hold rows)."""
    if num_rows <= 64 or num_rows < 32 * min(max(active_segments, 1), num_rows):
        return SHORT_ROW_TILE
    return LONG_ROW_TILE


def tile_map(starts: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """(T, 2) int32 on starts' device: row tile t of the segments starts (S + 1,) (int32, well formed),
    each segment cut into block_m-row tiles in order, is (segment, first position of the tile), or
    (-1, 0) past the last real tile. T = min(cdiv(M, block_m) + S, M) bounds the tiles of any grouping
    (each segment adds at most one partial tile, every tile holds a row): the kernels' grid, sized from
    shapes alone (CUDA-graph capturable). Device ops only: no host sync."""
    num_segments = starts.shape[0] - 1
    num_tiles = min(-(-num_rows // block_m) + num_segments, num_rows)
    starts64 = starts.to(torch.int64)
    tiles = (starts64[1:] - starts64[:-1] + block_m - 1) // block_m                  # (S,) tiles per segment
    tiles_through = torch.cumsum(tiles, 0)                                            # (S,) inclusive
    tile = torch.arange(num_tiles, device=starts.device, dtype=torch.int64)          # (T,)
    segment = torch.searchsorted(tiles_through, tile, right=True)                    # (T,) in [0, S]
    real = segment < num_segments
    segment = torch.where(real, segment, 0)
    first_tile = tiles_through.gather(0, segment) - tiles.gather(0, segment) if num_segments else tile
    position = starts64.gather(0, segment) + (tile - first_tile) * block_m
    return torch.stack([torch.where(real, segment, -1), torch.where(real, position, 0)], dim=1).to(torch.int32)


def _active_first(counts: torch.Tensor, num_active: int) -> torch.Tensor:
    """(num_active,) int32: the adapters with rows in increasing order, then adapters without rows when
    num_active is a bound (min(L, M) for an unchecked batch: no more adapters can hold rows). No sync."""
    order = torch.sort((counts == 0).to(torch.int8), stable=True).indices           # (L,) active first
    return order[:num_active].to(torch.int32)


class BatchTensors(NamedTuple):
    """An AdapterBatch as the ops pass it to the backends (see AdapterBatch for each field)."""
    sorted_rows: torch.Tensor
    adapter_starts: torch.Tensor
    segment_rows: torch.Tensor
    segment_starts: torch.Tensor
    segment_adapters: Optional[torch.Tensor]
    ranks: Optional[torch.Tensor]
    segment_tiles: torch.Tensor
    adapter_tiles: torch.Tensor
    active_adapters: torch.Tensor
    row_tile: int


def _check_num_adapters(num_adapters) -> int:
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters must be an int >= 1, got {num_adapters!r}")
    return num_adapters


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. Host to CUDA through pinned memory, non-blocking: the copy waits for nothing
    (a plain .to("cuda") of pageable memory, as torch.tensor(..., device="cuda") does, synchronises
    the stream); the caching host allocator keeps the pinned block until the copy has run. Inside a
    torch.compile trace, a plain copy (the trace has no memory to pin). Always from a private pinned
    copy: t.pin_memory() is t itself when the caller's tensor is pinned already, and a write to it
    before the copy has run (a reused staging buffer) would reach the device."""
    if t.device == device:
        return t
    if t.is_cpu and device.type == "cuda" and not torch.compiler.is_compiling():
        if torch.cuda.is_current_stream_capturing():
            # a captured copy re-reads its staging buffer at every replay, long after it was freed
            raise RuntimeError(f"a host-to-device copy ({describe(t)} to {device}) inside CUDA-graph capture: "
                               "build it before the capture (an AdapterBatch from device tensors, the "
                               "warm-up call of a patched PEFT layer), and capture only its use")
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
        return staged.to(device, non_blocking=True)
    return t.to(device)


def _read_once(*values: torch.Tensor) -> list[int]:
    """One-element integer/bool tensors on one device, read back together: one host synchronisation
    on CUDA for every condition a batch checks, not one each."""
    return torch.stack([v.reshape(()).to(torch.int64) for v in values]).tolist() if values else []


def _range_reads(ranks: torch.Tensor | None) -> list[torch.Tensor]:
    """What the rank check reads (for _read_once): ranks' (min, max), or nothing without ranks."""
    return [] if ranks is None else [ranks.min(), ranks.max()]


def _max_rank(rank_range: list[int], given_ranks: torch.Tensor | None) -> int | None:
    """The largest rank from _range_reads' values, once no rank is negative; None without ranks."""
    if not rank_range:
        return None
    min_rank, max_rank = rank_range
    if min_rank < 0:
        raise ValueError(f"ranks ({describe(given_ranks)}) must be >= 0, got {min_rank}")
    return max_rank


def _ranks_tensor(ranks, num_adapters: int, device: torch.device) -> torch.Tensor | None:
    """ranks (a list of ints, or an (L,) int32/int64 tensor) checked for what the host knows (type,
    shape, meta), as a tensor where it came from (a list: on the host), or None (every adapter uses
    the stack's full rank)."""
    if ranks is None:
        return None
    ranks = replicated_local(ranks, "ranks")
    if isinstance(ranks, (list, tuple)):
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
            raise TypeError(f"ranks must hold ints (or be an int32/int64 tensor), got {list(ranks)[:16]}")
        ranks = torch.tensor(ranks, dtype=torch.int64)
    _check_index_tensor("ranks", ranks)
    if ranks.shape[0] != num_adapters:
        raise ValueError(f"ranks ({describe(ranks)}) must have one entry per adapter: shape ({num_adapters},)")
    if ranks.is_meta and device.type != "meta":
        raise ValueError(f"ranks ({describe(ranks)}) is a meta tensor (no values) but the ids are on {device}")
    return ranks


def _int32_ranks(ranks: torch.Tensor, device: torch.device) -> torch.Tensor:
    """ranks (L,) as the kernels index them: int32, contiguous (whatever view came in), on `device`.
    Clamped first: a rank past int32's range must not wrap to a small or negative one (it stays past
    r_max: rejected against the stacks when checked, read as r_max by both backends otherwise)."""
    if ranks.dtype is torch.int64:
        ranks = ranks.clamp(max=_INT32_MAX)
    return to_device(ranks, device).to(torch.int32).contiguous()


def _group_by_adapter(adapter_ids: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_rows (M,) int32, adapter_starts (L + 1,) int32) on the ids' device, no sync.
    Ids outside [0, L) sort last, past adapter_starts[L]: they get no adapter."""
    ids = adapter_ids.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < num_adapters), ids, num_adapters)       # (M,)
    sorted_key, sorted_rows = torch.sort(key, stable=True)
    bounds = torch.arange(num_adapters + 1, device=ids.device, dtype=torch.int64)
    adapter_starts = torch.searchsorted(sorted_key, bounds)                         # first row >= j
    return sorted_rows.to(torch.int32), adapter_starts.to(torch.int32)


def _monotone_starts(segment_starts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """segment_starts made well formed without a sync or a copy from the host: clamped to
    [0, num_rows], non-decreasing, first 0 and last num_rows. The identity on valid input (the id
    check rejects invalid input); with the check off, malformed segments become disjoint, in-bounds
    ones (some rows then fall in another segment, or in none), so the kernels never read past the
    rows nor race on an output."""
    starts = torch.cummax(segment_starts.to(torch.int64).clamp(0, num_rows), dim=0).values
    if starts.shape[0] == 1:
        return torch.zeros_like(starts)
    return torch.cat([starts.new_zeros(1), starts[1:-1], starts.new_full((1,), num_rows)])


class AdapterBatch:
    """Rows of a batch grouped by adapter; see the module docstring for the two views.

    >>> import torch, lora_kernels
    >>> batch = lora_kernels.AdapterBatch(torch.tensor([2, -1, 0, 2]), num_adapters=3)
    >>> batch.sorted_rows.tolist(), batch.adapter_starts.tolist(), batch.counts.tolist()
    ([2, 0, 3, 1], [0, 1, 1, 3], [1, 0, 2])
    """

    def __init__(self, adapter_ids: torch.Tensor, num_adapters: int, ranks=None, *, check: bool | None = None):
        """adapter_ids (M,) int32/int64, -1 = no adapter; ranks: per-adapter true ranks (L,) or None.
        check: run the id check (one host sync per batch on CUDA) for this batch or not; None: the
        global setting (set_check_adapter_ids). Callers whose ids are valid by construction pass False.
        Under tensor parallelism the ids (and ranks) may be DTensors replicated on every rank."""
        adapter_ids = replicated_local(adapter_ids, "adapter_ids")
        _check_index_tensor("adapter_ids", adapter_ids)
        num_adapters = _check_num_adapters(num_adapters)
        if check is None:
            check = check_adapter_ids_enabled(adapter_ids.device)
        elif check and adapter_ids.is_meta:
            raise ValueError(f"adapter_ids ({describe(adapter_ids)}) is a meta tensor: it holds no values to check; "
                             "pass check=False (or None) to build a batch for shape inference")
        given_ranks = _ranks_tensor(ranks, num_adapters, adapter_ids.device)
        ranks = None if given_ranks is None else to_device(given_ranks, adapter_ids.device)
        self._group(adapter_ids, num_adapters, ranks, check)
        max_rank = num_active = None
        if check:   # every condition, and the number of adapters with rows, read back in one sync
            id_reads = []
            if adapter_ids.numel():
                bad = (adapter_ids < -1) | (adapter_ids >= num_adapters)                      # (M,)
                first = bad.to(torch.int32).argmax()      # the first bad id's row (argmax: the first maximum)
                id_reads = [bad.any(), first, adapter_ids.gather(0, first.reshape(1))]
            values = _read_once(*id_reads, self.active.sum(), *_range_reads(ranks))
            if id_reads and values[0]:
                raise ValueError(
                    f"adapter_ids ({describe(adapter_ids)}) must be in [-1, {num_adapters}) "
                    f"(-1 = no adapter, L = {num_adapters} adapters): adapter_ids[{values[1]}] = {values[2]}")
            num_active = values[len(id_reads)]
            max_rank = _max_rank(values[len(id_reads) + 1:], given_ranks)
        self._finish(max_rank, num_active, num_active)

    def _group(self, adapter_ids: torch.Tensor, num_adapters: int, ranks: torch.Tensor | None,
               checked: bool) -> None:
        """The by-adapter view (and the segments of the ids) from checked or unchecked ids, on their device,
        with no sync. ranks: (L,) on that device, checked or not."""
        self.num_rows = adapter_ids.shape[0]
        self.num_adapters = num_adapters
        self.device = adapter_ids.device
        if ranks is not None and not checked:   # unchecked, negative ranks mean 0 (device-side, no sync)
            ranks = ranks.clamp(min=0)
        self.ranks = None if ranks is None else _int32_ranks(ranks, self.device)
        valid = (adapter_ids >= 0) & (adapter_ids < num_adapters)
        self.adapter_ids = torch.where(valid, adapter_ids, -1).to(torch.int32)   # unchecked bad ids: -1
        self.sorted_rows, self.adapter_starts = _group_by_adapter(adapter_ids, num_adapters)
        # the forward kernels' segments: one per adapter (segment_adapters None: segment s is adapter s)
        self.segment_rows = self.sorted_rows
        self.segment_starts = self.adapter_starts
        self.segment_adapters: torch.Tensor | None = None

    def _finish(self, max_rank: int | None, num_active: int | None, active_segments: int | None) -> None:
        """What the kernels read besides the grouping, once the segments are final; device ops only.
        max_rank: the largest true rank, read with the check (None when unchecked or without ranks):
        multi_lora_linear then rejects ranks past the stacks' r_max instead of clamping them.
        num_active / active_segments: adapters / segments with rows (and an adapter), read with the check;
        None unchecked (the shapes' bounds are used)."""
        self.max_rank = max_rank
        self.row_tile = row_tile(self.num_rows, self.num_segments if active_segments is None else active_segments)
        self.segment_tiles = tile_map(self.segment_starts, self.num_rows, self.row_tile)
        self.adapter_tiles = (self.segment_tiles if self.segment_starts is self.adapter_starts
                              else tile_map(self.adapter_starts, self.num_rows, self.row_tile))
        bound = min(self.num_adapters, self.num_rows)
        self.active_adapters = _active_first(self.counts, bound if num_active is None else num_active)

    def tensors(self) -> BatchTensors:
        """What the ops hand the backends."""
        return BatchTensors(self.sorted_rows, self.adapter_starts, self.segment_rows, self.segment_starts,
                            self.segment_adapters, self.ranks, self.segment_tiles, self.adapter_tiles,
                            self.active_adapters, self.row_tile)

    @classmethod
    def from_segments(cls, segment_starts: torch.Tensor, segment_adapters: torch.Tensor, num_adapters: int,
                      *, num_rows: int | None = None, ranks=None) -> AdapterBatch:
        """Rows already grouped: segment s is rows segment_starts[s]:segment_starts[s + 1] of x and uses
        adapter segment_adapters[s] (-1: none); an adapter may own several segments. segment_starts
        (S + 1,) starts at 0 and ends at num_rows (read from it when num_rows is None). Host syncs on
        CUDA: one with the id check on (every condition, and num_rows, read together), none with it off
        and num_rows given (one to read num_rows otherwise).

        >>> import torch, lora_kernels
        >>> batch = lora_kernels.AdapterBatch.from_segments(torch.tensor([0, 2, 3, 5]), torch.tensor([1, -1, 1]), 2)
        >>> batch.adapter_ids.tolist(), batch.counts.tolist()
        ([1, 1, -1, 1, 1], [0, 4])
        """
        segment_starts = replicated_local(segment_starts, "segment_starts")
        segment_adapters = replicated_local(segment_adapters, "segment_adapters")
        _check_index_tensor("segment_starts", segment_starts)
        _check_index_tensor("segment_adapters", segment_adapters)
        num_adapters = _check_num_adapters(num_adapters)
        num_segments = segment_adapters.shape[0]
        if segment_starts.shape[0] != num_segments + 1:
            raise ValueError(f"segment_starts ({describe(segment_starts)}) must have one more entry than "
                             f"segment_adapters ({describe(segment_adapters)}): shape ({num_segments + 1},)")
        if segment_starts.device != segment_adapters.device:
            raise ValueError(f"segment_starts is on {segment_starts.device} but segment_adapters is on "
                             f"{segment_adapters.device}: both must be on one device")
        if num_rows is None and segment_starts.is_meta:
            raise ValueError(f"segment_starts ({describe(segment_starts)}) is a meta tensor (no values): "
                             "pass num_rows")
        device = segment_starts.device
        given_ranks = _ranks_tensor(ranks, num_adapters, device)
        ranks = None if given_ranks is None else to_device(given_ranks, device)
        check = check_adapter_ids_enabled(device)
        max_rank = num_active = active_segments = None
        if check:
            lengths = segment_starts[1:] - segment_starts[:-1]                                # (S,)
            bad_adapters = (segment_adapters < -1) | (segment_adapters >= num_adapters)      # (S,)
            with_rows = (lengths > 0) & (segment_adapters >= 0) & ~bad_adapters              # (S,)
            segments_per_adapter = torch.zeros(num_adapters, dtype=torch.int64, device=device).index_add_(
                0, segment_adapters.clamp(0, num_adapters - 1).to(torch.int64), with_rows.to(torch.int64))
            reads = [segment_starts[0], segment_starts[-1], (lengths < 0).any(), bad_adapters.any(),
                     (segments_per_adapter > 0).sum(), with_rows.sum()]
            values = _read_once(*reads, *_range_reads(ranks))
            first, last, decreasing, any_bad_adapter, num_active, active_segments = values[:6]
            if num_rows is None:
                num_rows = last
            if first != 0 or last != num_rows or decreasing:
                raise ValueError(f"segment_starts ({describe(segment_starts)}) must rise from 0 to num_rows="
                                 f"{num_rows}, got {segment_starts.tolist()[:16]}")
            if any_bad_adapter:
                raise ValueError(f"segment_adapters ({describe(segment_adapters)}) must be in [-1, {num_adapters}), "
                                 f"got {segment_adapters.tolist()[:16]}")
            max_rank = _max_rank(values[6:], given_ranks)
        elif num_rows is None:
            num_rows = int(segment_starts[-1])   # the one sync of an unchecked batch
        starts = _monotone_starts(segment_starts, num_rows)                          # (S + 1,) int64
        # per-row ids (sync-free: the output size is given) give the by-adapter view; checked above
        # through segment_adapters, which they repeat
        adapter_ids = torch.repeat_interleave(segment_adapters, starts[1:] - starts[:-1], output_size=num_rows)
        batch = cls.__new__(cls)
        batch._group(adapter_ids, num_adapters, ranks, check)
        batch.segment_rows = torch.arange(num_rows, device=batch.device, dtype=torch.int32)
        batch.segment_starts = starts.to(torch.int32)   # contiguous: the kernels index it densely
        # out-of-range adapters (check off) mean "none", as for ids; compared before the narrowing to int32,
        # which would wrap 2**32 + 1 to adapter 1
        in_range = (segment_adapters >= 0) & (segment_adapters < num_adapters)
        batch.segment_adapters = torch.where(in_range, segment_adapters, -1).to(torch.int32)
        batch._finish(max_rank, num_active, active_segments)
        return batch

    def with_ranks(self, ranks: torch.Tensor | None) -> AdapterBatch:
        """The same grouping with other true ranks (L,) int32, unchecked: one layer's ranks per slot
        (MultiLoRALinear keeps its own, validated when an adapter is loaded). No copy, no sync."""
        batch = copy.copy(self)
        batch.ranks = None if ranks is None else _int32_ranks(replicated_local(ranks, "ranks"), self.device)
        batch.max_rank = None
        return batch

    @property
    def counts(self) -> torch.Tensor:
        """(L,) int32: rows per adapter."""
        return self.adapter_starts[1:] - self.adapter_starts[:-1]

    @property
    def active(self) -> torch.Tensor:
        """(L,) bool: adapters with at least one row."""
        return self.counts > 0

    @property
    def num_segments(self) -> int:
        return self.segment_starts.shape[0] - 1

    def __repr__(self) -> str:
        return (f"AdapterBatch(num_rows={self.num_rows}, num_adapters={self.num_adapters}, "
                f"segments={self.num_segments}, device={self.device})")
