"""The model engine shared by both phase roles: prefill, and a continuous decode batch.

One `Engine` per replica process holds the weights once. `prefill` runs a prompt and returns
its per-layer KV cache and the last position's logits. `DecodeBatch` keeps the KV of many
sequences in one left-padded cache so a single forward pass advances all of them by one
token; sequences join and leave between steps. Not thread-safe: one thread drives it.

The weights, the caches and the forward passes live on the engine's `device` (`--device`: `cpu`, or
`cuda` on a GPU host); what leaves the engine for the host's code is on the CPU: logits (sampling runs
there) and the rebuilt first layer (the KV codec runs there). The same lines run on both, so the CPU
tests exercise the GPU path's logic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from thunderserve.common.models import check_device, load_model, resolve_model

log = logging.getLogger(__name__)

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [1, kv_heads, seq, head_dim] each

ATTENTION = "thunderserve"


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention for both phases: on the CPU computed in float32, on a GPU by torch's SDPA as it is.

    On the CPU, prefill (many query positions) runs torch's SDPA. A decode step (one query position per
    sequence) is two small batched matmuls: SDPA's CPU flash kernel is tiled for long queries and
    took ~2x as long here. Reduced-precision models keep their matmuls in bf16/fp16 and their
    attention in fp32: on CPUs torch's bf16 attention kernel is ~2.5x slower than its fp32 one.
    On a GPU, SDPA's fused kernels take both phases in the model's own dtype.
    """
    if query.is_cuda:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if query.shape[2] != 1:
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              scaling=scaling, **kwargs)
        return out.to(query.dtype), weights
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads  # grouped-query attention: each KV head serves `groups` query heads
    q = query.float().reshape(batch * kv_heads, groups, dim)
    k = key.float().reshape(batch * kv_heads, length, dim)
    v = value.float().reshape(batch * kv_heads, length, dim)
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # [batch, 1, 1, length]: True (or 0.0) where a position is real
        scores = scores.view(batch, kv_heads, groups, length)
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask[:, :, -1:, -length:], float("-inf"))
        else:
            scores.add_(attention_mask[:, :, -1:, -length:].float())
        scores = scores.view(batch * kv_heads, groups, length)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)  # [batch * kv_heads, groups, dim]
    return out.view(batch, heads, 1, dim).transpose(1, 2).to(query.dtype), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    # Without a mask function of its own, transformers passes no padding mask to a custom
    # attention, and the decode batch's left padding would be attended to.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class _FirstLayerDone(Exception):
    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__("first layer's KV computed")
        self.kv = (key, value)


class _FirstLayerCache(DynamicCache):
    """A cache that ends the forward pass at the first layer's update: by then the model has
    computed that layer's keys and values (RoPE included) exactly as a prefill does."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise _FirstLayerDone(key_states, value_states)


@torch.inference_mode()
def first_layer_kv(model, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first layer's (key, value) [1, kv_heads, n, head_dim] for a prompt, as its prefill
    computes them. That layer's KV is a function of the tokens alone (no attention before it),
    so the decode side can rebuild it from the token ids instead of receiving it
    (`kvcodec.pack_cache(..., rebuild=True)`); it costs that layer's three projections per token."""
    if not token_ids:
        raise ValueError("empty prompt")
    try:
        model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long, device=model.device),
              cache=_FirstLayerCache(config=model.config), use_cache=True, logits_to_keep=1)
    except _FirstLayerDone as done:
        return done.kv
    raise RuntimeError("the model's forward pass never updated its cache")


LayerHook = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, key, value), as a pass computes it


class _ReportingCache(DynamicCache):
    """A cache that hands each layer's KV to `on_layer` as soon as the forward pass has stored it (a
    prefill stores each layer once: what it hands over is final)."""

    def __init__(self, on_layer: LayerHook, **kwargs):
        super().__init__(**kwargs)
        self.on_layer = on_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        self.on_layer(layer_idx, layer.keys, layer.values)
        return out


@dataclass
class PrefillResult:
    kv: KVLayers  # on the engine's device
    logits: torch.Tensor  # [vocab], fp32, on the CPU, for the token after the prompt
    prompt_logits: torch.Tensor | None = None  # [n - 1, vocab], CPU: row i scores prompt token i + 1 (if asked)


class Engine:
    """A HuggingFace causal LM, loaded once, with the two operations the phases need."""

    def __init__(self, model: str = "smollm2", dtype: str = "float32", threads: int = 0, device: str = "cpu"):
        self.info = resolve_model(model)
        self.device = check_device(device)
        _register_attention()
        self.model, self.tokenizer = load_model(model, dtype=dtype, attn_implementation=ATTENTION, device=self.device)
        self.config = self.model.config
        self.dtype = getattr(torch, dtype)
        # The decode batch's KV is in the dtype attention computes in (no per-step cast of the cache): fp32
        # on the CPU, the model's own on a GPU (`_attention`).
        self.kv_dtype = self.dtype if self.device.type == "cuda" else torch.float32
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(i for i in ids if i is not None)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def prefill(self, token_ids: list[int], prompt_logits: bool = False,
                on_layer: LayerHook | None = None) -> PrefillResult:
        """The prompt's KV and the logits for the token after it (`prompt_logits`: every position's too).
        `on_layer(i, key, value)` is called with each layer's KV as soon as the pass has it (before the
        pass ends), on this thread: the same tensors the result holds."""
        cache = None if on_layer is None else _ReportingCache(on_layer, config=self.config)
        result = self.start_prefill(token_ids, prompt_logits, cache).advance(len(token_ids))
        assert result is not None  # one pass over the whole prompt
        return result

    def start_prefill(self, token_ids: list[int], prompt_logits: bool = False,
                      cache: DynamicCache | None = None) -> ChunkedPrefill:
        """A prefill to run a chunk at a time (`ChunkedPrefill.advance`)."""
        return ChunkedPrefill(self, token_ids, prompt_logits, cache)

    rebuilds_first_layer = True  # `first_layer_kv` works for any model that fills a transformers cache

    def first_layer_kv(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's KV of `token_ids`, in the cache's dtype, on the CPU for the KV codec (see
        `first_layer_kv`)."""
        key, value = first_layer_kv(self.model, token_ids)
        return key.to("cpu", self.kv_dtype), value.to("cpu", self.kv_dtype)

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(self)


class ChunkedPrefill:
    """A prompt's prefill, run a chunk of tokens at a time into one cache.

    A colocated replica runs decode steps between the chunks, so a long prompt delays the running
    sequences by one chunk's pass rather than its whole prefill (vLLM's chunked prefill, without
    fusing a chunk and a decode step into one pass). Each chunk attends to the cache of the ones
    before it; positions follow on from the cache's length.
    """

    def __init__(self, engine: Engine, token_ids: list[int], prompt_logits: bool = False,
                 cache: DynamicCache | None = None):
        if not token_ids:
            raise ValueError("empty prompt")
        self.engine, self.token_ids, self.prompt_logits = engine, list(token_ids), prompt_logits
        self.done = 0  # tokens whose KV is in the cache
        self._cache = cache if cache is not None else DynamicCache(config=engine.config)
        self._rows: list[torch.Tensor] = []  # each chunk's logits, if every position's are asked for

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done

    @torch.inference_mode()
    def advance(self, max_tokens: int) -> PrefillResult | None:
        """Run the next chunk of at most `max_tokens` (at least one) tokens; the result once the last is in."""
        if not self.remaining:
            raise RuntimeError("the prefill is already done")
        n = min(max(1, max_tokens), self.remaining)
        chunk = torch.tensor([self.token_ids[self.done:self.done + n]], dtype=torch.long, device=self.engine.device)
        out = self.engine.model(input_ids=chunk, cache=self._cache, use_cache=True,
                                logits_to_keep=0 if self.prompt_logits else 1)
        self._cache = out.cache
        self.done += n
        if self.prompt_logits:
            self._rows.append(out.logits[0].cpu())
        if self.remaining:
            return None
        kv = [(layer.keys, layer.values) for layer in self._cache.layers]
        if not self.prompt_logits:
            return PrefillResult(kv=kv, logits=out.logits[0, -1].float().cpu())
        rows = torch.cat(self._rows)
        return PrefillResult(kv=kv, logits=rows[-1].float(), prompt_logits=rows[:-1])


@dataclass
class _Slot:
    seq_id: str
    length: int  # tokens whose KV is in the cache
    next_token: int  # the token to feed at the next step


class DecodeBatch:
    """Many sequences advanced together, one token per step.

    The cache is left-padded: row i holds its `length` real positions right-aligned, padded
    positions are masked out. Each row's next token gets its own position id, so RoPE sees
    the true positions and the output matches decoding the sequence alone.
    """

    # Columns reserved past the current width, so most steps append in place.
    HEADROOM = 64

    def __init__(self, engine: Engine):
        self.engine = engine
        self.slots: list[_Slot] = []
        self.keys: list[torch.Tensor] = []  # per layer [B, H, T, D]
        self.values: list[torch.Tensor] = []
        self.device = engine.device
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T]: 1 = real position
        # Preallocated storage that self.keys/values are views of, while `_slabs_valid`.
        self._slab_k: list[torch.Tensor] = []
        self._slab_v: list[torch.Tensor] = []
        self._slabs_valid = False

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def seq_ids(self) -> list[str]:
        return [s.seq_id for s in self.slots]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def add(self, seq_id: str, kv: KVLayers, next_token: int) -> None:
        """Join a sequence whose KV covers its prompt (on any device: a received one is on the CPU);
        `next_token` is fed at the next step."""
        if any(s.seq_id == seq_id for s in self.slots):
            raise ValueError(f"sequence {seq_id} is already in the batch")
        length = kv[0][0].shape[2]
        dtype, device = self.engine.kv_dtype, self.device
        if not self.slots:
            self.keys = [k.to(device, dtype) for k, _ in kv]
            self.values = [v.to(device, dtype) for _, v in kv]
            self.mask = torch.ones(1, length, dtype=torch.long, device=device)
        else:
            width = max(self.width, length)
            self._pad_left(width - self.width)
            pad = width - length
            self.keys = [torch.cat([k, _left_pad(nk.to(device, dtype), pad)]) for k, (nk, _) in zip(self.keys, kv)]
            self.values = [torch.cat([v, _left_pad(nv.to(device, dtype), pad)]) for v, (_, nv) in zip(self.values, kv)]
            row = F.pad(torch.ones(length, dtype=torch.long, device=device), (pad, 0))
            self.mask = torch.cat([self.mask, row[None]])
        self.slots.append(_Slot(seq_id, length, next_token))
        self._slabs_valid = False

    def remove(self, seq_id: str) -> bool:
        idx = next((i for i, s in enumerate(self.slots) if s.seq_id == seq_id), None)
        if idx is None:
            return False
        del self.slots[idx]
        self._slabs_valid = False
        keep = torch.tensor([i for i in range(self.mask.shape[0]) if i != idx], dtype=torch.long, device=self.device)
        if not self.slots:
            self.keys, self.values = [], []
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            return True
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.mask = self.mask.index_select(0, keep)
        # Drop leading columns that every remaining row pads.
        trim = self.width - max(s.length for s in self.slots)
        if trim > 0:
            self.keys = [k[:, :, trim:] for k in self.keys]
            self.values = [v[:, :, trim:] for v in self.values]
            self.mask = self.mask[:, trim:]
        return True

    def set_next_token(self, seq_id: str, token: int) -> None:
        for s in self.slots:
            if s.seq_id == seq_id:
                s.next_token = token
                return
        raise KeyError(seq_id)

    def _pad_left(self, pad: int) -> None:
        if pad <= 0:
            return
        self.keys = [_left_pad(k, pad) for k in self.keys]
        self.values = [_left_pad(v, pad) for v in self.values]
        self.mask = F.pad(self.mask, (pad, 0))
        self._slabs_valid = False

    def _ensure_room(self) -> None:
        """Make keys/values views of slabs with room for the next token (copying only when needed)."""
        width = self.width
        if self._slabs_valid and width < self._slab_k[0].shape[2]:
            return
        capacity = width + self.HEADROOM
        batch, heads, _, dim = self.keys[0].shape
        self._slab_k, self._slab_v = [], []
        for k, v in zip(self.keys, self.values):
            slab_k = torch.empty(batch, heads, capacity, dim, dtype=k.dtype, device=k.device)
            slab_v = torch.empty(batch, heads, capacity, dim, dtype=v.dtype, device=v.device)
            slab_k[:, :, :width] = k
            slab_v[:, :, :width] = v
            self._slab_k.append(slab_k)
            self._slab_v.append(slab_v)
        self.keys = [s[:, :, :width] for s in self._slab_k]
        self.values = [s[:, :, :width] for s in self._slab_v]
        self._slabs_valid = True

    @torch.inference_mode()
    def step(self) -> dict[str, torch.Tensor]:
        """Feed every sequence its next token; returns each sequence's logits for the token after."""
        if not self.slots:
            return {}
        model = self.engine.model
        input_ids = torch.tensor([[s.next_token] for s in self.slots], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([[s.length] for s in self.slots], dtype=torch.long, device=self.device)
        self._ensure_room()
        cache = DynamicCache(config=self.engine.config)
        cache.layers = [_SlabLayer(k, v, self.width) for k, v in zip(self._slab_k, self._slab_v)]
        mask = F.pad(self.mask, (0, 1), value=1)
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            cache=cache,
            use_cache=True,
        )
        self.keys = [layer.keys for layer in out.cache.layers]
        self.values = [layer.values for layer in out.cache.layers]
        self.mask = mask
        for s in self.slots:
            s.length += 1
        logits = out.logits[:, -1].float().cpu()  # one copy per step; sampling runs on the host
        return {s.seq_id: logits[i] for i, s in enumerate(self.slots)}


class _SlabLayer(DynamicLayer):
    """A cache layer that appends into preallocated storage: one column copied per token,
    where the default layer re-concatenates the whole cache every step."""

    def __init__(self, slab_k: torch.Tensor, slab_v: torch.Tensor, width: int):
        super().__init__()
        self.slab_k, self.slab_v, self.width = slab_k, slab_v, width
        self.keys, self.values = slab_k[:, :, :width], slab_v[:, :, :width]
        self.dtype, self.device = slab_k.dtype, slab_k.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.width + key_states.shape[-2]
        if end > self.slab_k.shape[2]:
            raise RuntimeError("decode batch slab overflow")  # _ensure_room reserves the room
        self.slab_k[:, :, self.width : end] = key_states
        self.slab_v[:, :, self.width : end] = value_states
        self.width = end
        self.keys, self.values = self.slab_k[:, :, :end], self.slab_v[:, :, :end]
        return self.keys, self.values


class MockEngine:
    """An engine without a model, for running and measuring the system around it.

    Prefill returns a tiny KV cache; every decode step returns at once. The next token is a
    deterministic function of the sequence so far, never EOS, so outputs are reproducible.
    """

    MOCK_LAYERS, MOCK_HEAD_DIM = 2, 8

    def __init__(self, model: str = "mocker", dtype: str = "float32", threads: int = 0, device: str = "cpu"):
        from thunderserve.common.models import load_tokenizer

        self.info = resolve_model(model)
        self.device = torch.device("cpu")  # no model: nothing to place (`device` is taken and ignored)
        self.tokenizer = load_tokenizer(str(self.info.path))
        self.dtype = torch.float32
        self.max_context = 8192
        self.eos_token_ids = frozenset({self.tokenizer.eos_token_id})
        self.vocab = len(self.tokenizer)
        # Ordinary word tokens to cycle through (ids well past the special tokens).
        words = self.tokenizer.encode(" the quick brown fox jumps over a lazy dog")
        # Peaked logits: every sampler (greedy or not) picks the intended word.
        self._logits = []
        for token in words:
            logits = torch.full((self.vocab,), -100.0)
            logits[token] = 100.0
            self._logits.append(logits)

    @property
    def name(self) -> str:
        return self.info.name

    def logits_for(self, position: int) -> torch.Tensor:
        return self._logits[position % len(self._logits)]

    @property
    def num_layers(self) -> int:
        return self.MOCK_LAYERS

    def prefill(self, token_ids: list[int], prompt_logits: bool = False,
                on_layer: LayerHook | None = None) -> PrefillResult:
        if not token_ids:
            raise ValueError("empty prompt")
        shape = (1, 1, len(token_ids), self.MOCK_HEAD_DIM)
        kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.MOCK_LAYERS)]
        for i, (key, value) in enumerate(kv if on_layer is not None else ()):
            on_layer(i, key, value)
        rows = torch.stack([self.logits_for(i) for i in range(1, len(token_ids))]) if prompt_logits else None
        return PrefillResult(kv=kv, logits=self.logits_for(len(token_ids)), prompt_logits=rows)

    def start_prefill(self, token_ids: list[int], prompt_logits: bool = False, cache=None) -> MockChunkedPrefill:
        return MockChunkedPrefill(self, token_ids, prompt_logits)

    rebuilds_first_layer = False  # its KV is not a function of the tokens

    def first_layer_kv(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("the mock engine cannot rebuild a layer of its KV")

    def new_batch(self) -> MockBatch:
        return MockBatch(self)


class MockChunkedPrefill:
    """`ChunkedPrefill` for the mock engine: counts the chunks, computes nothing."""

    def __init__(self, engine: MockEngine, token_ids: list[int], prompt_logits: bool = False):
        if not token_ids:
            raise ValueError("empty prompt")
        self.engine, self.token_ids, self.prompt_logits, self.done = engine, list(token_ids), prompt_logits, 0

    @property
    def remaining(self) -> int:
        return len(self.token_ids) - self.done

    def advance(self, max_tokens: int) -> PrefillResult | None:
        if not self.remaining:
            raise RuntimeError("the prefill is already done")
        self.done += min(max(1, max_tokens), self.remaining)
        return None if self.remaining else self.engine.prefill(self.token_ids, self.prompt_logits)


class MockBatch:
    """The DecodeBatch interface with no computation."""

    def __init__(self, engine: MockEngine):
        self.engine = engine
        self.lengths: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def seq_ids(self) -> list[str]:
        return list(self.lengths)

    def add(self, seq_id: str, kv: KVLayers, next_token: int) -> None:
        self.lengths[seq_id] = kv[0][0].shape[2]

    def remove(self, seq_id: str) -> bool:
        return self.lengths.pop(seq_id, None) is not None

    def set_next_token(self, seq_id: str, token: int) -> None:
        if seq_id not in self.lengths:
            raise KeyError(seq_id)

    def step(self) -> dict[str, torch.Tensor]:
        out = {}
        for seq_id in self.lengths:
            self.lengths[seq_id] += 1
            out[seq_id] = self.engine.logits_for(self.lengths[seq_id])
        return out


def create_engine(model: str, dtype: str = "float32", threads: int = 0, device: str = "cpu") -> Engine | MockEngine:
    """The engine for `model` on `device`: the mock one for "mocker", a real model otherwise."""
    if threads > 0:
        # Replicas share a host's cores: more torch threads than cores makes OpenMP spin
        # against other processes and turns millisecond ops into tens of milliseconds.
        torch.set_num_threads(threads)
    if model.lower() == "mocker":
        return MockEngine(model, dtype, threads, device)
    return Engine(model, dtype, threads, device)


def _left_pad(t: torch.Tensor, pad: int) -> torch.Tensor:
    if pad <= 0:
        return t
    return F.pad(t, (0, 0, pad, 0))
