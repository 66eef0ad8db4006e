"""Conversation ids and where a turn starts: pure helpers, no model, no UI."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitlm.shared.generation import prompt_ids
from splitlm.tui.app.turns import (
    Message,
    cached_after,
    common_prefix,
    conversation_ids,
    plan_turn,
    title_for,
)
from tests.tui.conftest import save_word_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    path: Path = tmp_path_factory.mktemp("tok")
    save_word_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


class TestConversationIds:
    def test_one_prompt_is_what_splitlm_generate_tokenizes(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        text = "why is the sky blue"
        assert conversation_ids(tokenizer, [Message("user", text)], "") == prompt_ids(tokenizer, text, chat=True)

    def test_a_new_turn_extends_the_previous_ids(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        first = [Message("user", "why is the sky blue")]
        a = conversation_ids(tokenizer, first, "")
        b = conversation_ids(tokenizer, [*first, Message("assistant", "the sun"), Message("user", "and the sea")], "")
        assert b[: len(a)] == a and len(b) > len(a)

    def test_the_system_prompt_comes_first(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        ids = conversation_ids(tokenizer, [Message("user", "hot")], "be small")
        assert tokenizer.decode(ids, skip_special_tokens=True).startswith("system be small")

    def test_without_a_chat_template_the_texts_are_joined(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        template, tokenizer.chat_template = tokenizer.chat_template, None
        try:
            ids = conversation_ids(tokenizer, [Message("user", "hot sun"), Message("assistant", "the sea")], "")
        finally:
            tokenizer.chat_template = template
        assert tokenizer.decode(ids, skip_special_tokens=True) == "hot sun the sea"


class TestPlanTurn:
    def test_reuses_the_shared_prefix(self) -> None:
        plan = plan_turn([1, 2, 3, 4], [1, 2, 3, 4, 5, 6])
        assert (plan.start, plan.ids) == (4, (5, 6))

    def test_steps_at_least_one_id(self) -> None:
        plan = plan_turn([1, 2, 3, 4, 9], [1, 2, 3])
        assert (plan.start, plan.ids) == (2, (3,))

    def test_a_divergence_rolls_back_to_it(self) -> None:
        plan = plan_turn([1, 2, 3, 4, 5], [1, 2, 7, 8])
        assert (plan.start, plan.ids) == (2, (7, 8))

    def test_floor_caps_the_start(self) -> None:
        plan = plan_turn([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7], floor=3)
        assert (plan.start, plan.ids) == (3, (4, 5, 6, 7))

    def test_empty_cache_starts_at_zero(self) -> None:
        assert plan_turn([], [5, 6]).start == 0

    def test_empty_prompt_is_refused(self) -> None:
        with pytest.raises(ValueError):
            plan_turn([1], [])

    def test_the_last_token_is_not_cached(self) -> None:
        plan = plan_turn([], [1, 2])
        assert cached_after(plan, [7, 8, 9]) == [1, 2, 7, 8]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2


def test_title_is_the_first_line_cut() -> None:
    assert title_for("\n  Why is the sky blue?\nmore") == "Why is the sky blue?"
    long = title_for("x" * 100, width=10)
    assert len(long) == 10 and long.endswith("…")
    assert title_for("   ") == "untitled"
