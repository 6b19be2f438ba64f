"""Live bytes of every tensor storage an operation creates, by part, and their peak: a torch dispatch mode that sees
each operation below autograd and autocast (so what autograd saves for backward and what autocast casts is counted
as it is allocated), on fake tensors as on real ones.

Why not torch's own `torch.distributed._tools.mem_tracker.MemTracker` (the probe in the shared notes used it): it is
a private module of torch, its categories are by module and autograd state, and it cannot tell the parts a
fine-tune plan needs apart (autocast weight casts, logits and loss, the frozen models). Here the part of a storage
is the phase it was allocated in, except that some storages are known by what holds them (parameters, optimizer
state, EMA, gradients), which the caller registers or relabels.

Sizes are rounded as CUDA's caching allocator rounds each block (`CUDACachingAllocator.cpp` `round_size`: up to a
multiple of 512 bytes), so the peak is what `torch.cuda.max_memory_allocated()` would report for the same tensors.
"""

import collections
import contextlib
import typing as tp
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..machine import GIB

PARTS = (
    "parameters",  # the LM's weights and buffers, trained or frozen
    "gradients",  # of the trained parameters (kept between micro-batches, freed after the update)
    "optimizer",  # AdamW's two moments and step counts
    "ema",  # the EMA copy of what trains, when optim.ema is on the training device
    "frozen_models",  # the compression model and T5 on the device, and what they allocate to encode a batch
    "activations",  # what the LM's forward keeps for backward (recomputed in backward under checkpointing)
    "weight_casts",  # autocast's low-precision copies of fp32 weights, kept for backward
    "logits_loss",  # the output heads' logits, their reordering and the cross-entropy's temporaries
    "temporaries",  # inputs, backward's temporaries not yet gradients, clipping and the optimizer step's
)
_DEVICE = torch.ops.prim.device.default
ALLOCATOR_ROUNDING = 512  # bytes: the CUDA caching allocator's smallest block and size granularity


def allocator_bytes(nbytes: int) -> int:
    """What the CUDA caching allocator allocates for a storage of `nbytes` (`round_size`, kMinBlockSize 512)."""
    if nbytes <= 0:
        return 0
    return -(-nbytes // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING


class LiveBytes(TorchDispatchMode):
    """Counts live storage bytes by part while active; `peak` and `parts_at_peak` hold the highest total seen.

    Typical use:
        tracker = LiveBytes()
        tracker.register(model.parameters(), "parameters")
        with tracker, tracker.phase("activations"):
            loss = model(x).sum()
        with tracker, tracker.phase("temporaries"):
            loss.backward()
    """

    def __init__(self):
        super().__init__()
        self.label = "temporaries"
        self.totals: tp.Counter[str] = collections.Counter()
        self.current = 0
        self.peak = 0
        self.parts_at_peak: tp.Dict[str, int] = {}
        self.phase_at_peak = ""
        self._storages: tp.Dict[int, tp.Tuple[str, int, weakref.ref]] = {}  # id(storage) -> (part, bytes, ref)
        self._casts_of: tp.Set[str] = {"parameters", "frozen_models"}

    # -- what is live ------------------------------------------------------------------------------------------

    def _entry(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        entry = self._storages.get(id(storage))
        if entry is not None and entry[2]() is storage:
            return storage, entry
        return storage, None

    def add(self, tensor: torch.Tensor, part: tp.Optional[str] = None) -> None:
        """Count `tensor`'s storage under `part` (the current phase's when None), once, until it is freed."""
        storage, entry = self._entry(tensor)
        if entry is not None:
            return
        key, size, part = id(storage), allocator_bytes(storage.nbytes()), part or self.label

        def freed(_ref, key=key) -> None:
            gone = self._storages.pop(key, None)
            if gone is not None:
                self.totals[gone[0]] -= gone[1]
                self.current -= gone[1]

        self._storages[key] = (part, size, weakref.ref(storage, freed))
        self.totals[part] += size
        self.current += size
        if self.current > self.peak:
            self.peak, self.parts_at_peak, self.phase_at_peak = self.current, dict(self.totals), self.label

    def register(self, tensors: tp.Iterable[torch.Tensor], part: str) -> None:
        """Tensors that existed before tracking (weights, optimizer state), counted under `part`."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self.add(tensor, part)

    def relabel(self, tensor: torch.Tensor, part: str) -> None:
        """Move `tensor`'s storage to `part` (a backward temporary that became a parameter's gradient)."""
        storage, entry = self._entry(tensor)
        if entry is None:
            self.add(tensor, part)
        elif entry[0] != part:
            self.totals[entry[0]] -= entry[1]
            self.totals[part] += entry[1]
            self._storages[id(storage)] = (part, entry[1], entry[2])

    def part_of(self, tensor: torch.Tensor) -> tp.Optional[str]:
        entry = self._entry(tensor)[1]
        return entry[0] if entry else None

    @contextlib.contextmanager
    def phase(self, part: str) -> tp.Iterator[None]:
        """Storages allocated inside count under `part`."""
        previous, self.label = self.label, part
        try:
            yield
        finally:
            self.label = previous

    # -- the dispatch mode -------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is _DEVICE:  # asked thousands of times by autograd: no storage
            return out
        part = None
        # autocast casts fp32 weights with `_to_copy` (and caches the cast for the forward): a part of its own
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor):
            if self.part_of(args[0]) in self._casts_of and self.label != "frozen_models":
                part = "weight_casts"
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.add(tensor, part)
        return out

    # -- the result --------------------------------------------------------------------------------------------

    def peak_parts_gib(self) -> tp.Dict[str, float]:
        """Every part at the peak, in GiB (they add up to the peak)."""
        return {part: self.parts_at_peak.get(part, 0) / GIB for part in PARTS}
