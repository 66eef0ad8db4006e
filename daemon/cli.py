"""``splitlm-trunkd``: load the trunk of a model and serve it.

Cheap checks (arguments, the configuration, who may connect, the plan's range) come before heavy
imports; logging is set up before the server is imported, so import errors are logged too.
Settings are layered: flags > ``SPLITLM_*`` environment > TOML file > defaults
(``splitlm.shared.config``); ``--print-config`` shows the result and where each value came from.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..shared.errors import ExitCode, SplitlmError

if TYPE_CHECKING:
    import torch

    from ..shared.config import DaemonSettings, Loaded
    from ..shared.models import Family, ModelSource, Part
    from ..shared.models.precision import Precision
    from ..shared.plan import Fingerprint, SplitPlan
    from .batcher import BatchPolicy
    from .notify import Notifier
    from .service import Limits, TrunkService

log = logging.getLogger("splitlm.daemon")


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``splitlm-trunkd``: the registry's (``shared.config``) and two of its own."""
    from ..shared.config import TRUNKD, add_flags

    p = argparse.ArgumentParser(
        prog="splitlm-trunkd",
        description="Serve the trunk (middle layers) of a language model over gRPC. "
        "Clients run the bottom and top themselves; only hidden states cross the wire.",
        epilog="Each setting KEY can also come from the environment (SPLITLM_KEY, e.g. SPLITLM_MAX_SESSIONS) "
        "or the TOML config file (key = value, e.g. max_sessions = 8); flags win over the environment, the "
        "environment over the file. --print-config shows the effective values and where each came from.",
    )
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings and their sources, then exit")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    add_flags(p, TRUNKD)
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
    if args.health_check:  # a container HEALTHCHECK: no settings, no torch
        from .health import check

        code, answer = check(args.health_check)
        print(f"{args.health_check}: {answer}")
        return code
    from ..shared import config

    try:
        loaded = config.load(
            config.DaemonSettings, config.flags_from(args, config.DaemonSettings),
            config=args.config, file_name="trunkd", system=True,
        )
    except SplitlmError as e:
        print(f"splitlm-trunkd: error: {e}", file=sys.stderr)
        return e.exit_code
    if args.print_config:
        print(config.render(loaded, "splitlm-trunkd effective configuration"))
        return ExitCode.OK
    logging.basicConfig(
        level=loaded.settings.log_level, stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return run(loaded)
    except SplitlmError as e:
        print(f"splitlm-trunkd: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file or device the start needs, refused by the system: one line
        log.debug("start failed", exc_info=True)
        where = f": {e.filename}" if e.filename else ""
        print(f"splitlm-trunkd: error: {e.strerror or e}{where}", file=sys.stderr)
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return ExitCode.OK


def run(loaded: Loaded[DaemonSettings]) -> int:
    """Load the trunk and serve it until a signal; refusals come before any weights load."""
    import asyncio

    from .auth import check_exposure
    from .notify import Notifier

    args = loaded.settings
    security = check_exposure(args, loaded.sources)  # before any weights load: refusals are immediate
    listen = list(args.listen)
    notifier = Notifier()
    trunk = load_trunk(args, notifier)

    from .batcher import BatchPolicy
    from .server import make_executor, serve
    from .service import TrunkService
    from .steps import TrunkSteps

    limits = limits_for(args, trunk)
    batching = BatchPolicy(window_s=args.batch_window) if args.batch else None
    service = TrunkService(TrunkSteps(trunk.part, trunk.fingerprint, limits, make_executor(), batching,
                                      prefill_slice=args.prefill_slice))
    log_start(trunk, service, batching)
    try:
        asyncio.run(serve(service, listen, args.shutdown_grace, security=security, notifier=notifier,
                          keepalive_s=args.keepalive, metrics=args.metrics,
                          health_listen=list(args.health_listen or ())))
    finally:
        notifier.close()
    return ExitCode.OK


@dataclass(frozen=True)
class LoadedTrunk:
    """The trunk's layers in memory and what they are: what the service serves and the start
    log describes."""

    source: ModelSource
    family: Family
    plan: SplitPlan
    device: torch.device
    precision: Precision
    part: Part
    fingerprint: Fingerprint


def load_trunk(args: DaemonSettings, notifier: Notifier) -> LoadedTrunk:
    """Resolve the model and the plan (a bad ``--split`` fails before torch loads), then build
    the trunk layers at the chosen precision, telling systemd the start takes longer meanwhile.

    Raises:
        SplitlmError: the model does not resolve, the plan or the precision is invalid.
    """
    from ..shared.models import (
        PartSpec,
        build_part,
        family_for,
        resolve,
        resolve_device,
        resolve_dtype,
    )
    from ..shared.plan import Fingerprint, SplitPlan, default_split

    source = resolve(args.model)
    family = family_for(source.config)
    num_layers = int(source.config.num_hidden_layers)
    plan = SplitPlan.parse(args.split, num_layers, default_split(num_layers, source.config.model_type))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    from ..shared.models.precision import check_source, resolve_precision

    precision = resolve_precision(
        args.weights, resolve_dtype(args.dtype, device), args.dtype != "auto", device, args.group_size
    )
    check_source(precision, source)
    with notifier.extending(f"loading {source.spec} trunk layers {plan} on {device}"):
        part = build_part(source, family, PartSpec.trunk(plan.start, plan.end), precision.dtype, device, precision)
        fingerprint = Fingerprint(
            source.config_digest(), source.weights_digest(), plan.start, plan.end, precision.tag
        )
    return LoadedTrunk(source, family, plan, device, precision, part, fingerprint)


def limits_for(args: DaemonSettings, trunk: LoadedTrunk) -> Limits:
    """The service's limits: the settings', with the model's context and the device's memory
    filling in what is left to ``auto``."""
    from .budget import auto_budget
    from .service import Limits

    model_context = int(getattr(trunk.source.config, "max_position_embeddings", 0) or 0) or 8192
    return Limits(
        max_sessions=args.max_sessions,
        max_context=args.max_context or model_context,
        max_message_bytes=args.max_message_bytes,
        max_cache_bytes=(
            auto_budget(trunk.device) if args.max_cache_bytes == "auto" else int(args.max_cache_bytes)
        ),
        idle_timeout_s=args.idle_timeout,
    )


def log_start(trunk: LoadedTrunk, service: TrunkService, batching: BatchPolicy | None) -> None:
    """What is served and within which limits, once, before the port opens."""
    import psutil
    import torch

    limits = service.limits
    log.info(
        "trunk of %s (%s, %d layers): layers %s on %s/%s weights %s, fingerprint %s, %d torch threads, RSS %.0f MiB",
        trunk.source.spec, trunk.family.name, trunk.plan.num_layers, trunk.plan, trunk.device,
        str(trunk.precision.dtype).removeprefix("torch."), trunk.precision.tag, trunk.fingerprint.digest,
        torch.get_num_threads(), psutil.Process().memory_info().rss / 2**20,
    )
    log.info(
        "limits: %d sessions, %d positions each, %s, idle timeout %s",
        limits.max_sessions, limits.max_context, service.budget.describe(),
        f"{limits.idle_timeout_s:g} s" if limits.idle_timeout_s else "none",
    )
    if batching is not None:
        log.info("batching: decode steps of concurrent sessions run as one batch (window %g s)", batching.window_s)


if __name__ == "__main__":
    sys.exit(main())
