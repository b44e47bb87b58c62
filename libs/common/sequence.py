"""Per-request token choice and output bookkeeping, shared by both phase roles.

`sample_token` turns one position's logits into a token under a request's SamplingParams
(penalties, logit bias, min_tokens, temperature, top-k, min-p, top-p, a per-request seed). `OutputTracker` keeps
the generated tokens, turns them into text deltas (never splitting a UTF-8 character or
leaking the start of a stop string) and decides when the request is finished.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from thunderserve.common.protocol import (
    MAX_LOGPROBS,
    PrefillRequest,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    Usage,
)


def _generator(seed: int, step: int) -> torch.Generator:
    # One generator per (seed, step): the same seed gives the same tokens whichever
    # replica draws a step, so a request can move between replicas and stay reproducible.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    step: int,
    eos_token_ids: frozenset[int],
    generated: Sequence[int] = (),
) -> int:
    """Choose the token at generation step `step` (0 = the first generated token); `generated`: the
    tokens generated before it (for the presence and frequency penalties)."""
    logits = logits.float()
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.logit_bias:
        logits = logits.clone()
        for token, bias in params.logit_bias.items():
            if 0 <= token < logits.shape[-1]:
                logits[token] += bias
    if step < params.min_tokens and not params.ignore_eos:
        logits = logits.clone()
        for token in eos_token_ids | set(params.stop_token_ids):
            if 0 <= token < logits.shape[-1]:
                logits[token] = float("-inf")
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    # The filters in vLLM's order of effect: top-k, then min-p, then top-p over what is left.
    if 0 < params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
        probs = probs / probs.sum()
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        cut = cumulative - sorted_probs > params.top_p
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    generator = _generator(params.seed, step) if params.seed is not None else None
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under the raw `logits`, and the `top` most likely tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = TokenLogprob(int(token), float(lp[token]))
    if top > 0:
        values, ids = torch.topk(lp, min(top, MAX_LOGPROBS, lp.shape[-1]))
        out.top = {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)}
    return out


def prompt_token_logprobs(prompt_logits: torch.Tensor, token_ids: Sequence[int], top: int,
                          rows_at_once: int = 256) -> list[TokenLogprob]:
    """Prompt tokens 1..n-1's log-probabilities under the raw logits of the positions before them
    (`prompt_logits[i]` scores `token_ids[i + 1]`), with `top` alternatives each; a few hundred rows at
    a time, so a long prompt's log-softmax never needs a second [n, vocab] tensor."""
    out: list[TokenLogprob] = []
    for start in range(0, len(token_ids) - 1, rows_at_once):
        lp = torch.log_softmax(prompt_logits[start:start + rows_at_once].float(), dim=-1)
        targets = torch.tensor(token_ids[start + 1:start + 1 + lp.shape[0]], dtype=torch.long)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        if top > 0:
            values, ids = torch.topk(lp, min(top, MAX_LOGPROBS, lp.shape[-1]), dim=-1)
            tops = [dict(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        else:
            tops = [{} for _ in range(lp.shape[0])]
        out += [TokenLogprob(t, c, top_row) for t, c, top_row in zip(targets.tolist(), chosen, tops, strict=True)]
    return out


@dataclass
class StepOutput:
    text: str  # new text to send (may be empty while a character or stop string is pending)
    finish_reason: str | None  # "stop" | "length" | None


@dataclass
class OutputTracker:
    """The generated side of one request."""

    params: SamplingParams
    prompt_len: int
    max_context: int
    eos_token_ids: frozenset[int]
    tokenizer: object
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the full decoded text so far (stop strings removed at the end)
    sent: int = 0  # characters of `text` already sent
    finish_reason: str | None = None

    def resume(self, token_ids: list[int]) -> None:
        """Take up a request another replica was generating: `token_ids` were generated and their
        text sent already. The state is what that replica's tracker had after them (the same
        text held back), so deltas, stops, min/max_tokens and sampling steps carry on."""
        if self.token_ids:
            raise RuntimeError("resume() comes before any token is added")
        if not token_ids:
            return
        self.token_ids = list(token_ids)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        self._flush(final=False)  # what was already sent, by the same rule

    def add(self, token: int) -> StepOutput:
        """Record the next generated token; returns the text to emit and whether it finished."""
        if self.finish_reason is not None:
            raise RuntimeError("request already finished")
        step = len(self.token_ids)
        is_eos = (token in self.eos_token_ids and not self.params.ignore_eos) or token in set(
            self.params.stop_token_ids
        )
        if is_eos and step >= self.params.min_tokens:
            self.token_ids.append(token)
            self.finish_reason = "stop"
            return StepOutput(self._flush(final=True), "stop")
        self.token_ids.append(token)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if self.params.stop and len(self.token_ids) >= self.params.min_tokens:
            hit = _first_stop(self.text, self.params.stop, self.sent)
            if hit is not None:
                self.text = self.text[:hit]
                self.finish_reason = "stop"
                return StepOutput(self._flush(final=True), "stop")
        if len(self.token_ids) >= self.params.max_tokens or self.prompt_len + len(self.token_ids) >= (
            self.max_context
        ):
            self.finish_reason = "length"
            return StepOutput(self._flush(final=True), "length")
        return StepOutput(self._flush(final=False), None)

    def _flush(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            # Hold back a trailing replacement char (half a UTF-8 sequence) and anything
            # that could still grow into a stop string.
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
            if self.params.stop:
                end = min(end, len(self.text) - _pending_stop_prefix(self.text, self.params.stop))
        end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def _first_stop(text: str, stops: list[str], sent: int) -> int | None:
    # A stop string can only newly appear in the unsent tail (plus an overlap).
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for s in stops if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _pending_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


def scores_prompt(request: PrefillRequest) -> bool:
    """Whether the prefill must keep every position's logits: the prompt's own log-probabilities are asked
    for, on the first attempt only (a resumed request's router has them already)."""
    return request.sampling.prompt_logprobs is not None and not request.resume_token_ids


def first_token_chunk(request: PrefillRequest, logits: torch.Tensor, prompt_logits: torch.Tensor | None,
                      engine) -> TokenChunk:
    """The chunk a finished prefill sends: the first token chosen from `logits` (the position after the
    prompt), with the prompt's log-probabilities when `scores_prompt`. Its `finish_reason` is set when it
    ends the request (EOS, a stop, max_tokens=1; max_tokens=0 scores the prompt and generates nothing).
    `engine` gives max_context, eos_token_ids and tokenizer."""
    resumed = request.resume_token_ids  # a request taken over from a dead replica: go on after these
    prompt_lps = prompt_token_logprobs(prompt_logits, request.prompt_token_ids,
                                       request.sampling.prompt_logprobs) if scores_prompt(request) else []
    if request.sampling.max_tokens == 0:  # scoring only: nothing to generate
        return TokenChunk(request.request_id, 0, [], "", "length", usage=Usage(len(request.prompt_token_ids), 0),
                          prompt_logprobs=prompt_lps)
    tracker = OutputTracker(request.sampling, len(request.prompt_token_ids), engine.max_context,
                            engine.eos_token_ids, engine.tokenizer)
    tracker.resume(resumed)
    step = tracker.completion_tokens  # also the chunk index: one token per chunk
    token = sample_token(logits, request.sampling, step, engine.eos_token_ids, resumed)
    out = tracker.add(token)
    chunk = TokenChunk(request.request_id, step, [token], out.text, out.finish_reason, prompt_logprobs=prompt_lps)
    if request.sampling.logprobs is not None:
        chunk.logprobs = [token_logprob(logits, token, request.sampling.logprobs)]
    if out.finish_reason is not None:
        chunk.usage = Usage(tracker.prompt_len, tracker.completion_tokens)
    return chunk
