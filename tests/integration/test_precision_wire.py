"""``--weights`` and ``--wire-dtype`` through a real daemon process over a real socket.

- split (trunk in the daemon) equals the full model here at the same weight precision;
- a client may run its own parts at another precision (int4 around an int8 trunk): the split
  equals the full model run here at the same per-part assignment; a client that expects another
  trunk precision (--trunk-weights) is refused before it loads weights, and a forged open by the
  daemon (FAILED_PRECONDITION naming the precision), and the daemon lives on;
- a bfloat16/float16 wire halves the bytes per token, the default wire is exact (the trunk's
  dtype), and the daemon converts both ways (input cast to the trunk's dtype, output to the wire's).
"""

from __future__ import annotations

from contextlib import closing

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.client import TrunkClient, TrunkStream
from splitlm.shared.errors import TrunkError, UsageError
from splitlm.shared.generation import GenerationSettings, generate
from splitlm.shared.models import PartSpec, build_part
from splitlm.shared.models.precision import precision_named
from splitlm.shared.plan import Fingerprint
from tests.integration.test_split import _source
from tests.shared.test_engine import PROMPT, _NoText

CPU = torch.device("cpu")
N = 20


def _model(model_dir) -> prepare.LoadedModel:  # type: ignore[no-untyped-def]
    return prepare.LoadedModel(*_source(model_dir))


def _split_run(address: str, model: prepare.LoadedModel, n: int, wire: torch.dtype | None = None,
               weights: str | None = None, prompt=PROMPT):  # type: ignore[no-untyped-def]
    client = TrunkClient(address)
    try:
        parts = prepare.split_parts(model, client.info(), CPU, weights=weights)
        pipe = prepare.split_pipeline(parts, client, wire_dtype=wire)
        try:
            res = generate(pipe, _NoText(), list(prompt), GenerationSettings(max_new_tokens=n), [])
            return res, pipe.session.wire_dtype
        finally:
            pipe.close()
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_split_through_daemon_equals_full_at_the_same_precision(  # type: ignore[no-untyped-def]
    tiny_models, daemon_factory, kind, weights
) -> None:
    d = daemon_factory(tiny_models[kind], "--split", "2:4", "--weights", weights)
    model = _model(tiny_models[kind])
    with closing(TrunkClient(d.address)) as client:
        assert client.info().plan.weights == weights
    split, wire = _split_run(d.address, model, N)  # --weights unset: the daemon's precision
    full = generate(prepare.full_pipeline(model, torch.float32, CPU, weights=weights), _NoText(), list(PROMPT),
                    GenerationSettings(max_new_tokens=N), [])
    assert len(split.token_ids) == N
    assert split.token_ids == full.token_ids
    # the exact wire is the trunk's compute dtype: bfloat16 for bfloat16, float32 for int8
    assert wire == (torch.bfloat16 if weights == "bfloat16" else torch.float32)
    if weights == "int8":  # the daemon really quantised its layers
        assert "products in int8" in d.log_text()


def test_split_through_daemon_equals_full_at_a_group_size(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """``--weights int4 --group-size 128``: the daemon's trunk holds q4_1g, the client's parts take
    the daemon's ``int4/g128``, and the split equals the full model at that precision."""
    d = daemon_factory(tiny_models["llama"], "--split", "2:4", "--weights", "int4", "--group-size", "128")
    model = _model(tiny_models["llama"])
    with closing(TrunkClient(d.address)) as client:
        assert client.info().plan.weights == "int4/g128"
    split, _ = _split_run(d.address, model, N)
    full = generate(prepare.full_pipeline(model, torch.float32, CPU, weights="int4", group_size=128), _NoText(),
                    list(PROMPT), GenerationSettings(max_new_tokens=N), [])
    assert len(split.token_ids) == N
    assert split.token_ids == full.token_ids


def test_each_side_its_own_precision_and_the_trunks_is_the_daemons(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4", "--weights", "int8")
    model = _model(tiny_models["llama"])
    # the client's own parts at int4 next to the int8 trunk: equal to the full model at that mix
    with closing(TrunkClient(d.address)) as client:
        parts = prepare.split_parts(model, client.info(), CPU, with_full=True, weights="int4")
        assert parts.precision == "int4" and parts.fingerprint.precision == "int8"
        pipe = prepare.split_pipeline(parts, client)
        try:
            split = generate(pipe, _NoText(), list(PROMPT), GenerationSettings(max_new_tokens=N), [])
        finally:
            pipe.close()
    assert parts.full is not None
    from splitlm.shared.generation import LocalPipeline

    full = generate(LocalPipeline(parts.full), _NoText(), list(PROMPT), GenerationSettings(max_new_tokens=N), [])
    alone = generate(prepare.full_pipeline(model, torch.float32, CPU, weights="int4", trunk_weights="int8",
                                           split=(2, 4)), _NoText(), list(PROMPT), GenerationSettings(max_new_tokens=N), [])
    assert split.token_ids == full.token_ids == alone.token_ids and len(split.token_ids) == N
    assert "(bottom and top at int4)" in d.log_text()
    # a client that expects another trunk precision is refused before it loads any weights
    with pytest.raises(UsageError, match="cannot change the daemon's precision"):
        with closing(TrunkClient(d.address)) as client:
            prepare.split_parts(model, client.info(), CPU, trunk_weights="float32")
    # a client that opens anyway (here: one that does not check) is refused by the daemon
    with closing(TrunkClient(d.address)) as client:
        p = client.info().plan
        mine = Fingerprint(p.config_digest, p.weights_digest, p.trunk_start, p.trunk_end, "bfloat16")
        with pytest.raises(TrunkError) as e:
            TrunkStream(client, mine, torch.bfloat16)
        assert e.value.code == "FAILED_PRECONDITION"
        assert "weight precision (int8 here, bfloat16 from the client): pass --weights int8" in str(e.value)
    res, _ = _split_run(d.address, model, 3)  # still serving
    assert len(res.token_ids) == 3 and d.proc.poll() is None


def test_half_wire_halves_the_bytes_and_the_default_is_exact(tiny_models, daemon_factory) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tiny_models["llama"], "--split", "2:4")
    model = _model(tiny_models["llama"])
    hidden = int(model.source.config.hidden_size)

    def per_token(wire):  # type: ignore[no-untyped-def]
        """Bytes per generated token (marginal between 8 and 24 tokens), and the session's wire."""
        (a, w), (b, _) = _split_run(d.address, model, 8, wire), _split_run(d.address, model, 24, wire)
        moved = b.bytes_sent + b.bytes_received - a.bytes_sent - a.bytes_received
        return moved / 16, w, b

    exact, wire, res_exact = per_token(None)
    assert wire == torch.float32  # default: the trunk's dtype, exact
    full = generate(prepare.full_pipeline(model, torch.float32, CPU), _NoText(), list(PROMPT),
                    GenerationSettings(max_new_tokens=24), [])
    assert res_exact.token_ids == full.token_ids
    for half in (torch.bfloat16, torch.float16):
        b, wire, _ = per_token(half)
        assert wire == half
        assert 2 * hidden * 4 <= exact <= 2 * hidden * 4 + 64
        assert 2 * hidden * 2 <= b <= 2 * hidden * 2 + 64
        assert exact - b == 2 * hidden * 2  # exactly half the payload, same framing


@pytest.mark.parametrize(("weights", "wires"), [("float32", (torch.bfloat16, torch.float16)),
                                                 ("bfloat16", (torch.float32,))])
def test_daemon_converts_both_ways(tiny_models, daemon_factory, weights, wires) -> None:  # type: ignore[no-untyped-def]
    """Hidden states sent in the wire dtype reach the trunk in its dtype; the output comes back in
    the wire dtype, equal to the same trunk run here on the same (wire-rounded) input."""
    d = daemon_factory(tiny_models["llama"], "--split", "2:4", "--weights", weights)
    model = _model(tiny_models["llama"])
    precision = precision_named(weights, CPU)
    trunk = build_part(model.source, model.family, PartSpec.trunk(2, 4), precision.dtype, CPU, precision)
    for wire in wires:
        h = torch.randn(1, 5, trunk.hidden_size, generator=torch.Generator().manual_seed(3)).to(wire)
        with closing(TrunkClient(d.address)) as client:
            parts = prepare.split_parts(model, client.info(), CPU)
            s = TrunkStream(client, parts.fingerprint, wire)
            try:
                out, _ = s.step(h, 0)
            finally:
                s.close()
        assert out.dtype == wire and out.shape == h.shape
        want = trunk.forward(h, 0, trunk.new_cache()).to(wire)
        assert not torch.equal(out.float(), h.float())  # the trunk ran
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
