"""Counting what a sampler step costs beyond arithmetic, on any device: host reads of tensor values (the
project's own count of waits on the device, which works on the CPU), CUDA's own count of synchronising
calls (its sync debug mode), and the operators dispatched (on a GPU each is a kernel launch) with their
FLOPs by torch's FlopCounter formulas. Each is a context manager whose counts grow inside the block."""

from __future__ import annotations

import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# Every way a tensor's values reach Python; on a GPU each waits for the work queued before it.
HOST_READS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__float__", "__int__", "__index__")


class HostReadCounter:
    """Counts tensor values read to the host (wraps the torch.Tensor methods that do it)."""

    def __enter__(self) -> HostReadCounter:
        self.count = 0
        self._originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counted(original))
        return self

    def _counted(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return read

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


class CudaSyncCounter:
    """Counts the calls that CUDA's sync debug mode reports as synchronising the host with the device."""

    def __enter__(self) -> CudaSyncCounter:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    @property
    def count(self) -> int:
        return sum("synchroniz" in str(w.message) for w in self._caught)

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode(self._previous)
        self._catcher.__exit__(*exc)


class OpCounter(TorchDispatchMode):
    """`ops`: operators dispatched, forward and backward; `flops`: their FLOPs by the formula registry of
    torch's FlopCounter (convolutions, matmuls, attention). FlopCounterMode itself cannot count through
    `torch.autograd.grad` of a leaf tensor (its module tracker raises), which a dps step is."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out
