"""Devices a plan's stages run on, and the memory each can hold (``--devices``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Device:
    """A device a stage runs on, and the bytes it can hold (None: unknown, not checked)."""

    name: str
    capacity: int | None


def parse_devices(text: str | Sequence[str]) -> list[str]:
    """``cpu,cuda:0,cuda:1`` as a list of device names (each a torch device string).

    Raises:
        UsageError: an empty entry or a device torch does not parse.
    """
    import torch

    items = [x.strip() for x in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not x for x in items):
        raise UsageError(f"--devices must be device names separated by commas, e.g. cuda:0,cuda:1 or cpu,cpu; got {text!r}")
    for x in items:
        try:
            torch.device(x)
        except RuntimeError:
            raise UsageError(f"--devices: {x!r} is not a device name (cpu, cuda, cuda:N)") from None
    return items


def probe_devices(names: Sequence[str]) -> list[Device]:
    """The devices named, with the memory each can hold; devices that share memory (``cpu``
    named twice) share it equally.

    CPU: psutil's available memory. CUDA: ``torch.cuda.mem_get_info`` (free bytes on that
    device), as torch documents it; untested here (no GPU on the machines this was written on).

    Raises:
        UsageError: a device that does not exist here (``cuda:7`` with fewer GPUs, ``cpu:1``).
    """
    import psutil
    import torch

    free: dict[str, int] = {}
    for name in names:
        d = torch.device(name)
        key = str(d)
        if d.type == "cpu":
            if d.index not in (None, 0):
                raise UsageError(f"device {name}: torch has one CPU device (cpu or cpu:0); name it several times to cut over it, e.g. cpu,cpu")
            free["cpu"] = int(psutil.virtual_memory().available)
        elif d.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if d.index is None else d.index
            if index >= count:
                raise UsageError(f"device {name} does not exist here: torch sees {count} CUDA device(s)")
            free[key] = int(torch.cuda.mem_get_info(index)[0])  # untested here: no GPU
        else:
            raise UsageError(f"device {name}: splitlm runs on cpu and cuda devices")
    shares: dict[str, int] = {}
    for name in names:
        key = "cpu" if torch.device(name).type == "cpu" else str(torch.device(name))
        shares[key] = shares.get(key, 0) + 1
    out = []
    for name in names:
        key = "cpu" if torch.device(name).type == "cpu" else str(torch.device(name))
        out.append(Device(name, free[key] // shares[key]))
    return out
