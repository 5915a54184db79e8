"""Engine tests in process (no Ray): batching invariance, chunked prefill, cancellation,
back-pressure, test-hook gating and the KV-cache seam with the real KVCacheService."""

import asyncio

import pytest

from actors.engine import Engine, EngineConfig
from actors.engine_prefix import KVServicePrefixCache
from actors.messages import Admitted, GenerateRequest, Rejected, TokenEvent
from actors.runner import LocalRunner
from actors.sampling import SamplingParams
from model_shards.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def runner(tiny_model):
    return LocalRunner(tiny_model)


def prompt(text: str) -> list[int]:
    return TOK.encode(f"<｜begin▁of▁sentence｜><｜User｜>{text}<｜Assistant｜></think>")


async def collect(engine, rid, ids, **params):
    events = [ev async for ev in engine.generate(GenerateRequest(rid, ids, SamplingParams(**params)))]
    return events


def tokens(events):
    return [t for ev in events if isinstance(ev, TokenEvent) for t in ev.token_ids]


def run(coro):
    return asyncio.run(coro)


def test_batched_equals_alone_greedy_and_seeded(runner):
    prompts = [prompt(f"question number {i} " * (i + 1)) for i in range(8)]

    async def main():
        engine = Engine(runner, TOK, EngineConfig(max_num_batched_tokens=64))
        together = await asyncio.gather(
            *[collect(engine, f"g{i}", p, max_tokens=12, temperature=0.0, is_eos_ignored=True)
              for i, p in enumerate(prompts)],
            *[collect(engine, f"s{i}", p, max_tokens=12, temperature=1.0, seed=i, is_eos_ignored=True)
              for i, p in enumerate(prompts)])
        alone = []
        for i, p in enumerate(prompts):
            alone.append(await collect(engine, f"ga{i}", p, max_tokens=12, temperature=0.0, is_eos_ignored=True))
        for i, p in enumerate(prompts):
            alone.append(await collect(engine, f"sa{i}", p, max_tokens=12, temperature=1.0, seed=i,
                                       is_eos_ignored=True))
        stats = engine.stats()
        await engine.close()
        return together, alone, stats

    together, alone, stats = run(main())
    for t, a in zip(together, alone):
        assert isinstance(t[0], Admitted) and t[-1].finish_reason == "length"
        assert tokens(t) == tokens(a) and len(tokens(t)) == 12
    assert stats.num_running == 0 and stats.num_generated_tokens == 32 * 12
    # chunked prefill under the 64-token budget: every step fits the budget
    assert stats.num_computed_tokens <= stats.num_steps * 64


def test_chunked_prefill_matches_one_shot(runner):
    ids = prompt("a long prompt " * 30)  # ~430 tokens

    async def main(budget):
        engine = Engine(runner, TOK, EngineConfig(max_num_seqs=4, max_num_batched_tokens=budget))
        out = await collect(engine, "x", ids, max_tokens=8, temperature=0.0, is_eos_ignored=True,
                            is_logprobs=True)
        steps = engine.stats().num_steps
        await engine.close()
        return out, steps

    (small, steps_small), (big, steps_big) = run(main(32)), run(main(1024))
    assert tokens(small) == tokens(big)
    assert steps_small == -(-len(ids) // 32) + 7 and steps_big == 8
    lp_small = [lp.logprob for ev in small[1:] for lp in ev.logprobs]
    lp_big = [lp.logprob for ev in big[1:] for lp in ev.logprobs]
    assert lp_small == pytest.approx(lp_big, abs=1e-4)


def test_cancel_frees_the_sequence(runner):
    async def main():
        engine = Engine(runner, TOK, EngineConfig())
        agen = engine.generate(GenerateRequest("c", prompt("hi"), SamplingParams(max_tokens=10_000,
                                                                                is_eos_ignored=True)))
        first = await agen.__anext__()
        await agen.__anext__()
        running = engine.stats().num_running
        await agen.aclose()  # what a cancelled Serve call does
        await asyncio.sleep(0.05)
        stats = engine.stats()
        await engine.close()
        return first, running, stats

    first, running, stats = run(main())
    assert isinstance(first, Admitted) and running == 1
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_aborted == 1


def test_back_pressure_and_rejections(runner):
    async def main():
        engine = Engine(runner, TOK, EngineConfig(max_num_seqs=1, max_num_batched_tokens=16, max_num_waiting=1))
        long = dict(max_tokens=40, is_eos_ignored=True)
        a = asyncio.create_task(collect(engine, "a", prompt("a"), **long))
        await asyncio.sleep(0.05)  # a runs
        b = asyncio.create_task(collect(engine, "b", prompt("b"), **long))
        await asyncio.sleep(0.01)  # b waits
        c = await collect(engine, "c", prompt("c"), **long)
        too_long = await collect(engine, "d", [5] * (1 << 20), max_tokens=4)
        forced = await collect(engine, "e", prompt("e"), max_tokens=4, forced_token_ids=(40,))
        bad = await collect(engine, "f", prompt("f"), max_tokens=4, temperature=9.0)
        ra, rb = await a, await b
        await engine.close()
        return ra, rb, c, too_long, forced, bad

    ra, rb, c, too_long, forced, bad = run(main())
    assert ra[-1].finish_reason == rb[-1].finish_reason == "length"
    assert isinstance(c[0], Rejected) and c[0].status == 429 and len(c) == 1
    assert isinstance(too_long[0], Rejected) and too_long[0].status == 400 and "context" in too_long[0].message
    assert isinstance(forced[0], Rejected) and "test hook" in forced[0].message
    assert isinstance(bad[0], Rejected) and "temperature" in bad[0].message


def test_forced_completion_and_stop_string(runner):
    async def main():
        engine = Engine(runner, TOK, EngineConfig(is_test_hooks_enabled=True))
        forced = TOK.encode("hello STOP world") + [TOK.eos_id]
        out = await collect(engine, "f", prompt("x"), max_tokens=50, forced_token_ids=tuple(forced), stop=("STOP",))
        out2 = await collect(engine, "g", prompt("x"), max_tokens=50, forced_token_ids=tuple(forced))
        await engine.close()
        return out, out2

    out, out2 = run(main())
    assert "".join(ev.text for ev in out[1:]) == "hello " and out[-1].stop_reason == "STOP"
    assert "".join(ev.text for ev in out2[1:]) == "hello STOP world" and out2[-1].stop_reason == TOK.eos_id


def test_prefix_cache_hit_gives_same_output(runner, tiny_model):
    from model_shards import entry_rates
    from kvcache.service import KVCacheService

    service = KVCacheService(entry_rates(tiny_model.config), tiny_model.fingerprint)
    ids = prompt("cache me " * 40)

    async def main():
        engine = Engine(runner, TOK, EngineConfig(), KVServicePrefixCache(service))
        cold = await collect(engine, "a", ids, max_tokens=6, temperature=0.0, is_eos_ignored=True)
        await asyncio.sleep(0.2)  # commits run on the cache thread
        warm = await collect(engine, "b", ids, max_tokens=6, temperature=0.0, is_eos_ignored=True)
        other = await collect(engine, "c", prompt("cache me"), max_tokens=2)
        await engine.close()
        return cold, warm, other

    cold, warm, other = run(main())
    assert cold[0].num_cached_tokens == 0
    assert warm[0].num_cached_tokens == len(ids) - 1 and warm[0].cache_tier == "device"
    assert tokens(cold) == tokens(warm)
    assert other[0].num_cached_tokens == 0  # a different prompt shares no checkpoint


def test_a_hit_that_fails_while_loading_is_recomputed(runner):
    """A deferred hit whose record fails its check mid-load (the service deleted it) leaves a
    partly written state: the engine drops it and prefills from scratch, same output."""
    from actors.engine_prefix import NoPrefixCache, PrefixHit

    class FailingLoad:
        def load_into(self, state):
            state.layers[0].ring.fill_(float("nan"))   # what a half-done load might leave
            return False

    class FailingCache(NoPrefixCache):
        is_enabled = True

        def lookup(self, token_ids, salt, max_tokens):
            return PrefixHit(max_tokens, None, "disk", FailingLoad())

    ids = prompt("fail me " * 20)

    async def main():
        plain = Engine(runner, TOK, EngineConfig())
        want = await collect(plain, "a", ids, max_tokens=5, temperature=0.0, is_eos_ignored=True)
        await plain.close()
        engine = Engine(runner, TOK, EngineConfig(), FailingCache())
        got = await collect(engine, "b", ids, max_tokens=5, temperature=0.0, is_eos_ignored=True)
        await engine.close()
        return want, got

    want, got = run(main())
    assert got[0].num_cached_tokens == 0 and got[0].cache_tier is None
    assert tokens(got) == tokens(want)


def test_the_cpu_runner_warms_up_on_throwaway_states(tiny_ckpt):
    """The first request must not wait for the CPU kernels' build: the runner does it at load, on
    states it throws away (their pool slots come back)."""
    import gc

    from actors.runner import LocalRunner

    runner = LocalRunner.from_pretrained(tiny_ckpt)
    from model_shards import cpu_kernels
    assert cpu_kernels._library.cache_info().currsize == 1 and runner.model.experts.decode_experts.is_enabled
    gc.collect()
    pool = runner.model.dense.state_pool
    assert pool.num_free_slots == pool.num_slots


def test_compiled_decode_generates_what_the_eager_runner_does(tiny_ckpt, runner):
    """An Engine whose runner decodes through compiled regions (compiled at load) gives the same
    greedy tokens as the eager runner, for a batch of prompts that come and go."""
    from model_shards.regions import DecodeRegions

    compiled = LocalRunner.from_pretrained(tiny_ckpt, compiled_decode=True)
    assert isinstance(compiled.model.dense.regions, DecodeRegions) and compiled.model.dense.regions.is_enabled
    assert compiled.model.dense.regions.attn_in._compiled is not None          # compiled in warm_up
    texts = ["the regions", "a longer prompt that crosses a compression window or two", "x"]

    def generate(r):
        async def main():
            engine = Engine(r, TOK, EngineConfig(max_num_seqs=4))
            try:
                outs = await asyncio.gather(*(collect(engine, str(i), prompt(t), max_tokens=12 + 3 * i,
                                                      temperature=0.0, is_eos_ignored=True)
                                              for i, t in enumerate(texts)))
            finally:
                await engine.close()
            return [tokens(o) for o in outs]
        return run(main())

    assert generate(compiled) == generate(runner)
    assert compiled.model.dense.regions.attn_in.is_compiled                    # no fallback
