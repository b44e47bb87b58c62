"""Sampling and output bookkeeping: stop strings, EOS, min_tokens, seeds, UTF-8 safety."""

from __future__ import annotations

import pytest
import torch

from thunderserve.common.models import load_tokenizer
from thunderserve.common.protocol import SamplingParams
from thunderserve.common.sequence import OutputTracker, sample_token

EOS = frozenset({2})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


def _tracker(tokenizer, **params) -> OutputTracker:
    return OutputTracker(SamplingParams(**params), prompt_len=3, max_context=100, eos_token_ids=EOS,
                         tokenizer=tokenizer)


def _feed(tracker, tokens):
    out = []
    for t in tokens:
        step = tracker.add(t)
        out.append(step.text)
        if step.finish_reason:
            break
    return "".join(out), tracker.finish_reason


def test_stop_string_is_cut_and_never_leaked(tokenizer):
    tokens = tokenizer.encode("Hello world. The end. More text", add_special_tokens=False)
    text, reason = _feed(_tracker(tokenizer, max_tokens=50, stop=["The end"]), tokens)
    assert reason == "stop"
    assert text == "Hello world. "


def test_eos_stops_unless_ignored_or_too_early(tokenizer):
    hello = tokenizer.encode("Hi there", add_special_tokens=False)
    assert _feed(_tracker(tokenizer, max_tokens=10), [*hello, 2, *hello]) == ("Hi there", "stop")
    text, reason = _feed(_tracker(tokenizer, max_tokens=len(hello) + 1, ignore_eos=True), [*hello, 2])
    assert reason == "length"
    tracker = _tracker(tokenizer, max_tokens=10, min_tokens=3)
    tracker.add(2)  # EOS before min_tokens does not finish
    assert tracker.finish_reason is None


def test_length_and_context_limits(tokenizer):
    assert _feed(_tracker(tokenizer, max_tokens=2), [100, 101, 102])[1] == "length"
    tracker = OutputTracker(SamplingParams(max_tokens=50), 98, 100, EOS, tokenizer)
    assert _feed(tracker, [100, 101, 102])[1] == "length" and tracker.completion_tokens == 2


def test_multibyte_characters_are_not_split(tokenizer):
    tokens = tokenizer.encode("Ünïcödé 🚀 done", add_special_tokens=False)
    text, _ = _feed(_tracker(tokenizer, max_tokens=len(tokens)), tokens)
    assert text == "Ünïcödé 🚀 done"
    assert "\ufffd" not in text


def test_greedy_min_tokens_and_logit_bias():
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0])
    assert sample_token(logits, SamplingParams(temperature=0), 0, EOS) == 2
    assert sample_token(logits, SamplingParams(temperature=0, min_tokens=1), 0, EOS) == 3  # EOS masked
    assert sample_token(logits, SamplingParams(temperature=0, logit_bias={0: 10.0}), 0, EOS) == 0


def test_presence_and_frequency_penalties_push_down_what_was_generated():
    logits = torch.tensor([0.0, 3.0, 2.5, 1.0])
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, greedy, 2, EOS, generated=[1, 1]) == 1  # no penalty: unchanged
    presence = SamplingParams(temperature=0, presence_penalty=1.0)
    assert sample_token(logits, presence, 2, EOS, generated=[1, 1]) == 2  # 3.0 - 1 < 2.5
    freq = SamplingParams(temperature=0, frequency_penalty=0.3)
    assert sample_token(logits, freq, 1, EOS, generated=[1]) == 1  # 3.0 - 0.3 still wins
    assert sample_token(logits, freq, 2, EOS, generated=[1, 1]) == 2  # 3.0 - 0.6 < 2.5: counts matter
    negative = SamplingParams(temperature=0, frequency_penalty=-1.5)
    assert sample_token(logits, negative, 2, EOS, generated=[3, 3]) == 3  # a negative one rewards repeats
    assert sample_token(logits, presence, 0, EOS) == 1  # nothing generated yet


def test_seeded_sampling_is_reproducible_and_top_p_restricts():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=7)
    first = [sample_token(logits, p, step, EOS) for step in range(20)]
    assert first == [sample_token(logits, p, step, EOS) for step in range(20)]
    assert len(set(first)) > 1
    top = int(logits.argmax())
    narrow = SamplingParams(temperature=1.0, top_p=1e-6, seed=1)
    assert {sample_token(logits, narrow, s, EOS) for s in range(10)} == {top}


def test_top_k_and_min_p_keep_only_the_likely_tokens():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, dim=-1)
    top5 = set(torch.topk(logits, 5).indices.tolist())
    k5 = SamplingParams(temperature=1.0, top_k=5, seed=3)
    drawn = {sample_token(logits, k5, s, EOS) for s in range(200)}
    assert drawn <= top5 and len(drawn) > 1
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_k=1, seed=4), s, EOS)
            for s in range(20)} == {int(logits.argmax())}
    min_p = SamplingParams(temperature=1.0, min_p=0.3, seed=5)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < 1000
    drawn = {sample_token(logits, min_p, s, EOS) for s in range(200)}
    assert drawn <= allowed and len(drawn) > 1
    everything = {sample_token(logits, SamplingParams(temperature=1.0, seed=5), s, EOS) for s in range(200)}
    assert not everything <= allowed  # without the filters, unlikely tokens do come up


@pytest.mark.parametrize("text, cut, params", [
    ("Hello world. The end. More text", 2, {"max_tokens": 50, "stop": ["The end"]}),  # stop after the cut
    ("Hello world. The end. More text", 4, {"max_tokens": 50, "stop": ["The end"]}),  # cut inside "The end"
    ("café 東京 naïve ☕ ok", 4, {"max_tokens": 50}),  # cut inside a multi-byte character
    ("one two three four five six", 2, {"max_tokens": 5}),  # max_tokens counts the resumed tokens
    ("one two three four five six", 2, {"max_tokens": 50, "min_tokens": 4}),
])
def test_resumed_tracker_continues_as_if_never_interrupted(tokenizer, text, cut, params):
    """A replica that takes over after `cut` tokens (`resume`) emits exactly the rest of what one
    tracker fed every token would have: the same deltas, the same finish, the same counts."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    whole, deltas = _tracker(tokenizer, **params), []
    for t in tokens:
        deltas.append(whole.add(t).text)
        if whole.finish_reason:
            break
    assert len(deltas) > cut
    before = "".join(deltas[:cut])
    resumed = _tracker(tokenizer, **params)
    resumed.resume(tokens[:cut])
    after, reason = _feed(resumed, tokens[cut:])
    assert before + after == "".join(deltas)
    assert reason == whole.finish_reason and resumed.completion_tokens == whole.completion_tokens


def test_resume_only_before_any_token(tokenizer):
    tracker = _tracker(tokenizer, max_tokens=10)
    tracker.add(5)
    with pytest.raises(RuntimeError):
        tracker.resume([6, 7])
