"""The wire protocol: NATS subject names and msgpack-encoded message types.

Every message is a dataclass encoded as a msgpack map of its fields (nested dataclasses
become nested maps). Unknown fields from a newer peer are ignored, missing ones take the
field default, so services of neighbouring versions keep talking. Trace context travels in
NATS headers (see `tracing`), never in the payload.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message could not be decoded into the expected type."""


# --- subjects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subjects:
    """All subject names of one deployment, derived from its prefix."""

    prefix: str = "ts"

    def prefill(self, replica: str) -> str:
        return f"{self.prefix}.prefill.{replica}"

    def decode(self, replica: str) -> str:
        return f"{self.prefix}.decode.{replica}"

    def connect(self, replica: str) -> str:
        """Decode replica: set up a direct KV channel pair with a prefill replica."""
        return f"{self.prefix}.connect.{replica}"

    def control(self, replica: str) -> str:
        return f"{self.prefix}.control.{replica}"

    def tokens(self, router: str, request_id: str) -> str:
        return f"{self.prefix}.tokens.{router}.{request_id}"

    def tokens_wildcard(self, router: str) -> str:
        return f"{self.prefix}.tokens.{router}.*"

    def heartbeat(self, replica: str) -> str:
        return f"{self.prefix}.heartbeat.{replica}"

    @property
    def heartbeats(self) -> str:
        return f"{self.prefix}.heartbeat.*"

    @property
    def abort(self) -> str:
        return f"{self.prefix}.abort"

    @property
    def api_completions(self) -> str:
        """The router's NATS request entry used by the client SDK."""
        return f"{self.prefix}.api.completions"

    def api_replay(self, router: str) -> str:
        """One router's replay of a request's events (what the SDK missed in a NATS drop)."""
        return f"{self.prefix}.api.replay.{router}"

    @property
    def workload(self) -> str:
        return f"{self.prefix}.workload"

    @property
    def plan_bucket(self) -> str:
        return f"{self.prefix}-plan"


# --- messages ------------------------------------------------------------------------------


MAX_LOGPROBS = 20  # SamplingParams: alternatives per token at most (OpenAI's limit)
MAX_PENALTY = 2.0  # SamplingParams: presence/frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY] (OpenAI's range)
MAX_STOPS = 4  # SamplingParams: stop strings at most (OpenAI's limit)
SEED_RANGE = (-(1 << 63), 1 << 63)  # SamplingParams: a seed is a signed 64-bit integer, [lo, hi)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample among the k most likely tokens only (0 = all)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one's probability
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    # OpenAI's penalties over the tokens generated so far: each logit drops by
    # frequency_penalty * (times the token was generated) + presence_penalty * (whether it was)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: no log-probabilities; k >= 0: each generated token's, and its k most likely alternatives
    logprobs: int | None = None
    # None: none; k >= 0: every prompt token's after the first (what the model gave it, from the tokens
    # before it), and k alternatives; sent on the first chunk. With it, max_tokens may be 0.
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class PrefillRequest:
    """router -> prefill replica: compute this prompt's KV and hand it to `decode_replica`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_subject: str  # where the decode replica streams TokenChunks
    decode_replica: str
    decode_endpoint: str  # the decode replica's channel rendezvous, "host:port"
    kv_codec: str = ""  # "" = the prefill replica's default
    # A resumed request (its replica died): the tokens already generated and streamed. The model
    # sees prompt + these; they count as output (usage, max_tokens, stops), and chunk indices go on.
    resume_token_ids: list[int] = field(default_factory=list)


@dataclass
class KVHandoff:
    """prefill -> decode replica: a prefilled request whose KV follows on the direct channel."""

    request_id: str
    prefill_replica: str
    pair_id: str  # which channel pair the payload comes on
    tag: int  # the channel tag of the payload
    prompt_token_ids: list[int]
    first_token_id: int
    sampling: SamplingParams
    reply_subject: str
    kv_manifest: dict[str, Any]  # codec, layout, byte count (kvcodec.pack_cache) or a streamed head (pack_runs)
    first_chunk_sent: bool = False  # the prefill replica already streamed the first token
    resume_token_ids: list[int] = field(default_factory=list)  # as in PrefillRequest: the KV covers them
    first_logprob: TokenLogprob | None = None  # when asked for: the first token's, for decode to send
    # An early handoff, sent as the forward pass starts so the KV streams while it runs: the first
    # token (and first_chunk_sent, first_logprob) comes on the channel after the KV, as a `FirstToken`.
    first_token_later: bool = False


@dataclass
class FirstToken:
    """prefill -> decode replica, on the channel after an early handoff's KV (`KVHandoff.first_token_later`):
    the first token, or why none comes (the pass failed, or its first token ended the request; the prefill
    replica has told the client, so the decode replica drops the request without a word)."""

    request_id: str
    token_id: int = -1
    chunk_sent: bool = False
    logprob: TokenLogprob | None = None
    cancelled: str = ""


@dataclass
class ConnectRequest:
    """prefill -> decode replica: join a new channel pair (both sides then rendezvous)."""

    prefill_replica: str
    pair_id: str
    backend: str = "tcp"  # the channel transport both sides use (kvchannel.BACKENDS)


@dataclass
class ConnectReply:
    ok: bool
    error: str = ""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before penalties, biases or
    temperature), and the `k` most likely tokens at that step."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class TokenChunk:
    """decode (or prefill, on failure) -> router: the next tokens of a request, in order by `index`.

    `finish_reason` is set on the last chunk: "stop", "length", "abort" or "error" (then
    `error` says why).
    """

    request_id: str
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str = ""
    retryable: bool = False  # an error of the replicas' (one died, the KV hop broke), not of the request
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when the request asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1..n-1, on chunk 0

    @classmethod
    def failure(cls, request_id: str, error: str, prompt_tokens: int, index: int = 0,
                completion_tokens: int = 0, retryable: bool = False) -> TokenChunk:
        """The last chunk of a request that failed."""
        return cls(request_id, index, finish_reason="error", usage=Usage(prompt_tokens, completion_tokens),
                   error=error, retryable=retryable)


@dataclass
class Abort:
    """router -> every replica: stop working on this request (client gone, or failed elsewhere)."""

    request_id: str
    reason: str = ""


@dataclass
class ControlCommand:
    """planner (or an operator) -> one replica: change what it does."""

    phase: str | None = None  # swap the phase role: "prefill" | "decode"


HEARTBEAT_INTERVAL_S = 0.5  # every replica heart-beats this often
# A replica this late is probed (`aio.replica_gone`): "no responders" on its control subject means its
# process is gone, long before a heartbeat timeout would say so.
PROBE_AFTER_S = 0.75
PROBE_TIMEOUT_S = 0.5


@dataclass
class Heartbeat:
    replica_id: str
    phase: str  # "prefill" | "decode"
    model: str
    endpoint: str = ""  # decode replicas: channel rendezvous "host:port"
    running: int = 0  # sequences in the decode batch / prompts being prefilled
    waiting: int = 0  # queued, not yet started
    capacity: int = 0  # max sequences the replica takes at once
    plan_epoch: int = 0
    state: str = "ready"  # "ready" | "draining" | "stopping"
    max_context: int = 0
    # This process and its NATS connection ("<process id>-<connections so far>"). A new session (a
    # reconnect, or a restarted process under the same id): what was sent to the replica before is
    # lost to it (NATS core keeps nothing for an absent subscriber).
    session: str = ""


@dataclass
class WorkloadReport:
    """router -> planner, every few seconds: what arrived and what finished since its last report.

    `prompt_lens[i]` and `output_lens[i]` belong to one finished request, so the planner sees the
    lengths paired as its cost model wants them; past `sampled_of` finished requests the pairs are a
    uniform sample (payloads stay small). `arrivals` counts every request the router admitted or
    turned away for want of a replica: that is the demand.
    """

    router_id: str
    period_s: float  # the span this report covers
    arrivals: int = 0
    prompt_lens: list[int] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)
    sampled_of: int = 0  # finished requests in the period (>= len(prompt_lens))


@dataclass
class CompletionRequest:
    """SDK -> router over NATS: the same fields the HTTP API takes, already validated by the SDK."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    model: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reply_subject: str = ""
    request_id: str = ""
    kv_codec: str | None = None  # override the deployment's KV codec for this request


@dataclass
class CompletionEvent:
    """router -> SDK: a chunk of text, or the end of the request (with usage), or an error.

    Events of a request are numbered from 0 (`index`), so the SDK sees a gap; the acceptance (status
    202) names the subject where the router replays them (`replay_subject`)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str = ""
    status: int = 200
    index: int = 0
    replay_subject: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1..n-1, on the first


@dataclass
class ReplayRequest:
    """SDK -> the request's router: send the request's events from `from_index` on again."""

    request_id: str
    from_index: int = 0


@dataclass
class ReplayReply:
    events: list[CompletionEvent] = field(default_factory=list)
    known: bool = True  # False: the router has no such request (finished too long ago, or never)


# --- encoding ------------------------------------------------------------------------------


def encode(message: Any) -> bytes:
    return msgpack.packb(_encoder(type(message))(message), use_bin_type=True)


def decode_or_warn(cls: type[T], data: bytes, log) -> T | None:
    """Decode, or log a warning and return None: a bad message must not kill a subscription."""
    try:
        return decode(cls, data)
    except ProtocolError as exc:
        log.warning("dropping an undecodable message: %s", exc)
        return None


def decode(cls: type[T], data: bytes) -> T:
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable {cls.__name__}: {exc}") from None
    return from_plain(cls, raw)


def from_plain(cls: type[T], raw: Any) -> T:
    """Build a dataclass from plain msgpack/JSON data, recursing into nested dataclasses."""
    try:
        return _decoder(cls)(raw)
    except ProtocolError:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


# Converters are built once per message class from its type hints: fields of plain types pass
# through untouched, so the hot path is a dict comprehension, not a walk over typing objects.

Converter = typing.Callable[[Any], Any] | None


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _plain_to(tp: Any) -> Converter:
    """A converter from plain data to `tp`, or None when the plain value already is one."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _decoder(tp)
    if origin is list:
        item = _plain_to(typing.get_args(tp)[0])
        return None if item is None else (lambda v: [item(x) for x in v])
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        val = _plain_to(val_t)
        key = int if key_t is int else None  # JSON-born maps have string keys
        if key is None and val is None:
            return None
        return lambda v: {(key(k) if key else k): (val(x) if val and x is not None else x) for k, x in v.items()}
    return None


@cache
def _decoder(cls: type) -> typing.Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    convs = [(f.name, _plain_to(hints[f.name])) for f in dataclasses.fields(cls)]
    names = {name for name, _ in convs}
    special = [(name, conv) for name, conv in convs if conv is not None]

    def build(raw: Any):
        if not isinstance(raw, dict):
            raise ProtocolError(f"{cls.__name__}: expected a map, got {type(raw).__name__}")
        kwargs = {k: v for k, v in raw.items() if k in names}
        for name, conv in special:
            value = kwargs.get(name)
            if value is not None:
                kwargs[name] = conv(value)
        return cls(**kwargs)

    return build


def _to_plain(tp: Any) -> Converter:
    """A converter from `tp` values to plain data, or None when they are plain already."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _encoder(tp)
    if origin is list:
        item = _to_plain(typing.get_args(tp)[0])
        return None if item is None else (lambda v: [item(x) for x in v])
    if origin is dict:
        val = _to_plain(typing.get_args(tp)[1])
        return None if val is None else (lambda v: {k: val(x) for k, x in v.items()})
    return None


@cache
def _encoder(cls: type) -> typing.Callable[[Any], Any]:
    if not dataclasses.is_dataclass(cls):
        return lambda v: v  # already plain (a dict reply, say)
    hints = typing.get_type_hints(cls)
    convs = [(f.name, _to_plain(hints[f.name])) for f in dataclasses.fields(cls)]

    def plain(obj):
        out = {}
        for name, conv in convs:
            value = getattr(obj, name)
            out[name] = conv(value) if conv is not None and value is not None else value
        return out

    return plain
