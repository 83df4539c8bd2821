"""Count the calls that force a host-device synchronisation on a GPU (value reads, data-dependent shapes, copies to
the host), by patching torch.Tensor for the duration of a block. On a CPU nothing synchronises, but the same calls
are made, so the count is the one a GPU run would pay."""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter

import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@contextlib.contextmanager
def count_syncs(where: Counter | None = None):
    """Yields a Counter of call kind -> count; `where` (optional) collects 'kind @ file:line' of the first caller
    outside torch."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS + ("__getitem__",)}

    def caller() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and "sync_counter" not in frame.filename:
                return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
        return "?"

    def wrap(name):
        original = originals[name]

        def patched(self, *args, **kwargs):
            counts[name] += 1
            if where is not None:
                where[f"{name} @ {caller()}"] += 1
            return original(self, *args, **kwargs)

        return patched

    def getitem(self, index):
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:  # boolean-mask indexing: a data-dependent shape
            counts["bool_index"] += 1
            if where is not None:
                where[f"bool_index @ {caller()}"] += 1
        return originals["__getitem__"](self, index)

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    torch.Tensor.__getitem__ = getitem
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
