"""The generation loop's incremental detokenizer against the plain rule it replaces.

The reference decodes the whole reply at every token (the old implementation, quadratic in the
reply); the windowed one must stream the same deltas, stop at the same token with the same text,
and decode a bounded window per token however long the reply is. Tokenizers: SmolLM2's (byte-level
BPE, from the bundled GGUF: multi-byte characters span tokens) and a SentencePiece-style one
(Metaspace) built here.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from splitlm.shared.generation import _Detokenizer

TEXT = (
    "Grüße aus Köln! Der Leuchtturmwärter 🧑‍✈️ sah den Sturm — 暴风雨 — kommen. "
    "He wrote: 'The sea is calm tonight.' Then STOP, and after that nothing more; "
    "naïve café, façade, 😀😀 and numbers 3.14159 2718."
)


class Reference:
    """The old rule: decode everything each token; hold a partial character or stop prefix."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop, self.emitted = tokenizer, stop, ""

    def push(self, ids: list[int]) -> tuple[str, bool]:
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        for s in self.stop:
            at = full.find(s)
            if s and at >= 0:
                return self._emit(full[:at]), True
        if full.endswith("\ufffd"):
            return "", False
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), 0, -1):
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(full[: len(full) - hold]), False

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.emitted):
            return ""
        delta, self.emitted = upto[len(self.emitted) :], upto
        return delta


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each ``decode`` call was given."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sizes = inner, []  # type: ignore[var-annotated]

    def decode(self, ids: list[int], **kw: Any) -> str:
        self.sizes.append(len(ids))
        return str(self.inner.decode(ids, **kw))


def stream(det: Any, ids: list[int]) -> list[tuple[int, str, bool]]:
    out = []
    for n in range(1, len(ids) + 1):
        delta, stopped = det.push(ids[:n])
        out.append((n, delta, stopped))
        if stopped:
            break
    return out


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def metaspace_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>", *bytes_])
    tok.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(params=["smollm2", "metaspace"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_streams_what_decoding_everything_streams(tokenizer: Any) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    got = stream(_Detokenizer(tokenizer, ()), ids)
    assert got == stream(Reference(tokenizer, ()), ids)
    assert "".join(d for _, d, _ in got) == tokenizer.decode(ids, skip_special_tokens=True)


def test_random_ids_with_partial_characters(tokenizer: Any) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        det, ref = _Detokenizer(tokenizer, ()), Reference(tokenizer, ())
        assert stream(det, ids) == stream(ref, ids)
        # whatever was streamed, the final text is the whole decode
        assert det.finish(ids, stopped=False) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", [("STOP",), ("calm tonight", "never there"), ("é",), ("\n\n", "。")])
def test_stop_strings_end_at_the_same_token_with_the_same_text(tokenizer: Any, stop: tuple[str, ...]) -> None:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    det, ref = _Detokenizer(tokenizer, stop), Reference(tokenizer, stop)
    got, want = stream(det, ids), stream(ref, ids)
    assert got == want
    assert det.finish(ids, stopped=got[-1][2]) == ref.emitted


def test_decoding_cost_per_token_stays_flat(smollm2_tokenizer: Any) -> None:
    ids = smollm2_tokenizer(TEXT * 6, add_special_tokens=False)["input_ids"]
    assert len(ids) > 300
    counting = CountingTokenizer(smollm2_tokenizer)
    stream(_Detokenizer(counting, ("never there",)), ids)
    # two short windows per token (a multi-token character widens one by a few), never the reply
    assert max(counting.sizes) <= 8, max(counting.sizes)
    assert sum(counting.sizes) <= 4 * len(ids)
