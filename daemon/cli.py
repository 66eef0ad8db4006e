"""``splitlm-trunkd``: load the trunk of a model and serve it.

Cheap checks (arguments, the plan's range) come before heavy imports; logging is set up before
the server is imported, so import errors are logged too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..shared.errors import ExitCode, SplitlmError, UsageError

log = logging.getLogger("splitlm.daemon")


def build_parser() -> argparse.ArgumentParser:
    from ..shared.paths import default_address

    p = argparse.ArgumentParser(
        prog="splitlm-trunkd",
        description="Serve the trunk (middle layers) of a language model over gRPC. "
        "Clients run the bottom and top themselves; only hidden states cross the wire.",
    )
    p.add_argument("--model", default=None, help="smollm2 (default), a .gguf file, a directory, or a hub id [env SPLITLM_MODEL]")
    p.add_argument("--split", default=None, metavar="A:B", help="trunk layers [A, B), 0 < A < B < L (default: family's)")
    p.add_argument("--listen", action="append", default=None, metavar="ADDR",
                   help=f"unix:/path or host:port; repeatable (default: {default_address()})")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-sessions", type=int, default=64, help="sessions open at once (default 64)")
    p.add_argument("--max-context", type=int, default=None, help="positions per session (default: the model's)")
    p.add_argument("--max-message-bytes", type=int, default=None, help="gRPC message limit (default 256 MiB)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads [env SPLITLM_THREADS]")
    p.add_argument("--log-level", default=os.environ.get("SPLITLM_LOG_LEVEL", "INFO"))
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    # idle OpenMP threads must sleep, not spin, or they steal the client's cores on a shared host
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ..shared.version import __version__

        print(__version__)
        return ExitCode.OK
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(args)
    except SplitlmError as e:
        print(f"splitlm-trunkd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.OK


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..shared.client import DEFAULT_MAX_MESSAGE_BYTES
    from ..shared.paths import default_address
    from ..shared.plan import Fingerprint, SplitPlan, default_split

    for n, name in ((args.max_sessions, "--max-sessions"), (args.max_context, "--max-context"),
                    (args.max_message_bytes, "--max-message-bytes"), (args.threads, "--threads")):
        if n is not None and n < 1:
            raise UsageError(f"{name} must be >= 1, got {n}")
    listen = args.listen or [default_address()]

    from ..shared.models import (
        PartSpec,
        build_part,
        family_for,
        resolve,
        resolve_device,
        resolve_dtype,
    )

    source = resolve(args.model)
    family = family_for(source.config)
    num_layers = int(source.config.num_hidden_layers)
    plan = SplitPlan.parse(args.split, num_layers, default_split(num_layers, source.config.model_type))

    import torch

    from .server import env_threads, make_executor, serve
    from .service import Limits, TrunkService

    threads = args.threads or env_threads()
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    part = build_part(source, family, PartSpec.trunk(plan.start, plan.end), dtype, device)
    fingerprint = Fingerprint(source.config_digest(), source.weights_digest(), plan.start, plan.end)
    model_context = int(getattr(source.config, "max_position_embeddings", 0) or 0) or 8192
    limits = Limits(
        max_sessions=args.max_sessions,
        max_context=args.max_context or model_context,
        max_message_bytes=args.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
    )
    service = TrunkService(part, fingerprint, limits, make_executor())
    import psutil

    log.info(
        "trunk of %s (%s, %d layers): layers %s on %s/%s, fingerprint %s, %d torch threads, RSS %.0f MiB",
        source.spec, family.name, num_layers, plan, device, str(dtype).removeprefix("torch."),
        fingerprint.digest, torch.get_num_threads(), psutil.Process().memory_info().rss / 2**20,
    )
    asyncio.run(serve(service, listen))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
