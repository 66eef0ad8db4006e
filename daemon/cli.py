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
    """Resolve the model and the plan (a bad ``--split``, ``--stages`` or ``--devices`` fails
    before torch loads any weight), then build the trunk layers at the chosen precision, on one
    device or cut over ``--devices`` (``SpreadPart``), telling systemd the start takes longer
    meanwhile.

    Raises:
        SplitlmError: the model does not resolve, the plan, a device or the precision is invalid,
            or the plan does not fit the devices.
    """
    from ..shared.models import (
        PartSpec,
        build_part,
        family_for,
        resolve,
        resolve_device,
        resolve_dtype,
    )
    from ..shared.plan import Fingerprint

    source = resolve(args.model)
    family = family_for(source.config)
    plan, placement = daemon_plan(args, source)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d, _, _ in placement] if placement else [resolve_device(args.device)]
    device = devices[0]
    from ..shared.models.precision import check_source, resolve_precision

    precision = resolve_precision(
        args.weights, resolve_dtype(args.dtype, device), args.dtype != "auto", device, args.group_size
    )
    for other in devices[1:]:  # one precision on every device (a quantised one must be CPU-only)
        resolve_precision(args.weights, precision.dtype, True, other, args.group_size)
    check_source(precision, source)
    where = ", ".join(f"{d} {a}:{b}" for d, a, b in placement) if placement else str(device)
    with notifier.extending(f"loading {source.spec} trunk layers {plan} on {where}"):
        part: Part
        if placement:
            from ..shared.models.spread import SpreadPart

            part = SpreadPart([
                build_part(source, family, PartSpec.trunk(a, b), precision.dtype, torch.device(d), precision)
                for d, a, b in placement
            ])
        else:
            part = build_part(source, family, PartSpec.trunk(plan.start, plan.end), precision.dtype, device, precision)
        fingerprint = Fingerprint(
            source.config_digest(), source.weights_digest(), plan.start, plan.end, precision.tag
        )
    return LoadedTrunk(source, family, plan, device, precision, part, fingerprint)


def daemon_plan(args: DaemonSettings, source: ModelSource) -> tuple[SplitPlan, list[tuple[str, int, int]]]:
    """The trunk range this daemon serves, and its cut over ``--devices`` (empty: one device).

    - ``--split A:B`` (or unset: the family's default): that range.
    - ``--split auto``: a plan by ``--strategy`` (``shared.partition``): the client keeps the
      family's default bottom and top (or what ``--client-memory`` holds); with ``--stages N
      --stage I`` the trunk is cut into N stages and this daemon serves the I-th (1 to N), so N
      daemons started alike but for ``--stage`` tile the trunk; with ``--strategy custom``,
      ``--layers`` names those stages.
    - ``--devices D1,D2,...``: the range is cut over the devices by ``--strategy`` (``custom``:
      ``--layers`` gives one range per device), each device's free memory checked.

    Raises:
        UsageError: a bad combination, a device that does not exist; ``NothingFits`` when a
            device cannot hold its layers (how much is missing is said).
    """
    from ..shared.errors import UsageError
    from ..shared.partition import model_cost, parse_devices, plan, probe_devices
    from ..shared.plan import SplitPlan, default_split

    config = source.config
    n = int(config.num_hidden_layers)
    auto = (args.split or "").strip().lower() == "auto"
    if (args.stages is not None or args.stage is not None) and not auto:
        raise UsageError("--stages and --stage go with --split auto (the planner picks this daemon's range)")
    if args.devices and args.device not in ("auto", None):
        raise UsageError(f"give --device {args.device} or --devices {args.devices}, not both")
    custom_devices = args.strategy == "custom" and bool(args.devices)
    if args.strategy == "custom" and not args.layers:
        raise UsageError("--strategy custom needs --layers (e.g. 2:15,15:28)")
    if args.layers and args.strategy != "custom":
        raise UsageError(f"--layers goes with --strategy custom, not {args.strategy}")
    weights = args.weights if args.weights != "auto" else (args.dtype if args.dtype != "auto" else "float32")
    cost = model_cost(config, source.spec, weights, args.group_size, args.max_context,
                      source.path if source.kind == "gguf" else None)
    names = parse_devices(args.devices) if args.devices else None
    devices = probe_devices(names) if names else None
    if auto and not custom_devices:
        stages, stage = args.stages or 1, args.stage or 1
        if stages > 1 and args.stage is None:
            raise UsageError(f"--stages {stages}: say which stage this daemon serves with --stage 1 to {stages}")
        if stage > stages:
            raise UsageError(f"--stage {stage} is out of range: --stages {stages} has stages 1 to {stages}")
        whole = plan(cost, args.strategy, stages, None, args.client_memory, args.layers if args.strategy == "custom" else None)
        if len(whole.trunk) != stages:
            raise UsageError(f"--stages {stages}, but --layers {args.layers} gives {len(whole.trunk)} stage(s)")
        mine = whole.trunk[stage - 1]
        split = SplitPlan(n, mine.start, mine.end)
        log.info("--split auto: strategy %s gives stage %d of %d: layers %s (%s)", args.strategy, stage, stages,
                 split, mine.reason)
    elif auto:
        split = None
    else:
        split = SplitPlan.parse(args.split, n, default_split(n, config.model_type))
    if devices is None:
        assert split is not None
        return split, []
    if custom_devices:
        cut = plan(cost, "custom", None, devices, None, args.layers, (split.start, split.end) if split else None)
        split = SplitPlan(n, *cut.split)
    else:
        assert split is not None
        strategy = args.strategy if args.strategy != "custom" else "memory"
        cut = plan(cost, strategy, None, devices, None, None, (split.start, split.end))
    placement = [(s.device or "cpu", s.start, s.end) for s in cut.trunk]
    log.info("--devices: layers %s cut by %s: %s", split, cut.strategy,
             "; ".join(f"{d} {a}:{b} ({s.reason})" for (d, a, b), s in zip(placement, cut.trunk)))
    return split, placement


def limits_for(args: DaemonSettings, trunk: LoadedTrunk) -> Limits:
    """The service's limits: the settings', with the model's context and the device's memory
    filling in what is left to ``auto``."""
    from .budget import auto_budget, auto_budget_spread
    from .service import Limits

    model_context = int(getattr(trunk.source.config, "max_position_embeddings", 0) or 0) or 8192
    placement = getattr(trunk.part, "placement", None)
    return Limits(
        max_sessions=args.max_sessions,
        max_context=args.max_context or model_context,
        max_message_bytes=args.max_message_bytes,
        max_cache_bytes=(
            (auto_budget_spread(placement) if placement else auto_budget(trunk.device))
            if args.max_cache_bytes == "auto" else int(args.max_cache_bytes)
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
    placement = getattr(trunk.part, "placement", None)
    if placement:
        log.info("devices: %s", "; ".join(f"layers {a}:{b} on {d}" for d, a, b in placement))
    if batching is not None:
        log.info("batching: decode steps of concurrent sessions run as one batch (window %g s)", batching.window_s)


if __name__ == "__main__":
    sys.exit(main())
