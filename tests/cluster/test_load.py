"""Concurrency, cancellation, back-pressure and prefix caching through the real Serve app."""

import asyncio
import time

import httpx
import openai
import pytest
from ray import serve

MODEL = "deepseek-v4-flash"
NO_THINK = {"thinking": {"type": "disabled"}}


def total_running(app) -> int:
    return sum(app.engine_stats(i).num_running + app.engine_stats(i).num_waiting
               for i in range(app.args["num_replicas"]))


def wait_until(predicate, timeout=20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_16_concurrent_streams_equal_alone(main_app):
    prompts = [f"conversation {i}: " + "tell me about the number %d. " % i * (1 + i % 4) for i in range(16)]

    async def stream_one(client, text):
        out = []
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0, stream=True,
            extra_body={**NO_THINK, "ignore_eos": True})
        async for chunk in stream:
            if chunk.choices:
                out.append(chunk.choices[0].delta.content or "")
        return "".join(out)

    async def main():
        client = main_app.async_openai(timeout=120)
        return await asyncio.gather(*[stream_one(client, p) for p in prompts])

    together = asyncio.run(main())
    client = main_app.openai()
    for text, got in zip(prompts, together):
        alone = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                               max_tokens=16, temperature=0, extra_body={**NO_THINK, "ignore_eos": True})
        assert got == alone.choices[0].message.content
    assert total_running(main_app) == 0


def test_client_disconnect_frees_the_sequence(main_app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 100_000,
            "stream": True, "ignore_eos": True, "thinking": {"type": "disabled"}}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", main_app.url + "/v1/chat/completions", json=body, headers=main_app.headers()) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert total_running(main_app) == 1
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: total_running(main_app) == 0), "the sequence was not freed"


def test_back_pressure_429(aux_app):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 5000, "stream": True,
            "ignore_eos": True, "thinking": {"type": "disabled"}}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", aux_app.url + "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            first_lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
            next(first_lines)
            with http.stream("POST", aux_app.url + "/v1/chat/completions", json=body) as second:
                assert second.status_code == 200  # waits in the engine's queue (admitted = queued)
                assert wait_until(lambda: aux_app.engine_stats().num_waiting == 1), aux_app.engine_stats()
                client = aux_app.openai()
                with pytest.raises(openai.RateLimitError) as e:
                    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=2)
                assert e.value.body["type"] == "rate_limit_error" and "busy" in e.value.body["message"]
                r = http.post(aux_app.url + "/v1/messages", json={"model": "deepseek-v4-pro", "max_tokens": 2,
                                                                  "messages": [{"role": "user", "content": "x"}]})
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert wait_until(lambda: aux_app.engine_stats().num_running + aux_app.engine_stats().num_waiting == 0)
    r = aux_app.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def ttft(client, messages, salt) -> tuple[float, int]:
    t0 = time.perf_counter()
    first, usage = None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={**NO_THINK, "cache_salt": salt}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage:
            usage = chunk.usage
    return (first if first is not None else time.perf_counter() - t0), usage


def long_prompt(unique):
    text = f"[{unique}] " + "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " for i in range(40))
    return [{"role": "system", "content": "Summarize."}, {"role": "user", "content": text}]


def test_second_identical_long_prompt_is_cached(main_app, unique):
    client = main_app.openai()
    messages = long_prompt(unique)
    cold, usage = ttft(client, messages, unique)
    assert usage.prompt_cache_hit_tokens == 0 and usage.prompt_tokens > 2000
    warm = []
    for _ in range(2):
        t, u = ttft(client, messages, unique)
        warm.append(t)
        assert u.prompt_cache_hit_tokens == u.prompt_tokens - 1  # all but the last token
        assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
        assert u.prompt_cache_miss_tokens == 1
    assert min(warm) < cold, (cold, warm)
    # another tenant (salt) shares nothing
    _, other = ttft(client, messages, unique + "-other")
    assert other.prompt_cache_hit_tokens == 0


def test_cached_after_restart_with_redis_and_disk(aux_app, unique):
    client = aux_app.openai()
    messages = long_prompt(unique)
    _, first = ttft(client, messages, unique)
    assert first.prompt_cache_hit_tokens == 0
    handle = serve.get_deployment_handle("Engine0", app_name=aux_app.name)
    assert handle.flush_cache.remote().result() is True
    serve.delete(aux_app.name)
    aux_app.deploy()  # fresh Engine process: empty device tier
    client = aux_app.openai()
    _, again = ttft(client, messages, unique)
    assert again.prompt_cache_hit_tokens == again.prompt_tokens - 1
    tiers = aux_app.engine_stats().cache["tiers"]
    assert tiers["redis"]["num_hits"] + tiers["disk"]["num_hits"] > 0


def test_conversation_sticks_to_its_replica_and_hits_its_prefix(main_app, unique):
    client = main_app.openai()
    system = {"role": "system", "content": f"[{unique}] You are a helpful assistant. " * 4}
    turn1 = [system, {"role": "user", "content": "Say sure."}]
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=16,
                                        extra_body={**NO_THINK, "dsv4_debug": True, "dsv4_forced_completion": "Sure."})
    assert r1.choices[0].message.content == "Sure."
    time.sleep(1.0)  # the end-of-response commit runs on the engine's KV thread
    turn2 = turn1 + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Again?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=2,
                                        extra_body={**NO_THINK, "dsv4_debug": True})
    assert r2.dsv4_debug["replica"] == r1.dsv4_debug["replica"]
    # everything the first turn computed (its prompt + "Sure.") is reused
    assert r2.usage.prompt_cache_hit_tokens == r1.usage.prompt_tokens + len("Sure.")
    # other conversations spread over both replicas (affinity is a hash of the first turn: with 24
    # conversations the chance that all land on one replica is 2^-23)
    replicas = {client.chat.completions.create(
        model=MODEL, messages=[system, {"role": "user", "content": f"question {i}"}], max_tokens=1,
        extra_body={**NO_THINK, "dsv4_debug": True}).dsv4_debug["replica"] for i in range(24)}
    assert replicas == {0, 1}
