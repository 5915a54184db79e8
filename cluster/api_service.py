"""ApiService: what both HTTP APIs share between parsing a request and rendering the answer.

Owns (per ingress replica): the tokenizer, the replica router and its in-flight counts, the
metrics, and the engine pool handle. Steps for a chat request:
    check_model -> encode_prompt (V4 chat format + tokenizer) -> new_tokens (context limit)
    -> sampling params per choice -> start (replica choice, n engine requests, admission).
"""

from __future__ import annotations

import functools
import secrets
import time

from actors.messages import GenerateRequest
from actors.sampling import SamplingParams, derive_seed
from cluster.config import RETIRED_MODEL_IDS, RETIRED_ON, ServeConfig
from cluster.errors import APIError, invalid
from cluster.generation import Generation, TokenInfo
from cluster.metrics import Metrics
from cluster.routing import ReplicaRouter, affinity_key
from model_shards.chat_format import ChatFormatError, encode_messages
from model_shards.tokenizer import ASSISTANT_TOKEN, THINK_END, ByteTokenizer, Tokenizer, BYTE_OFFSET


class ApiService:
    def __init__(self, config: ServeConfig, tokenizer: Tokenizer, pool, max_model_len: int,
                 metrics: Metrics | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.pool = pool
        self.max_model_len = max_model_len
        self.metrics = metrics or Metrics()
        self.router = ReplicaRouter(pool.num_replicas)
        self.created = int(time.time())
        self.think_end_id = tokenizer.token_to_id(THINK_END)
        self.assistant_id = tokenizer.token_to_id(ASSISTANT_TOKEN)

    # ---- checks ------------------------------------------------------------------------------
    def check_api_key(self, headers) -> None:
        key = self.config.api_key
        if key is None:
            return
        auth = headers.get("authorization") or ""
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        given = given or headers.get("x-api-key")
        if not given:
            raise APIError(401, "Authentication failed: no API key given (send 'Authorization: Bearer "
                                "<key>' or 'x-api-key: <key>')", code="invalid_api_key")
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Authentication failed: the API key is invalid", code="invalid_api_key")

    def check_model(self, model: str) -> str:
        if model in self.config.served_model_names:
            return model
        served = ", ".join(self.config.served_model_names)
        if model in RETIRED_MODEL_IDS:
            raise APIError(404, f"The model '{model}' was retired on {RETIRED_ON}. Use one of the "
                                f"DeepSeek-V4 models: {served}.", "model", "model_not_found")
        raise APIError(404, f"The model '{model}' does not exist. Available models: {served}.",
                       "model", "model_not_found")

    # ---- prompt ------------------------------------------------------------------------------
    def encode_prompt(self, messages: list, *, is_thinking: bool, reasoning_effort: str | None,
                      tools: list | None, response_format) -> tuple[str, list[int]]:
        if len(messages) > self.config.max_messages:
            raise invalid(f"'messages' has {len(messages)} items; at most {self.config.max_messages} "
                          "are allowed", "messages")
        try:
            text = encode_messages(messages, thinking=is_thinking, reasoning_effort=reasoning_effort,
                                   tools=tools, response_format=response_format)
        except ChatFormatError as e:
            raise invalid(str(e), "messages") from e
        return text, self.tokenizer.encode(text)

    def new_tokens(self, num_prompt_tokens: int, requested: int | None, param: str = "max_tokens") -> int:
        limit = self.max_model_len
        if num_prompt_tokens >= limit or (requested is not None and num_prompt_tokens + requested > limit):
            asked = num_prompt_tokens + (requested or 0)
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {asked} tokens ({num_prompt_tokens} in the messages, "
                                f"{requested or 0} in the completion). Please reduce the length of the "
                                "messages or the completion.", param or "messages", "context_length_exceeded")
        if requested is not None:
            return requested
        return max(1, min(self.config.default_max_tokens, limit - num_prompt_tokens))

    def forced_token_ids(self, body) -> tuple[int, ...] | None:
        """Test hooks: `dsv4_forced_completion` (text; EOS is appended) or `dsv4_forced_token_ids`
        (raw ids, e.g. an out-of-vocabulary id to make the engine step fail)."""
        text, ids = body.str("dsv4_forced_completion"), body.list("dsv4_forced_token_ids")
        if text is None and ids is None:
            return None
        if not self.config.is_test_hooks_enabled:
            raise invalid("'dsv4_forced_completion' / 'dsv4_forced_token_ids' are test hooks, disabled on "
                          "this server", "dsv4_forced_completion")
        if ids is not None:
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise invalid("'dsv4_forced_token_ids' must be token ids", "dsv4_forced_token_ids")
            return tuple(ids)
        return tuple(self.tokenizer.encode(text)) + (self.tokenizer.eos_id,)

    def sampling(self, *, n: int, is_thinking: bool, **kw) -> list[SamplingParams]:
        if is_thinking and self.config.thinking_ignores_sampling and kw.get("forced_token_ids") is None:
            kw.update(temperature=1.0, top_p=1.0, top_k=0)  # DeepSeek: no effect in thinking mode
        seed = kw.pop("seed", None)
        if seed is None and n > 1:
            seed = derive_seed(None)
        params = [SamplingParams(seed=derive_seed(seed, i) if seed is not None else None, **kw) for i in range(n)]
        try:
            for p in params:
                p.validate()
        except ValueError as e:
            raise invalid(str(e)) from e
        return params

    # ---- generation --------------------------------------------------------------------------
    async def start(self, prompt_token_ids: list[int], params: list[SamplingParams], *, is_thinking: bool,
                    cache_salt: str = "", affinity: str | None = None) -> Generation:
        key = affinity_key(prompt_token_ids, self.assistant_id, self.config.affinity_tokens, affinity)
        replica = self.router.pick(key)
        base_id = secrets.token_hex(8)
        now = time.time()
        requests = [GenerateRequest(f"{base_id}-{i}", list(prompt_token_ids), p, cache_salt, now)
                    for i, p in enumerate(params)]
        self.router.started(replica, len(requests))
        try:
            gen = await Generation.start(self.pool, replica, requests, is_thinking=is_thinking,
                                         think_end_id=self.think_end_id, token_info=self.token_info,
                                         on_tokens=self.metrics.on_tokens)
        except BaseException:
            self.router.finished(replica, len(requests))
            raise
        self.metrics.on_admitted(gen.usage.num_prompt_tokens, gen.usage.num_cached_tokens)
        gen.on_close = lambda: self.router.finished(replica, len(requests))
        return gen

    def count_tokens(self, messages: list, **kw) -> int:
        return len(self.encode_prompt(messages, **kw)[1])

    @functools.lru_cache(maxsize=65536)
    def _token_text(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        tok = self.tokenizer
        if isinstance(tok, ByteTokenizer) and BYTE_OFFSET <= token_id < BYTE_OFFSET + 256:
            b = token_id - BYTE_OFFSET
            return bytes([b]).decode("utf-8", errors="replace"), (b,)
        text = tok.decode([token_id])
        return text, tuple(text.encode("utf-8"))

    def token_info(self, token_id: int, logprob: float, top) -> TokenInfo:
        text, raw = self._token_text(token_id)
        alts = []
        for tid, lp in top or []:
            t, r = self._token_text(tid)
            alts.append(TokenInfo(t, list(r), lp))
        return TokenInfo(text, list(raw), logprob, alts)
