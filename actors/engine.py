"""Engine: the scheduler's step loop around a ModelRunner, with streaming outputs per request.

Owns: every live sequence (its model state, sampler, output processor and output stream), the
Scheduler, the background step loop, and the engine counters. Runs inside one asyncio event
loop (a Serve replica's, or a test's): scheduling, admission, output processing and aborts all
happen on that loop's thread, so none of them needs a lock; the model step (and sampling and
state exports, which must see the state right after the step) runs on one worker thread, and
KV-cache lookups / commits on another.

    engine = Engine(runner, tokenizer, EngineConfig(...), prefix_cache)
    async for event in engine.generate(GenerateRequest(...)):
        ...   # Admitted | Rejected first, then TokenEvent(s); the last has finish_reason

Leaving the `async for` early (client went away, task cancelled) aborts the request: its
sequence leaves the scheduler at once and its state is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from actors.engine_output import FINISH_ABORT, FINISH_ERROR, FINISH_LENGTH, OutputProcessor
from actors.engine_prefix import NoPrefixCache, PrefixCache, PrefixHit
from actors.messages import Admitted, EngineStats, GenerateRequest, Rejected, TokenEvent
from actors.sampling import SamplingError, SeqSampler, TokenLogprob
from actors.scheduler import RUNNING, Scheduler, SchedulerConfig, SchedulerOutput, Sequence
from model_shards import SequenceState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64               # running sequences per step
    max_num_batched_tokens: int = 512    # token budget per step
    max_num_waiting: int = 256           # waiting queue bound (beyond: Rejected 429)
    max_model_len: int = 0               # prompt + output tokens; 0 = the model's max positions
    is_test_hooks_enabled: bool = False  # allow SamplingParams.forced_token_ids

    def validate(self) -> "EngineConfig":
        self.scheduler_config().validate()
        if not isinstance(self.max_model_len, int) or self.max_model_len < 0:
            raise ValueError(f"max_model_len must be an integer >= 0, got {self.max_model_len!r}")
        return self

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, self.max_num_waiting)


class _Stream:
    """Output buffer of one request: the step loop puts, the request's generator drains."""

    def __init__(self):
        self._pending: TokenEvent | None = None
        self._ready = asyncio.Event()

    def put(self, event: TokenEvent) -> None:
        self._pending = event if self._pending is None else self._pending.merge(event)
        self._ready.set()

    async def get(self) -> TokenEvent:
        """Everything produced since the last get, merged into one event (coalescing keeps the
        per-event transport cost off the per-token path when the consumer is slower)."""
        await self._ready.wait()
        self._ready.clear()
        event, self._pending = self._pending, None
        return event


@dataclass(eq=False)
class _SeqData:
    request: GenerateRequest
    state: SequenceState
    sampler: SeqSampler
    processor: OutputProcessor
    stream: _Stream
    committed_positions: set  # positions already handed to the KV cache
    tier: str | None = None   # KV tier that served the resume checkpoint


@dataclass
class _ChunkResult:
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    export: dict | None = None  # state export at the chunk's end (a checkpoint position)


class Engine:
    def __init__(self, runner, tokenizer, config: EngineConfig | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = (config or EngineConfig()).validate()
        self.cache: PrefixCache = prefix_cache or NoPrefixCache()
        model_len = int(getattr(runner.config, "max_position_embeddings", 0) or 0)
        self.max_model_len = self.config.max_model_len or model_len or (1 << 20)
        self.vocab_size = int(runner.config.vocab_size)
        self.scheduler = Scheduler(self.config.scheduler_config())
        self._seqs: dict[str, Sequence] = {}
        self._model_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._cache_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-kv")
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._is_closed = False
        self._error: str | None = None      # set when the step loop itself failed (not one step)
        self._is_runner_healthy = True      # last answer of runner.is_healthy() (check_health)
        self.counters = dict(num_steps=0, num_prompt_tokens=0, num_cached_tokens=0, num_computed_tokens=0,
                             num_generated_tokens=0, num_requests=0, num_rejected=0, num_aborted=0)
        self.step_seconds = 0.0

    # ---- public API --------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[Admitted | Rejected | TokenEvent]:
        self._ensure_started()
        rid = request.request_id
        rejection = self._check(request)
        if rejection is not None:
            self.counters["num_rejected"] += 1
            yield rejection
            return
        seq = None
        try:
            seq = await self._admit(request)
            if isinstance(seq, Rejected):
                self.counters["num_rejected"] += 1
                yield seq
                return
            data: _SeqData = seq.payload
            yield Admitted(rid, seq.num_prompt_tokens, seq.num_computed_tokens, data.tier)
            while True:
                event = await data.stream.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if isinstance(seq, Sequence) and self._seqs.get(rid) is seq:
                self._abort(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._abort(seq)
        return True

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           is_healthy=self.is_healthy(), cache=self.cache.stats(), step_seconds=self.step_seconds,
                           **self.counters)

    def prefill_progress(self, min_prompt_tokens: int = 2048) -> tuple[int, int]:
        """(prompt tokens computed, prompt tokens) summed over live sequences whose prompt has at
        least `min_prompt_tokens` tokens and is still being prefilled: an operator's progress bar.
        Safe to call from another thread (reads a snapshot; a racing change only skews one read)."""
        done = total = 0
        for seq in list(self._seqs.values()):
            if seq.num_prompt_tokens >= min_prompt_tokens and seq.is_prefill:
                done, total = done + seq.num_computed_tokens, total + seq.num_prompt_tokens
        return done, total

    def is_healthy(self) -> bool:
        """Cheap (no calls): the step loop runs and the runner was healthy when last checked."""
        if self._is_closed or self._error is not None:
            return False
        if self._loop_task is not None and self._loop_task.done():
            return False
        return self._is_runner_healthy

    async def check_health(self) -> bool:
        """Ask the runner (for expert shards: Ray calls, up to seconds) on a helper thread, so the
        event loop keeps streaming meanwhile."""
        try:
            self._is_runner_healthy = bool(await asyncio.to_thread(self.runner.is_healthy))
        except Exception:
            self._is_runner_healthy = False
        return self.is_healthy()

    async def close(self) -> None:
        self._is_closed = True
        for seq in list(self._seqs.values()):
            seq.payload.stream.put(self._final_event(seq, FINISH_ABORT, error="engine shutting down"))
            self._abort(seq)
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._model_pool.shutdown(wait=False, cancel_futures=True)
        self._cache_pool.shutdown(wait=True)
        self.cache.close()

    # ---- admission ----------------------------------------------------------------------------
    def _check(self, request: GenerateRequest) -> Rejected | None:
        rid, prompt = request.request_id, request.prompt_token_ids
        if self._is_closed or self._error is not None or (self._loop_task and self._loop_task.done()):
            return Rejected(rid, 503, "the engine is not available" + (f": {self._error}" if self._error else ""))
        if rid in self._seqs:
            return Rejected(rid, 400, f"duplicate request id {rid!r}")
        if not prompt:
            return Rejected(rid, 400, "the prompt is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in prompt):
            return Rejected(rid, 400, f"prompt token ids must be in [0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            return Rejected(rid, 400, f"the prompt has {len(prompt)} tokens; this model's maximum context "
                                      f"length is {self.max_model_len} tokens")
        try:
            request.sampling.validate()
        except SamplingError as e:
            return Rejected(rid, 400, str(e))
        if request.sampling.forced_token_ids is not None and not self.config.is_test_hooks_enabled:
            return Rejected(rid, 400, "forced completions are a test hook, disabled on this server")
        if self.scheduler.num_waiting >= self.config.max_num_waiting:
            return Rejected(rid, 429, "the server is busy: too many requests are waiting; retry later")
        return None

    def _new_state(self, hit: PrefixHit | None) -> SequenceState | None:
        """A state from the runner's state pool, filled from a cache hit if given (None when the
        hit failed its checks while loading: the caller recomputes). Runs on the model thread:
        the pool's buffers must not grow while a step is using them."""
        state = self.runner.new_state()
        if hit is not None and not hit.load_into(state):
            return None
        return state

    async def _admit(self, request: GenerateRequest) -> Sequence | Rejected:
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        state, num_cached, tier = None, 0, None
        if self.cache.is_enabled:
            try:
                hit = await asyncio.get_running_loop().run_in_executor(
                    self._cache_pool, self.cache.lookup, prompt, request.cache_salt, len(prompt) - 1)
                if hit.is_hit:
                    state = await asyncio.get_running_loop().run_in_executor(self._model_pool, self._new_state, hit)
                    if state is not None:
                        num_cached, tier = hit.num_tokens, hit.tier
                    else:
                        log.warning("KV hit for %s failed its checks while loading; recomputing", rid)
            except Exception:  # a broken cache costs a recompute, never a failed request
                log.exception("KV lookup failed for %s", rid)
        if state is None:
            state = await asyncio.get_running_loop().run_in_executor(self._model_pool, self._new_state, None)
        params = request.sampling
        max_new = min(params.max_tokens, self.max_model_len - len(prompt))
        data = _SeqData(request, state, SeqSampler(params, self.vocab_size),
                        OutputProcessor(self.tokenizer, params, max_new), _Stream(), set(), tier)
        seq = Sequence(rid, prompt, len(prompt), num_cached,
                       [p for p in self.cache.prompt_checkpoints(len(prompt)) if p > num_cached], payload=data)
        if rid in self._seqs:
            return Rejected(rid, 400, f"duplicate request id {rid!r}")
        if not self.scheduler.add(seq):
            return Rejected(rid, 429, "the server is busy: too many requests are waiting; retry later")
        self._seqs[rid] = seq
        self.counters["num_requests"] += 1
        self.counters["num_prompt_tokens"] += len(prompt)
        self.counters["num_cached_tokens"] += num_cached
        self._wake.set()
        return seq

    def _abort(self, seq: Sequence) -> None:
        self._seqs.pop(seq.seq_id, None)
        if self.scheduler.finish(seq.seq_id) is not None:
            self.counters["num_aborted"] += 1

    # ---- step loop ----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop())

    async def _run_loop(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in scheduling / output handling: fail loudly, stay unhealthy
            log.exception("engine step loop died")
            self._error = f"{type(e).__name__}: {e}"
            for seq in list(self._seqs.values()):
                seq.payload.stream.put(self._final_event(seq, FINISH_ERROR, self._error))
                self._abort(seq)

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._is_closed:
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                continue
            out = self.scheduler.schedule()
            if not out.chunks:  # cannot happen while sequences run; never spin if it does
                await asyncio.sleep(0.001)
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._model_pool, self._execute, out)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the model step failed: fail its sequences, keep serving the others
                log.exception("engine step failed")
                self._fail(out, f"{type(e).__name__}: {e}")
                continue
            self.step_seconds += time.perf_counter() - t0
            self.counters["num_steps"] += 1
            self.counters["num_computed_tokens"] += out.num_batched_tokens
            self._apply(out, results)

    def _execute(self, out: SchedulerOutput) -> list[_ChunkResult]:
        """Worker thread: one batched model step, then sampling and checkpoint exports."""
        chunks = out.chunks
        states = [c.seq.payload.state for c in chunks]
        token_ids = [torch.tensor(c.token_ids, dtype=torch.long) for c in chunks]
        logits = self.runner.step(states, token_ids, all_logits=False)
        results = []
        for c, row in zip(chunks, logits):
            r = _ChunkResult()
            if c.is_sampling:
                r.token_id, r.logprob = c.seq.payload.sampler.sample(row)
            end = c.start + c.num_new_tokens
            if self.cache.is_enabled and (end in c.seq.checkpoint_positions or
                                          (end > c.seq.num_prompt_tokens and self.cache.is_checkpoint(end))):
                r.export = c.seq.payload.state.export()
            results.append(r)
        return results

    def _apply(self, out: SchedulerOutput, results: list[_ChunkResult]) -> None:
        for chunk, r in zip(out.chunks, results):
            seq = chunk.seq
            if seq.status != RUNNING:
                continue  # aborted while the step ran
            self.scheduler.on_chunk_done(chunk, r.token_id)
            data: _SeqData = seq.payload
            if r.export is not None:
                self._commit(seq, chunk.start + chunk.num_new_tokens, r.export)
            if r.token_id is None:
                continue
            self.counters["num_generated_tokens"] += 1
            outcome = data.processor.push(r.token_id)
            finish, stop = outcome.finish_reason, outcome.stop_reason
            text = outcome.text
            if finish is None and seq.num_tokens >= self.max_model_len:
                text, finish = text + data.processor.finish_now(), FINISH_LENGTH
            data.stream.put(TokenEvent(seq.seq_id, [r.token_id], text, data.processor.num_output_tokens,
                                       [r.logprob] if r.logprob is not None else None, finish, stop))
            if finish is not None:
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        self._seqs.pop(seq.seq_id, None)
        self.scheduler.finish(seq.seq_id)
        position = seq.num_computed_tokens
        data: _SeqData = seq.payload
        if self.cache.is_enabled and position > 0 and position not in data.committed_positions:
            # The state is no longer stepped: export it off the loop, on the cache thread.
            token_ids, salt, state = seq.token_ids[:position], data.request.cache_salt, data.state
            data.committed_positions.add(position)
            self._cache_pool.submit(self._commit_now, token_ids, lambda: {position: state.export()}, salt)

    def _commit(self, seq: Sequence, position: int, export: dict) -> None:
        data: _SeqData = seq.payload
        if position in data.committed_positions:
            return
        data.committed_positions.add(position)
        self._cache_pool.submit(self._commit_now, seq.token_ids[:position], lambda: {position: export},
                                data.request.cache_salt)

    def _commit_now(self, token_ids, make_states, salt) -> None:
        try:
            self.cache.commit(token_ids, make_states(), salt)
        except Exception:
            log.exception("KV commit failed")

    def _final_event(self, seq: Sequence, finish: str, error: str | None = None) -> TokenEvent:
        return TokenEvent(seq.seq_id, [], "", seq.num_output_tokens, None, finish, None, error)

    def _fail(self, out: SchedulerOutput, error: str) -> None:
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status == RUNNING:
                seq.payload.stream.put(self._final_event(seq, FINISH_ERROR, error))
                self._seqs.pop(seq.seq_id, None)
                self.scheduler.finish(seq.seq_id)
