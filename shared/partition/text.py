"""``splitlm plan``'s words and table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .strategies import Partition


def _short(v: float) -> str:
    """3 significant figures, never in exponent form (``1020``, ``15.9``)."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def fmt_bytes(n: float) -> str:
    """Bytes in binary units, 3 significant figures (``15.9 MiB``)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{_short(n / size)} {unit}"
    return f"{int(n)} B"


def fmt_flops(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{_short(n / size)} {unit}"
    return f"{int(n)}"


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{_short(n / size)}{unit}"
    return str(int(n))


def render(p: Partition) -> str:
    """``splitlm plan``'s table."""
    c = p.cost
    lines = [
        f"plan: {c.model} ({c.model_type}, {c.num_layers} layers), strategy {p.strategy}, weights {c.precision}, "
        f"--max-context {c.max_context}, split {p.split[0]}:{p.split[1]}",
        f"{'stage':<7}{'layers':>9}  {'device':<9}{'params':>8}{'weights':>11}{'KV/pos':>10}{'KV@ctx':>11}"
        f"{'FLOPs/tok':>11}  why",
    ]
    for s in p.stages:
        lines.append(
            f"{s.role:<7}{f'{s.start}:{s.end}':>9}  {s.device or '-':<9}{fmt_count(s.params):>8}"
            f"{fmt_bytes(s.weight_bytes):>11}{fmt_bytes(s.kv_bytes_per_position):>10}{fmt_bytes(s.kv_bytes):>11}"
            f"{fmt_flops(s.flops_per_token):>11}  {s.reason}"
        )
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
