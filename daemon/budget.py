"""The byte budget of all sessions' trunk KV caches together, reserved before a buffer grows.

The budget counts the bytes the cache buffers *allocate* (their storage, slack included), not the
positions in use: a buffer holds more positions than it uses so that decode steps stay O(1), and
those bytes are memory the daemon holds. Before a step runs, ``PartCache.plan`` says how many bytes
its buffers will add (squeezing the slack to what is left, so a nearly full budget still serves
whole steps); the step reserves them on the event loop, with no await between the check and the
reservation, so two sessions can never both pass the check for the same last bytes. After the
step the session holds exactly what its buffers hold (``settle``). Transient copies while a
buffer grows and attention's own scratch memory are not counted: they live for one step.
"""

from __future__ import annotations

import logging

import grpc
import torch

from ..shared.models import Part
from .status import SessionRefused

log = logging.getLogger(__name__)

GIB = 2**30


def bytes_per_position(part: Part) -> int:
    """Bytes the trunk's KV cache grows by per position: keys and values of each trunk layer."""
    c = part.config
    heads = int(c.num_attention_heads)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or part.hidden_size // heads)
    itemsize = torch.empty((), dtype=part.dtype).element_size()
    return 2 * kv_heads * head_dim * itemsize * (part.spec.end - part.spec.start)


def auto_budget(device: torch.device) -> int:
    """The default budget, measured after the weights are loaded: 90% of the GPU's free memory,
    or half the host's available memory on a CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    import psutil

    return int(psutil.virtual_memory().available * 0.5)


class CacheBudget:
    """Caps the bytes all sessions' cache buffers may allocate. Used from the event loop only.

    Args:
        max_bytes: the budget (``--max-cache-bytes``).
        per_position: bytes one cached position costs in all trunk layers (``bytes_per_position``).
    """

    def __init__(self, max_bytes: int, per_position: int) -> None:
        self.max_bytes = max_bytes
        self.per_position = max(1, per_position)
        self.reserved_bytes = 0

    @property
    def free(self) -> int:
        """Bytes no session has reserved."""
        return max(0, self.max_bytes - self.reserved_bytes)

    def reserve(self, held: int, wanted: int, sessions: int) -> int:
        """Change one session's reservation from ``held`` to ``wanted`` bytes.

        Returns:
            ``wanted``, the session's new reservation.

        Raises:
            SessionRefused: RESOURCE_EXHAUSTED when the growth does not fit; nothing changed.
        """
        grow = wanted - held
        if grow > 0 and self.reserved_bytes + grow > self.max_bytes:
            raise SessionRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"trunk cache memory exhausted: this step needs {grow} more bytes of cache buffers "
                f"(~{-(-grow // self.per_position)} positions x {self.per_position} B), but "
                f"{self.reserved_bytes} of the daemon's {self.max_bytes} bytes (--max-cache-bytes) "
                f"are allocated to {sessions} session(s); retry later or use a shorter context",
            )
        self.reserved_bytes += grow
        return wanted

    def settle(self, held: int, actual: int) -> int:
        """After a step: the session holds what its buffers really hold. Never raises (called in
        ``finally``); more than was reserved is a bug in the growth plan, logged.

        Returns:
            ``actual``, the session's new reservation.
        """
        if actual > held:
            log.error("a step allocated %d bytes of cache beyond its reservation", actual - held)
        self.reserved_bytes += actual - held
        return actual

    def release(self, held: int) -> None:
        self.reserved_bytes -= held

    def describe(self) -> str:
        return (
            f"{self.max_bytes / GIB:.2f} GiB of trunk cache buffers "
            f"({self.max_bytes // self.per_position} positions at {self.per_position} B each)"
        )


def auto_budget_spread(placement: list[tuple[str, int, int]]) -> int:
    """``auto_budget`` for a trunk cut over devices (``--devices``): each device holds its layers'
    share of every session's cache, so the budget is what the tightest device allows for its
    share (90% of each GPU's free memory; the host's, once, for CPU devices)."""
    total = sum(b - a for _, a, b in placement)
    per_device: dict[str, int] = {}
    for d, a, b in placement:
        key = "cpu" if torch.device(d).type == "cpu" else d
        per_device[key] = per_device.get(key, 0) + (b - a)
    return min(auto_budget(torch.device(k)) * total // layers for k, layers in per_device.items())
