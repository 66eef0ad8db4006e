"""P4 before/after: decode latency at a short and a long context, with the KV cache growing by
concatenation (transformers' ``DynamicLayer``, splitlm before issue 6) or in preallocated buffers
(``splitlm.shared.cache``), measured interleaved in one run. A measurement tool, not a test.

    .venv/bin/python scripts/cache_ab.py --threads 1 --rounds 3 --long 1024
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections.abc import Iterator

from _common import ab_setup, prompt_ids, timed_decode


def main() -> int:
    args, _, full = ab_setup(__doc__, tokens=16, short=16, long=1024)
    from transformers.cache_utils import DynamicLayer

    from splitlm.shared import cache as cache_mod

    @contextlib.contextmanager
    def concatenating() -> Iterator[None]:
        """FullLayer as it was: transformers' update (torch.cat of the whole history per step)."""
        layer = cache_mod.FullLayer
        saved = layer.update, layer.truncate

        def truncate(self: DynamicLayer, length: int) -> None:
            if self.is_initialized and self.keys is not None and self.keys.shape[-2] > length:
                self.keys, self.values = self.keys[..., :length, :], self.values[..., :length, :]

        layer.update, layer.truncate = DynamicLayer.update, truncate  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            layer.update, layer.truncate = saved  # type: ignore[method-assign]

    def decode(n_prompt: int) -> tuple[float, list[int]]:
        d = timed_decode(full, prompt_ids(n_prompt), args.tokens)
        return d.per_token_ms, d.tokens

    modes = {"concat": concatenating, "buffers": contextlib.nullcontext}
    rec: dict[str, list[float]] = {}
    toks: dict[str, list[int]] = {}
    decode(args.short)  # warm-up
    for _ in range(args.rounds):
        for n in (args.short, args.long):
            for name, ctx in modes.items():
                with ctx():
                    ms, out = decode(n)
                rec.setdefault(f"{name}@{n}", []).append(ms)
                toks[f"{name}@{n}"] = out
    res: dict[str, object] = {k: round(statistics.median(v), 2) for k, v in rec.items()}
    for name in modes:
        res[f"{name}_late_over_early"] = round(
            statistics.median(rec[f"{name}@{args.long}"]) / statistics.median(rec[f"{name}@{args.short}"]), 3
        )
    res["same_tokens"] = all(toks[f"concat@{n}"] == toks[f"buffers@{n}"] for n in (args.short, args.long))
    res["threads"] = args.threads
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
