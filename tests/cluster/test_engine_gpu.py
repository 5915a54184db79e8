"""The Engine on a CUDA runner (skipped without a GPU): batching invariance, sampling and a
KV-cache round trip with the state on the device."""

import asyncio

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_engine_on_cuda(tiny_ckpt):
    from actors.engine import Engine, EngineConfig
    from actors.engine_prefix import KVServicePrefixCache
    from actors.messages import Admitted, GenerateRequest, TokenEvent
    from actors.runner import LocalRunner
    from actors.sampling import SamplingParams
    from model_shards.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    runner = LocalRunner.from_pretrained(tiny_ckpt, device="cuda")
    try:
        cache = KVServicePrefixCache.build(runner.config, runner.fingerprint, redis_url=None, disk_dir=None)
    except ImportError:  # e.g. no `redis` package on the GPU image
        cache = None
    prompts = [tok.encode(f"<｜begin▁of▁sentence｜><｜User｜>{'cuda ' * (10 + 20 * i)}<｜Assistant｜></think>")
               for i in range(6)]

    async def one(engine, rid, ids, **kw):
        evs = [ev async for ev in engine.generate(GenerateRequest(rid, ids, SamplingParams(**kw)))]
        return evs[0], [t for ev in evs if isinstance(ev, TokenEvent) for t in ev.token_ids]

    async def main():
        engine = Engine(runner, tok, EngineConfig(max_num_batched_tokens=64), cache)
        kw = dict(max_tokens=10, is_eos_ignored=True)
        together = await asyncio.gather(*[one(engine, f"t{i}", p, temperature=0.0, **kw) for i, p in enumerate(prompts)],
                                        *[one(engine, f"s{i}", p, seed=i, **kw) for i, p in enumerate(prompts)])
        await asyncio.sleep(0.5)
        alone = [await one(engine, f"a{i}", p, temperature=0.0, **kw) for i, p in enumerate(prompts)]
        alone += [await one(engine, f"b{i}", p, seed=i, **kw) for i, p in enumerate(prompts)]
        await engine.close()
        return together, alone

    together, alone = asyncio.run(main())
    for (first_t, toks_t), (first_a, toks_a) in zip(together, alone):
        assert isinstance(first_t, Admitted) and toks_t == toks_a and len(toks_t) == 10
        if cache is not None:
            assert first_a.num_cached_tokens == first_a.num_prompt_tokens - 1  # restored onto the GPU


def test_engine_replays_cuda_graphs_in_bf16(tiny_ckpt):
    """bf16 on a GPU: decode steps replay CUDA graphs (the runner chooses them); greedy outputs
    equal the eager runner's for most requests (bf16 rounding may flip a near-tie) and all finish."""
    from actors.engine import Engine, EngineConfig
    from actors.messages import GenerateRequest, TokenEvent
    from actors.runner import LocalRunner
    from actors.sampling import SamplingParams
    from model_shards.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    prompts = [tok.encode(f"<｜begin▁of▁sentence｜><｜User｜>{'graph ' * (3 + 7 * i)}<｜Assistant｜></think>")
               for i in range(5)]

    async def run(runner):
        engine = Engine(runner, tok, EngineConfig(max_num_batched_tokens=64))

        async def one(rid, ids):
            evs = [ev async for ev in engine.generate(GenerateRequest(rid, ids, SamplingParams(
                max_tokens=12, temperature=0.0, is_eos_ignored=True)))]
            return [t for ev in evs if isinstance(ev, TokenEvent) for t in ev.token_ids]

        out = await asyncio.gather(*[one(f"r{i}", p) for i, p in enumerate(prompts)])
        await engine.close()
        return out

    graphed = LocalRunner.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cuda")
    assert graphed.graphs is not None
    eager = LocalRunner.from_pretrained(tiny_ckpt, dtype=torch.bfloat16, device="cuda", cuda_graphs=False)
    got, want = asyncio.run(run(graphed)), asyncio.run(run(eager))
    assert graphed.graphs.num_captures >= 1 and all(len(t) == 12 for t in got)
    assert sum(g == w for g, w in zip(got, want)) >= 3
