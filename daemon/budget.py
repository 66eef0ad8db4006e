"""The byte budget of all sessions' trunk KV caches together, checked before a step allocates.

Every trunk layer keeps keys and values for every cached position (sliding-window layers too,
so that a session can roll back), so a session holding ``n`` positions holds exactly
``n * bytes_per_position`` bytes. The budget counts positions *reserved* by each session: a step
reserves ``position + t`` before it runs, on the event loop, with no await between the check
and the reservation, so two sessions can never both pass the check for the same last bytes.
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
    """Caps the positions all sessions may reserve. Used from the event loop only.

    Args:
        max_bytes: the budget (``--max-cache-bytes``).
        per_position: bytes one cached position costs (``bytes_per_position``).
    """

    def __init__(self, max_bytes: int, per_position: int) -> None:
        self.max_bytes = max_bytes
        self.per_position = max(1, per_position)
        self.reserved_positions = 0

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_positions * self.per_position

    def reserve(self, held: int, wanted: int, sessions: int) -> int:
        """Change one session's reservation from ``held`` to ``wanted`` positions.

        Returns:
            ``wanted``, the session's new reservation.

        Raises:
            SessionRefused: RESOURCE_EXHAUSTED when the growth does not fit; nothing changed.
        """
        grow = wanted - held
        if grow > 0 and (self.reserved_positions + grow) * self.per_position > self.max_bytes:
            need = grow * self.per_position
            raise SessionRefused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"trunk cache memory exhausted: this step needs {need} more bytes ({grow} "
                f"positions x {self.per_position} B), but {self.reserved_bytes} of the daemon's "
                f"{self.max_bytes} bytes (--max-cache-bytes) are held by {sessions} session(s); "
                "retry later or use a shorter context",
            )
        self.reserved_positions += grow
        return wanted

    def release(self, held: int) -> None:
        self.reserved_positions -= held

    def describe(self) -> str:
        return (
            f"{self.max_bytes / GIB:.2f} GiB of trunk cache "
            f"({self.max_bytes // self.per_position} positions at {self.per_position} B each)"
        )
