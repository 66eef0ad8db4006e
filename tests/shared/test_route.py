"""``shared.route.build_route`` on plans alone (no sockets): stages, tiling, one model, the
route's own Info; and the ``--trunk`` reader's lists."""

from __future__ import annotations

import pytest

from splitlm.protos import trunk_pb2 as pb
from splitlm.shared.config import Targets
from splitlm.shared.plan import Fingerprint
from splitlm.shared.route import RouteError, build_route


def _info(start: int, end: int, weights_digest: str = "w1", weights: str = "", sessions: int = 4) -> pb.InfoReply:
    fp = Fingerprint("c1", weights_digest, start, end, weights or "float32")
    info = pb.InfoReply(sessions_open=1)
    info.plan.model_id, info.plan.family, info.plan.model_type = "smollm2", "llama", "llama"
    info.plan.num_layers, info.plan.hidden_size = 30, 576
    info.plan.trunk_start, info.plan.trunk_end = start, end
    info.plan.config_digest, info.plan.weights_digest, info.plan.weights = "c1", weights_digest, weights
    info.plan.fingerprint, info.plan.device = fp.digest, "cpu"
    info.limits.max_sessions, info.limits.max_context = sessions, 8192
    return info


def test_stages_in_layer_order_and_the_routes_info() -> None:
    route = build_route([("B", _info(15, 28, sessions=2)), ("A", _info(2, 15)), ("C", _info(15, 28))])
    assert [(s.start, s.end, s.addresses) for s in route.stages] == [(2, 15, ("A",)), (15, 28, ("B", "C"))]
    info = route.info()
    assert (info.plan.trunk_start, info.plan.trunk_end) == (2, 28)
    assert info.plan.fingerprint == Fingerprint("c1", "w1", 2, 28).digest
    assert info.limits.max_sessions == 2 and info.plan.device == "cpu,cpu"
    assert route.fingerprint(2, 15).digest == _info(2, 15).plan.fingerprint


@pytest.mark.parametrize(
    ("answers", "words"),
    [
        ([("A", _info(2, 10)), ("B", _info(15, 28))], "gap: layers 10:15 are served by none (2:10 at A; 15:28 at B)"),
        ([("A", _info(2, 15)), ("B", _info(10, 28))], "overlap: layers 10:15 are served twice (2:15 at A; 10:28 at B)"),
        ([("A", _info(2, 15)), ("B", _info(15, 28, weights_digest="w2"))], "weights digest w2 (at A: w1)"),
        ([("A", _info(2, 15)), ("B", _info(15, 28, weights="int8"))], "weight precision (--weights) int8 (at A: float32)"),
        ([("A", _info(2, 15)), ("A", _info(2, 15))], "--trunk A is given twice"),
    ],
    ids=["gap", "overlap", "other weights", "other precision", "twice"],
)
def test_what_is_not_a_route(answers: list[tuple[str, pb.InfoReply]], words: str) -> None:
    with pytest.raises(RouteError, match=None) as e:
        build_route(answers)
    assert words in str(e.value) and e.value.exit_code == 2


def test_trunk_lists() -> None:
    read = Targets()
    assert read("unix:/a.sock, unix:/b.sock") == ("unix:/a.sock", "unix:/b.sock")
    assert read(["unix:/a.sock", "h:1,h:2"]) == ("unix:/a.sock", "h:1", "h:2")
    assert read("ipv4:127.0.0.1:1,127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2",)
    assert read("unix:/a.sock,/b.sock,h:1") == ("unix:/a.sock,/b.sock", "h:1")
    for bad in ("", "a,,b", [], [3]):
        with pytest.raises(ValueError):
            read(bad)
