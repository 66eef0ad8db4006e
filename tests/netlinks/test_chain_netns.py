"""A chain of two daemons, each in its own network namespace behind a veth pair (issue 14 part 6):
the route built from their plans gives the full model's greedy tokens and logits bit for bit, over
real links (TCP across veths). Root only; skipped with the reason otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient
from splitlm.shared.generation import LocalPipeline
from splitlm.shared.route import ChainSession, RouteClient

from ..netns import Netns, netns_unavailable
from ..reliability.helpers import PROMPT, Recording, run_ids
from ..shared.test_engine import _NoText

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))


def test_a_chain_across_namespaces_equals_the_full_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from splitlm.shared.models import family_for, resolve

    model_dir = tiny_models["llama"]
    with Netns() as net:
        daemons = []
        for i, split in enumerate(("1:3", "3:5")):
            d = net.daemon(net.namespace(), ["--model", str(model_dir), "--split", split, "--threads", "1",
                                             "--insecure"], log_path=tmp_path / f"hop{i}.log")
            d.start(180, poll_s=0.2)
            daemons.append(d)
        client = RouteClient([TrunkClient(d.address) for d in daemons])
        try:
            src = resolve(str(model_dir))
            model = prepare.LoadedModel(src, family_for(src.config), _NoText(), src.generation_eos())  # type: ignore[arg-type]
            parts = prepare.split_parts(model, client.info(), torch.device("cpu"), with_full=True)
            assert parts.full is not None and parts.plan.split == (1, 5)
            chain = Recording(prepare.split_pipeline(parts, client))
            assert isinstance(chain.inner.session, ChainSession) and len(chain.inner.session.hops) == 2
            got = run_ids(chain, PROMPT, 12)
            chain.close()
            full = LocalPipeline(parts.full)
            want = run_ids(full, PROMPT, 12)
            assert got.token_ids == want.token_ids
        finally:
            client.close()
