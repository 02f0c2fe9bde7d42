"""The shared LLM client against a local OpenAI-compatible server over real HTTP (tests/llm_server.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlprep.llm import LLMClient, LLMError, LLMSettings, ask_json, request_key, run_all

QA_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
             "required": ["question", "answer"]}

HERE = Path(__file__).resolve().parent


def _messages(k: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": ask_json(f"item {k}.", QA_SCHEMA)},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]}]


def _check(text: str) -> dict:
    data = json.loads(text)  # ValueError: retried
    if not {"question", "answer"} <= set(data):
        raise ValueError(f"missing fields {sorted({'question', 'answer'} - set(data))}")
    return data


def _ask(settings: LLMSettings, cache: Path | None, n: int, check=_check) -> tuple[dict, dict, dict]:
    replies, errors = {}, {}

    async def go():
        async with LLMClient(settings, cache) as client:
            await run_all(client, [(k, _messages(k)) for k in range(n)], check,
                          on_reply=lambda k, r: replies.setdefault(k, []).append(r),
                          on_error=lambda k, e: errors.setdefault(k, []).append(e))
            return client.summary()

    return replies, errors, asyncio.run(go())


def test_every_request_completes_once_through_throttling_errors_timeouts_and_bad_bodies(server_factory, tmp_path):
    server = server_factory("--rate-429", "0.1", "--rate-500", "0.1", "--rate-timeout", "0.05",
                            "--rate-malformed", "0.05", "--hang-s", "5", "--seed", "1")
    settings = LLMSettings(backend="openai", base_url=server.base_url, concurrency=16, timeout_s=0.5, max_retries=10,
                           backoff_s=0.01, backoff_max_s=0.05)
    replies, errors, summary = _ask(settings, tmp_path / "cache.sqlite", 150)
    assert errors == {} and sorted(replies) == list(range(150)) and all(len(r) == 1 for r in replies.values())
    assert all(r[0].parsed["question"] for r in replies.values())
    stats = server.stats()
    assert stats["distinct"] == 150 and stats["images"] == stats["requests"]
    assert set(stats["by_outcome"]) == {"ok", "429", "500", "timeout", "malformed"}
    assert summary["retried"] == stats["requests"] - 150 and summary["cached_answers"] == 150
    # the same requests again: all from the cache, none sent
    again, _, summary = _ask(settings, tmp_path / "cache.sqlite", 150)
    assert server.stats()["requests"] == stats["requests"] and summary["cache_hits"] == 150
    assert [again[k][0].text for k in range(150)] == [replies[k][0].text for k in range(150)]


def test_a_bad_model_answer_is_retried_then_fails_with_its_reason(server_factory, tmp_path):
    server = server_factory("--rate-bad-output", "1.0")
    settings = LLMSettings(backend="openai", base_url=server.base_url, max_retries=3, backoff_s=0.001)
    replies, errors, summary = _ask(settings, tmp_path / "cache.sqlite", 2)
    assert replies == {} and sorted(errors) == [0, 1]
    error = errors[0][0]
    assert error.code == "bad_output" and error.attempts == 4 and "model answer rejected" in str(error)
    assert server.stats()["requests"] == 8 and summary["cached_answers"] == 0  # a rejected answer is not cached


def test_the_api_key_never_shows_in_errors_or_logs(server_factory, tmp_path, monkeypatch, caplog):
    secret = "sk-test-" + "7" * 24
    monkeypatch.setenv("MLPREP_TEST_KEY", secret)
    server = server_factory()
    settings = LLMSettings(backend="openai", base_url=server.base_url, api_key_env="MLPREP_TEST_KEY", max_retries=0)
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]
    caplog.set_level(logging.DEBUG)

    async def go():
        async with LLMClient(settings, None) as client:
            with pytest.raises(LLMError) as caught:
                await client.complete(bad)
            return caught.value

    error = asyncio.run(go())
    assert error.code == "http_error" and "400" in str(error)
    assert secret not in str(error) and secret not in caplog.text and secret not in repr(error.__dict__)


def test_template_backend_answers_offline_deterministically_and_says_so(tmp_path):
    settings = LLMSettings(backend="template")
    first, _, _ = _ask(settings, None, 3)
    second, _, _ = _ask(settings, None, 3)
    assert [first[k][0].text for k in range(3)] == [second[k][0].text for k in range(3)]
    assert all("[template" in v for r in first.values() for v in r[0].parsed.values())
    assert request_key("m", _messages(1), {"t": 0}) != request_key("m", _messages(1), {"t": 1})


KILLED_RUN = """
import asyncio, sys
from mlprep.llm import LLMClient, LLMSettings, run_all
sys.path.insert(0, {tests!r})
from test_llm import _messages
settings = LLMSettings(backend="openai", base_url={url!r}, concurrency=4)
async def go():
    async with LLMClient(settings, {cache!r}) as client:
        await run_all(client, [(k, _messages(k)) for k in range(60)])
asyncio.run(go())
"""


def test_a_killed_run_resumes_without_resending_an_answered_request(server_factory, tmp_path):
    server = server_factory("--latency", "0.05")
    cache = tmp_path / "cache.sqlite"
    script = KILLED_RUN.format(tests=str(HERE), url=server.base_url, cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 60
    while server.stats()["requests"] < 20 and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    sent_before = server.stats()["requests"]
    assert 20 <= sent_before < 60
    settings = LLMSettings(backend="openai", base_url=server.base_url, concurrency=4)
    replies, errors, summary = _ask(settings, cache, 60, check=None)
    assert errors == {} and len(replies) == 60
    stats = server.stats()
    answered_before = summary["cache_hits"]
    assert answered_before >= 16  # answers written as they arrived survived the kill
    assert stats["requests"] - sent_before == 60 - answered_before  # no answered request was sent again
