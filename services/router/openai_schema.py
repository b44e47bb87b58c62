"""OpenAI-compatible request bodies (validated at the HTTP edge) and response builders."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from thunderserve.common.protocol import MAX_LOGPROBS, MAX_PENALTY, SamplingParams, TokenLogprob, Usage


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


MAX_CHOICES = 16  # n at most
MAX_PROMPTS = 64  # prompts in one completions request at most
MAX_CHOICES_IN_ALL = 128  # prompts x n at most

# Known OpenAI (and vLLM) parameters, each with the values this server honours and what it says to
# the others: a 400, never a parameter silently ignored.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (lambda v: v in (None, 1), "only best_of=1 is supported"),
    "suffix": (lambda v: not v, "suffix (insertion) is not supported"),
    "response_format": (lambda v: v is None or v.get("type", "text") == "text",
                        "only the text response_format is supported"),
    "tools": (lambda v: not v, "tool and function calling are not supported"),
    "functions": (lambda v: not v, "tool and function calling are not supported"),
    "tool_choice": (lambda v: v in (None, "none", "auto"),  # "auto" with no tools means none
                    "tool and function calling are not supported"),
    "repetition_penalty": (lambda v: v in (None, 1.0),
                           "repetition_penalty is not supported; use presence_penalty or frequency_penalty"),
}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] | None = None  # extension (vLLM's): -1, 0 or None = no limit
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # extension (vLLM's)
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # choices, each its own request to the replicas
    best_of: int | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | list[StrictStr] | None = None
    # (its range: RouterCore.check_request; here only what JSON may hold: pydantic takes any size of int)
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM's)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    presence_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)] = 0.0
    user: str | None = None
    kv_codec: StrictStr | None = None  # extension: KV compression for this request
    # Refused unless at their defaults (_REFUSED)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    repetition_penalty: float | None = None

    @field_validator(*_REFUSED, check_fields=False)  # suffix: completions only
    @classmethod
    def _honoured(cls, value, info: ValidationInfo):
        honoured, message = _REFUSED[info.field_name]
        if not honoured(value):
            raise ValueError(message)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):  # (their count and content: RouterCore.check_request, for both entries)
        return [stop] if isinstance(stop, str) else list(stop or [])

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias):
        for key in bias or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return bias

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p,
            seed=self.seed,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(_Common):
    # One prompt (text or token ids) or several (a list of texts or of token-id lists): each gets `n` choices.
    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]]
    echo: StrictBool = False
    suffix: StrictStr | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # k alternatives per token

    @field_validator("prompt")
    @classmethod
    def _prompts_given(cls, prompt):
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("the prompt is empty")
            if isinstance(prompt[0], (str, list)) and len(prompt) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return prompt

    @model_validator(mode="after")
    def _choices_in_all(self):
        prompts = len(self.prompts())
        if prompts * self.n > MAX_CHOICES_IN_ALL:
            raise ValueError(f"{prompts} prompts x n={self.n} is more than {MAX_CHOICES_IN_ALL} choices in one request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text or its token ids."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        params.logprobs = self.logprobs
        if self.echo and (self.logprobs is not None or params.max_tokens == 0):
            params.prompt_logprobs = self.logprobs or 0  # (max_tokens 0: the prompt is scored, not shown)
        return params


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        # the models served take text: an image or audio part dropped in silence would be answered blind
        for part in content if isinstance(content, list) else ():
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r} is not supported: this server's models "
                                 "take text only")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs its 'text', a string")
        return content

    def text(self) -> str:
        if isinstance(self.content, list):  # text parts (the validator refuses any other)
            return "".join(p["text"] for p in self.content)
        return self.content or ""


ChatMessages = Annotated[list[ChatMessage], Field(min_length=1)]  # a chat request's messages, at least one


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them (OpenAI's "developer" role is a system message)."""
    role = {"developer": "system"}
    return [{"role": role.get(m.role, m.role), "content": m.text()} for m in messages]


class ChatBody(_Common):
    messages: ChatMessages
    max_completion_tokens: int | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        if self.max_tokens is None and self.max_completion_tokens is not None:
            params.max_tokens = self.max_completion_tokens
        params.logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return params

    def chat(self) -> list[dict[str, str]]:
        return chat_messages(self.messages)


class TokenizeBody(BaseModel):
    """/tokenize: exactly one of a prompt (as /v1/completions takes it) or chat messages."""

    model_config = ConfigDict(extra="ignore")

    prompt: StrictStr | None = None
    messages: ChatMessages | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def chat(self) -> list[dict[str, str]]:
        return chat_messages(self.messages or [])


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[int]


# --- responses -----------------------------------------------------------------------------


def usage_dict(usage: Usage | None) -> dict:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def validation_message(errors: list[dict], root: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's `errors`, with the field named from `root` on (a request
    body's own "body" left out): what the HTTP API and the SDK's entry say about a bad field."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in (*root, *first.get("loc", ())) if p != "body"]
    param = ".".join(loc) or None
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):  # JSON, but no object
        return "the request body must be a JSON object", None
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        if param is None:  # the body itself is missing
            return "the request has no body; send a JSON object", None
        return f"missing required field '{param}'", param
    return (f"invalid '{param}': {msg}" if param else msg), param


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ResponseBuilder:
    """Builds the OpenAI response objects of one request (completion or chat). With `tokenizer`,
    log-probabilities are rendered with each token's text (OpenAI's shapes for either endpoint)."""

    def __init__(self, request_id: str, model: str, chat: bool, tokenizer=None,
                 echo: list[tuple[str, list[int]]] | None = None):
        """`echo`: per completion choice, (prompt text, prompt token ids) to put before it."""
        self.echo = echo
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.chat = chat
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions' text_offset: characters of token text so far, per choice

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def logprobs(self, items: list[TokenLogprob] | None, index: int = 0) -> dict | None:
        """OpenAI's `logprobs` object for these tokens of choice `index` (None when none were asked for)."""
        if not items:
            return None
        if self.chat:
            def entry(token_id: int, lp: float) -> dict:
                text = self._token(token_id)
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}

            return {"content": [{**entry(it.token_id, it.logprob),
                                 "top_logprobs": [entry(t, lp) for t, lp in it.top.items()]} for it in items]}
        tokens = [self._token(it.token_id) for it in items]
        offsets = []
        for text in tokens:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(text)
        return {"tokens": tokens, "token_logprobs": [it.logprob for it in items],
                "top_logprobs": [{self._token(t): lp for t, lp in it.top.items()} for it in items],
                "text_offset": offsets}

    def prompt_logprobs(self, items: list[TokenLogprob], index: int = 0) -> dict:
        """The echoed prompt's part of choice `index`'s `logprobs`: its first token has none."""
        tokens = [self._token(t) for t in self.echo[index][1]]
        offsets = []
        for text in tokens:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(text)
        return {"tokens": tokens, "token_logprobs": [None] + [it.logprob for it in items],
                "top_logprobs": [None] + [{self._token(t): lp for t, lp in it.top.items()} for it in items],
                "text_offset": offsets}

    def echo_chunk(self, prompt_logprobs: list[TokenLogprob] | None, index: int = 0) -> dict:
        """The streamed chunk that echoes the prompt, before a completion choice's first tokens."""
        body = self.chunk(self.echo[index][0], None, index=index)
        if prompt_logprobs is not None:
            body["choices"][0]["logprobs"] = self.prompt_logprobs(prompt_logprobs, index)
        return body

    def full(self, choices: list[tuple[str, str | None, list[TokenLogprob]]], usage: Usage | None,
             prompt_logprobs: list[list[TokenLogprob] | None] | None = None) -> dict:
        """The whole response: one (text, finish_reason, logprobs) per choice, in index order; with echo,
        each choice starts with its prompt (and, given its `prompt_logprobs`, their log-probabilities)."""
        body = self._base("chat.completion" if self.chat else "text_completion")
        body["choices"] = []
        for index, (text, finish_reason, logprobs) in enumerate(choices):
            head = None
            if self.echo is not None:
                text = self.echo[index][0] + text
                if prompt_logprobs is not None and prompt_logprobs[index] is not None:
                    head = self.prompt_logprobs(prompt_logprobs[index], index)
            lp = self.logprobs(logprobs, index)
            if head is not None:
                lp = {key: head[key] + (lp or {}).get(key, []) for key in head}
            content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            body["choices"].append({"index": index, **content, "finish_reason": finish_reason, "logprobs": lp})
        body["usage"] = usage_dict(usage)
        return body

    def chunk(self, text: str, finish_reason: str | None, first: bool = False,
              logprobs: list[TokenLogprob] | None = None, index: int = 0) -> dict:
        """One streamed chunk of choice `index` (`first`: that choice's first chunk)."""
        lp = self.logprobs(logprobs, index)
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text:
                delta = {}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": lp}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": lp}
            body = self._base("text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, usage: Usage | None) -> dict:
        body = self._base("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = []
        body["usage"] = usage_dict(usage)
        return body
