"""``--draft student:DIR``: the drafter of a bridge student (``shared.draft.student``).

Its proposals are what the trained layers compute (checked against the training forward, a
different code path: whole sequences, no cache), stay right across rollbacks, sample from the
reply's distribution, and a student that does not fit (another model, another plan, a damaged
weights file, no manifest) is refused naming what differs, also against a real daemon's plan.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from splitlm.shared import prepare
from splitlm.shared.draft.build import build_drafter
from splitlm.shared.draft.student import BridgeDrafter, load_student_drafter
from splitlm.shared.errors import UsageError
from splitlm.shared.models import PartSpec, build_parts
from splitlm.shared.sampling import SamplingSettings
from tests.conftest import run_cli

CPU = torch.device("cpu")
GREEDY = SamplingSettings()
CONTEXT = [40, 72, 69, 3, 81, 85, 73, 67, 75, 3, 66, 82]


@pytest.fixture(scope="module")
def model(tiny_text_models: dict[str, Path]) -> prepare.LoadedModel:
    return prepare.load_model(str(tiny_text_models["llama"]))


def _drafter(bridge: Path, model: prepare.LoadedModel) -> BridgeDrafter:
    d = build_drafter(f"student:{bridge}", model, CPU)
    assert isinstance(d, BridgeDrafter)
    return d


def _training_argmax(bridge: Path, model: prepare.LoadedModel, ids: list[int]) -> int:
    """The next token by the training forward: teacher's bottom, the student's layers, the
    teacher's top, over the whole sequence at once."""
    from splitlm.shared.draft import student as fmt
    from splitlm.tui.distill.train import Batch, BridgeStudent, Teacher

    m = fmt.read_manifest(bridge)
    assert m.plan is not None
    (full,) = build_parts(model.source, model.family, [PartSpec.full(model.num_layers)], torch.float32, CPU)
    mid = fmt.bridge_part(model, m.plan, m.layers, torch.float32, CPU)
    student = BridgeStudent(Teacher(full), mid, m.plan, m.init_from)
    fmt.set_bridge_weights(mid, fmt.load_bridge_layers(bridge, m), bridge)
    batch = Batch(torch.tensor([ids]))
    with torch.no_grad():
        _, h0 = student.teacher.run(batch, m.plan[0])
        return int(student.logits(batch, h0)[0, -1].argmax())


def test_greedy_proposals_are_the_trained_layers_argmax(bridge: Path, model: prepare.LoadedModel) -> None:
    d = _drafter(bridge, model)
    assert d.name == f"student:{bridge}"
    assert 0 < d.cost < 1  # 1 + 2 + 1 layers of 6, and the head
    draft = d.propose(CONTEXT, 4, GREEDY, torch.Generator())
    assert len(draft.tokens) == 4 and draft.probs is None and draft.seconds > 0
    ids = list(CONTEXT)
    for token in draft.tokens:
        assert token == _training_argmax(bridge, model, ids)
        ids.append(token)


def test_rollback_to_the_common_prefix(bridge: Path, model: prepare.LoadedModel) -> None:
    d = _drafter(bridge, model)
    g = torch.Generator()
    first = d.propose(CONTEXT, 5, GREEDY, g).tokens
    # the loop accepted two drafted tokens and then the model chose another: the drafter rolls
    # back past the rest and goes on from there, as a fresh drafter would
    diverged = [*CONTEXT, *first[:2], (first[2] + 1) % 90 + 4]
    again = d.propose(diverged, 3, GREEDY, g).tokens
    fresh = _drafter(bridge, model)
    assert again == fresh.propose(diverged, 3, GREEDY, g).tokens
    # an earlier edit of the conversation (a shorter, different context) and the same context again
    edited = CONTEXT[:5] + [50, 51]
    assert d.propose(edited, 3, GREEDY, g).tokens == fresh.propose(edited, 3, GREEDY, g).tokens
    assert d.propose(CONTEXT, 5, GREEDY, g).tokens == first
    d.close()
    assert d.propose(CONTEXT, 5, GREEDY, g).tokens == first


def test_sampled_proposals_carry_their_distribution(bridge: Path, model: prepare.LoadedModel) -> None:
    d = _drafter(bridge, model)
    s = SamplingSettings(temperature=0.9, top_k=5, seed=3)
    a = d.propose(CONTEXT, 3, s, torch.Generator().manual_seed(7))
    assert a.probs is not None and a.probs.shape == (3, model.source.config.vocab_size)
    assert torch.allclose(a.probs.sum(-1), torch.ones(3))
    assert all(int((row > 0).sum()) == 5 for row in a.probs)  # top-k kept 5 tokens
    assert all(float(a.probs[i, t]) > 0 for i, t in enumerate(a.tokens))
    b = _drafter(bridge, model).propose(CONTEXT, 3, s, torch.Generator().manual_seed(7))
    assert a.tokens == b.tokens and torch.equal(a.probs, b.probs)


def test_shares_the_clients_parts(bridge: Path, model: prepare.LoadedModel) -> None:
    bottom, top = build_parts(model.source, model.family, [PartSpec.bottom(1), PartSpec.top(5, 6)], torch.float32, CPU)
    d = load_student_drafter(bridge, model, CPU, bottom=bottom, top=top)
    assert isinstance(d, BridgeDrafter) and d.bottom is bottom and d.top is top
    assert d.propose(CONTEXT, 4, GREEDY, torch.Generator()).tokens == _drafter(bridge, model).propose(
        CONTEXT, 4, GREEDY, torch.Generator()).tokens


def test_a_student_for_another_plan_is_refused(bridge: Path, model: prepare.LoadedModel) -> None:
    bottom, top = build_parts(model.source, model.family, [PartSpec.bottom(2), PartSpec.top(4, 6)], torch.float32, CPU)
    with pytest.raises(UsageError, match=r"made for the plan 1:5.*serves 2:4"):
        load_student_drafter(bridge, model, CPU, bottom=bottom, top=top)


def test_a_student_for_another_model_is_refused(bridge: Path, tmp_path: Path) -> None:
    from tests.conftest import save_tiny, save_tiny_tokenizer

    other = prepare.load_model(str(save_tiny_tokenizer(save_tiny("llama", tmp_path / "other", seed=1))))
    with pytest.raises(UsageError, match=r"made for another model.*weights \("):
        build_drafter(f"student:{bridge}", other, CPU)


@pytest.mark.parametrize("damage", ["truncated", "missing", "no manifest", "bad manifest"])
def test_a_damaged_student_is_refused(bridge: Path, model: prepare.LoadedModel, tmp_path: Path, damage: str) -> None:
    d = tmp_path / "student"
    shutil.copytree(bridge, d)
    weights = d / json.loads((d / "student.json").read_text())["weights"]
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        message = "corrupt or truncated"
    elif damage == "missing":
        weights.unlink()
        message = "is missing"
    elif damage == "no manifest":
        (d / "student.json").unlink()
        message = "no student.json manifest"
    else:
        (d / "student.json").write_text("{\"format\": \"splitlm-student\", \"version\": 1}")
        message = "not a usable student manifest"
    with pytest.raises(UsageError, match=message):
        build_drafter(f"student:{d}", model, CPU)


def test_generate_with_a_student_split_equals_full(bridge: Path, tiny_text_models: dict[str, Path],
                                                   daemon_factory) -> None:  # type: ignore[no-untyped-def]
    """``generate --draft student:DIR`` through a real daemon gives the full model's greedy tokens
    with the same draft, round trips and acceptance; a daemon serving another plan is refused,
    naming both plans."""
    model = str(tiny_text_models["llama"])
    common = ("--model", model, "--no-chat", "--max-new-tokens", "16", "--draft", f"student:{bridge}",
              "--draft-link", "3",  # one link weight for both: the same drafts, not each one's own
              "--threads", "1", "--json", "The quick brown")
    d = daemon_factory(tiny_text_models["llama"], "--split", "1:5")
    split = run_cli("generate", "--trunk", d.address, *common)
    full = run_cli("generate", "--full", *common)
    assert split.returncode == 0 and full.returncode == 0, split.stderr + full.stderr
    s, f = json.loads(split.stdout), json.loads(full.stdout)
    assert s["token_ids"] == f["token_ids"] and len(s["token_ids"]) > 0
    assert s["draft"]["drafted"] > 0
    for key in ("steps", "drafted", "accepted"):
        assert s["draft"][key] == f["draft"][key], key

    other = daemon_factory(tiny_text_models["llama"], "--split", "2:4")
    r = run_cli("generate", "--trunk", other.address, *common)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "made for the plan 1:5" in r.stderr and "serves 2:4" in r.stderr
