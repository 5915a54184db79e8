"""Engine.prefill_progress: what `dsv4 serve` draws for long prompts, read while a prefill runs."""

import asyncio

from actors.engine import Engine, EngineConfig
from actors.messages import GenerateRequest, TokenEvent
from actors.runner import LocalRunner
from actors.sampling import SamplingParams
from model_shards.tokenizer import ByteTokenizer


def test_prefill_progress_counts_long_prompts_only(tiny_model):
    runner = LocalRunner(tiny_model)
    long_ids = [40 + i % 200 for i in range(600)]   # 600-token prompt, 64-token chunks
    short_ids = [41, 42, 43]

    async def main():
        engine = Engine(runner, ByteTokenizer(), EngineConfig(max_num_batched_tokens=64))
        seen = []

        async def consume(rid, ids):
            params = SamplingParams(max_tokens=1, temperature=0.0, is_eos_ignored=True)
            async for ev in engine.generate(GenerateRequest(rid, ids, params)):
                if isinstance(ev, TokenEvent):
                    seen.append(("token", rid))

        tasks = [asyncio.create_task(consume("long", long_ids)), asyncio.create_task(consume("short", short_ids))]
        samples = []
        while not all(t.done() for t in tasks):
            samples.append(engine.prefill_progress(min_prompt_tokens=100))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)
        after = engine.prefill_progress(min_prompt_tokens=100)
        await engine.close()
        return samples, after

    samples, after = asyncio.run(main())
    totals = {total for _, total in samples if total}
    assert totals == {600}                                 # the 3-token prompt is never counted
    done = [d for d, total in samples if total]
    assert done == sorted(done) and 0 < max(done) < 600    # grows chunk by chunk, seen mid-way
    assert after == (0, 0)
