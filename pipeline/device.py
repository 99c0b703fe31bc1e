"""Small host values (counts, offsets, token ids) onto the device without waiting for it.

``torch.tensor(values, device="cuda")`` and ``cpu_tensor.to("cuda")`` copy from pageable
memory and then wait for every kernel queued before them, so the host stops running ahead
of the device and the device idles while the host then queues the next kernels. In the
masks phase alone those waits were 0.39 s of host time per 256 questions (Phi-2 shape,
H200; ``benchmarks/RESULTS.md``, session 7). Staged in pinned memory, the copy is queued
like a kernel; PyTorch's pinned-memory allocator keeps the staging buffer until the copy
has run.
"""

from __future__ import annotations

import torch


def on_device(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` (or a tensor as it is) on ``device``, queued without
    waiting for the device's earlier work.

    A CPU tensor given in pinned memory is copied from where it is: do not change it until the
    device has run the copy. Not for use inside a CUDA graph capture (the copy would be recorded
    from a staging buffer that is reused later)."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu" or not tensor.numel():  # nothing to stage
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)  # pinning takes no expanded views
