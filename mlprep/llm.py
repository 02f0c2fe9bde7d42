"""One LLM client for every step that asks a model (probe_qa's factor completion, verification, QA generation).

It speaks the OpenAI chat-completions protocol (`POST {base_url}/chat/completions`), which Gemini's
OpenAI-compatible endpoint, vLLM and Ollama all serve, over one pooled aiohttp session:
  - `concurrency` requests in flight at most (a semaphore and the connection pool);
  - optional `requests_per_minute` / `tokens_per_minute` limits (aiolimiter's leaky buckets; tokens are
    estimated from the prompt's length plus max_tokens);
  - a per-request timeout; 429, 5xx, timeouts, dropped connections and malformed bodies are retried by
    tenacity with exponential backoff and full jitter, or after the server's Retry-After when it sends one;
    a model answer that fails the caller's check is retried the same way, its error named;
  - a response cache on disk (SQLite, one row per request key = hash of model, messages and parameters),
    written as each answer arrives: a rerun after a kill never sends a request that had been answered.
aiohttp rather than the openai package: at 32 requests in flight AsyncOpenAI's per-request cost held it to
0.86x of the ideal rate on this project's 2-core machines; the retry semantics it has are kept here.
The API key comes from the environment variable named by `api_key_env`; it is sent in a header and never
appears in a log line, an output or an error message.

Steps ask for JSON: the prompt ends with `Answer with JSON matching this schema: {JSON Schema}` and
`schema_check(schema)` parses and validates the answer (a fenced ```json block is accepted). `backend:
template` answers offline and deterministically from the request itself with an instance of that schema
(every string it writes says it is a template), so the default demo produces records without a server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

BACKENDS = ("template", "openai")
SCHEMA_MARKER = "Answer with JSON matching this schema:"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class LLMSettings:
    backend: str = "template"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 32
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 512

    @classmethod
    def from_config(cls, cfg: dict) -> LLMSettings:
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class LLMError(Exception):
    """A request that failed for good (after its retries); `code` is a failure reason code."""

    def __init__(self, code: str, message: str, attempts: int = 0):
        super().__init__(message)
        self.code, self.attempts = code, attempts


class RetryableError(Exception):
    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.code, self.retry_after = code, retry_after


@dataclass
class Reply:
    key: str
    text: str
    model: str
    attempts: int  # requests it took (as first answered: a cached reply keeps its count; 0 for the template)
    cached: bool
    parsed: object = None  # what the caller's check returned


@dataclass
class Counters:
    sent: int = 0
    retried: int = 0
    cache_hits: int = 0
    failed: int = 0
    by_error: dict = field(default_factory=dict)


def request_key(model: str, messages: list[dict], params: dict) -> str:
    """The cache key: a hash of everything that decides the answer."""
    text = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """Answers by request key in one SQLite file (WAL: readers never wait for the writer). Each answer is
    committed as it arrives (~40 us), so a rerun after a kill never sends a request that had been answered;
    the keys are also held in memory, so a miss costs no query."""

    def __init__(self, path: Path | str | None):
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, text TEXT, "
                         "created REAL, attempts INTEGER DEFAULT 1)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        if "attempts" not in columns:  # a cache written before answers kept their attempt count
            self._db.execute("ALTER TABLE responses ADD COLUMN attempts INTEGER DEFAULT 1")
        self._keys = {row[0] for row in self._db.execute("SELECT key FROM responses")}

    def get(self, key: str) -> tuple[str, int] | None:
        """(answer, attempts it took) or None."""
        if key not in self._keys:
            return None
        with self._lock:
            row = self._db.execute("SELECT text, attempts FROM responses WHERE key = ?", (key,)).fetchone()
        return (row[0], int(row[1] if row[1] is not None else 1)) if row else None

    def put(self, key: str, model: str, text: str, attempts: int = 1) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses (key, model, text, created, attempts) "
                             "VALUES (?, ?, ?, ?, ?)", (key, model, text, time.time(), attempts))
            self._keys.add(key)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def prompt_text(messages: list[dict]) -> str:
    """The text parts of a conversation, joined (images left out)."""
    parts = [part for m in messages for part in (m["content"] if isinstance(m["content"], list) else [m["content"]])]
    return " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in parts)


def schema_instance(schema: dict, tag: str, name: str = "value") -> object:
    """A deterministic instance of a (small) JSON Schema: an enum's member picked by the tag's hash, strings
    that carry the tag, true for booleans, 0 for numbers. What the template backend and the test server say."""
    if "enum" in schema:
        options = schema["enum"]
        return options[int(hashlib.sha256(f"{tag}:{name}".encode()).hexdigest(), 16) % len(options)]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {key: schema_instance(sub, tag, key) for key, sub in props.items()}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), tag, name)]
    if kind == "boolean":
        return True
    if kind in ("number", "integer"):
        return max(0, schema.get("minimum", 0))
    return f"{tag} {name}"


def answer_for(prompt: str, tag: str) -> str | None:
    """A JSON answer to a prompt that asks for one (the schema after SCHEMA_MARKER), else None."""
    if SCHEMA_MARKER not in prompt:
        return None
    try:
        schema = json.JSONDecoder().raw_decode(prompt.split(SCHEMA_MARKER, 1)[1].strip())[0]
    except ValueError:
        return None
    return json.dumps(schema_instance(schema, tag), ensure_ascii=False)


def template_answer(messages: list[dict], key: str) -> str:
    """The offline backend's answer: deterministic, and marked as a template in every string it writes."""
    tag = f"[template {key[:8]}]"
    return answer_for(prompt_text(messages), tag) or f"{tag} no model was asked (backend: template)"


def schema_check(schema: dict) -> Callable[[str], dict]:
    """A check for LLMClient.complete: the answer parsed as JSON (a ```json fence is accepted) and valid
    against `schema`; otherwise ValueError naming what is wrong (the client then retries)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)

    def check(text: str) -> dict:
        body = text.strip()
        if body.startswith("```"):
            body = body.split("\n", 1)[1] if "\n" in body else ""
            body = body.rsplit("```", 1)[0]
        try:
            data = json.loads(body)
        except ValueError as err:
            raise ValueError(f"not JSON ({err.msg} at character {err.pos}): {text[:80]!r}") from None
        error = next(iter(validator.iter_errors(data)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the answer"
            raise ValueError(f"{where}: {error.message[:200]}")
        return data

    return check


def ask_json(text: str, schema: dict) -> str:
    """A prompt that asks for an answer valid against `schema` (what schema_check then enforces)."""
    return f"{text}\n\n{SCHEMA_MARKER} {json.dumps(schema, ensure_ascii=False)}"


class LLMClient:
    """Use as `async with LLMClient(settings, cache_path) as client: reply = await client.complete(messages)`."""

    def __init__(self, settings: LLMSettings, cache_path: Path | str | None = None):
        if settings.backend not in BACKENDS:
            raise ValueError(f"unknown LLM backend {settings.backend!r}; one of {', '.join(BACKENDS)}")
        self.settings = settings
        self.cache = ResponseCache(cache_path)
        self.counters = Counters()
        self._session = None
        self._semaphore: asyncio.Semaphore | None = None
        self._rpm = self._tpm = None
        self._headers = {"Content-Type": "application/json"}
        if settings.backend == "openai" and settings.api_key_env:
            key = os.environ.get(settings.api_key_env)
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
            else:
                log.warning("environment variable %s is not set: requests go without an API key",
                            settings.api_key_env)

    async def __aenter__(self) -> LLMClient:
        import aiohttp
        from aiolimiter import AsyncLimiter

        s = self.settings
        self._semaphore = asyncio.Semaphore(s.concurrency)
        if s.requests_per_minute:
            self._rpm = AsyncLimiter(s.requests_per_minute, 60)
        if s.tokens_per_minute:
            self._tpm = AsyncLimiter(s.tokens_per_minute, 60)
        if s.backend == "openai":
            connector = aiohttp.TCPConnector(limit=s.concurrency, limit_per_host=s.concurrency, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers,
                                                  timeout=aiohttp.ClientTimeout(total=s.timeout_s))
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
        self.cache.close()

    def params(self) -> dict:
        return {"temperature": self.settings.temperature, "max_tokens": self.settings.max_tokens}

    async def complete(self, messages: list[dict], check: Callable[[str], object] | None = None,
                       extra: dict | None = None) -> Reply:
        """The model's answer to `messages`; `check(text)` returns the parsed answer or raises ValueError
        (the answer is then retried like a failed request, and never cached). `extra`: request parameters
        of this call (e.g. a `seed`), part of the cache key."""
        s = self.settings
        params = {**self.params(), **(extra or {})}
        key = request_key(s.model, messages, params)
        cached = self.cache.get(key)
        if cached is not None:
            self.counters.cache_hits += 1
            text, attempts = cached
            return Reply(key, text, s.model, attempts, True, check(text) if check else None)
        if s.backend == "template":
            text = template_answer(messages, key)
            parsed = check(text) if check else None
            self.cache.put(key, s.model, text, 0)
            return Reply(key, text, s.model, 0, False, parsed)
        try:  # the first attempt outside tenacity: most requests need no more, and it costs per call
            text = await self._send(messages, params)
            try:
                parsed = check(text) if check else None
            except ValueError as err:
                raise RetryableError("bad_output", f"model answer rejected: {err}") from err
        except RetryableError as err:
            if s.max_retries == 0:
                self._count_failure(err.code)
                raise LLMError(err.code, f"{err} (after 1 attempt)", 1) from None
            self._count_retry_code(err.code)
            await asyncio.sleep(self._first_wait(err))
        else:
            self.cache.put(key, s.model, text, 1)
            return Reply(key, text, s.model, 1, False, parsed)
        from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt

        retrying = AsyncRetrying(stop=stop_after_attempt(s.max_retries), wait=self._wait,
                                 retry=retry_if_exception_type(RetryableError), before_sleep=self._count_retry)
        try:
            async for attempt in retrying:
                with attempt:
                    text = await self._send(messages, params)
                    try:
                        parsed = check(text) if check else None
                    except ValueError as err:  # the answer is not what the step asked for
                        raise RetryableError("bad_output", f"model answer rejected: {err}") from err
        except RetryError as err:
            last = err.last_attempt.exception()
            attempts = err.last_attempt.attempt_number + 1
            self._count_failure(last.code)
            raise LLMError(last.code, f"{last} (after {attempts} attempts)", attempts) from None
        attempts = attempt.retry_state.attempt_number + 1
        self.cache.put(key, s.model, text, attempts)
        return Reply(key, text, s.model, attempts, False, parsed)

    def _count_retry(self, state) -> None:
        self._count_retry_code(state.outcome.exception().code)

    def _count_retry_code(self, code: str) -> None:
        self.counters.retried += 1
        self.counters.by_error[code] = self.counters.by_error.get(code, 0) + 1

    def _count_failure(self, code: str) -> None:
        self.counters.failed += 1
        self.counters.by_error[code] = self.counters.by_error.get(code, 0) + 1

    def _first_wait(self, err: RetryableError) -> float:
        if err.retry_after is not None:
            return min(max(err.retry_after, 0.0), self.settings.backoff_max_s)
        return random.uniform(0, min(self.settings.backoff_max_s, self.settings.backoff_s * 2))

    def _wait(self, state) -> float:
        """Retry-After when the server names it, else exponential backoff with full jitter (tenacity's
        wait_random_exponential: retries of many clients must not align)."""
        from tenacity import wait_random_exponential

        retry_after = getattr(state.outcome.exception(), "retry_after", None)
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.settings.backoff_max_s)
        return wait_random_exponential(multiplier=self.settings.backoff_s, max=self.settings.backoff_max_s)(state)

    async def _send(self, messages: list[dict], params: dict) -> str:
        import aiohttp

        s = self.settings
        payload = {"model": s.model, "messages": messages, **params}
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None:
            await self._tpm.acquire(min(self._tpm.max_rate, estimate_tokens(messages) + s.max_tokens))
        async with self._semaphore:
            self.counters.sent += 1
            try:
                async with self._session.post(f"{s.base_url.rstrip('/')}/chat/completions", json=payload) as response:
                    body = await response.read()
                    if response.status != 200:
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                        if response.status in RETRY_STATUS:
                            raise RetryableError(f"http_{response.status}", f"HTTP {response.status}", retry_after)
                        raise LLMError("http_error", f"HTTP {response.status}: {body[:200]!r}")
            except asyncio.TimeoutError as err:
                raise RetryableError("timeout", f"no answer within timeout_s {s.timeout_s}") from err
            except aiohttp.ClientError as err:
                raise RetryableError("connection", f"{type(err).__name__}: {err}") from err
        try:
            data = json.loads(body)
            return data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise RetryableError("malformed_response", f"not a chat completion: {body[:120]!r}") from err

    def summary(self) -> dict:
        return {**asdict(self.counters), "cached_answers": len(self.cache)}


def estimate_tokens(messages: list[dict]) -> int:
    """~4 characters per token, images counted as 85 tokens (a low-detail image part)."""
    chars, images = 0, 0
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else [content]:
            if isinstance(part, dict) and part.get("type") == "image_url":
                images += 1
            else:
                chars += len(part.get("text", "") if isinstance(part, dict) else str(part))
    return chars // 4 + 85 * images + 1


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


async def run_all(client: LLMClient, requests: Iterable[tuple], check=None, on_reply=None, on_error=None) -> None:
    """Ask every request, (tag, messages) or (tag, messages, extra params), keeping the client's concurrency
    busy: a pool of workers pulls from `requests` lazily, so a million requests (and the images they carry)
    are never all in memory. Callbacks see each reply or final error as it arrives: on_reply(tag, reply),
    on_error(tag, LLMError)."""
    source = iter(requests)

    async def worker():
        for request in source:  # one shared iterator: each request is taken by exactly one worker
            tag, messages = request[0], request[1]
            extra = request[2] if len(request) > 2 else None
            try:
                reply = await client.complete(messages, check, extra)
            except LLMError as err:
                if on_error is not None:
                    on_error(tag, err)
                continue
            if on_reply is not None:
                on_reply(tag, reply)

    workers = max(1, client.settings.concurrency) * 2  # more than in flight: cache hits and callbacks overlap
    await asyncio.gather(*(worker() for _ in range(workers)))


def ask_all(settings: LLMSettings, cache_path: Path | str | None, requests: Iterable[tuple], check=None,
            on_reply=None, on_error=None, progress=None, total: int | None = None, desc: str = "requests") -> dict:
    """run_all from synchronous code (a shard job): one client, one event loop; returns the client's counts.
    `progress` (a stream) gets a tqdm bar over the answers."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="req", file=progress, mininterval=2.0, disable=progress is None)

    def replied(tag, reply):
        bar.update()
        if on_reply is not None:
            on_reply(tag, reply)

    def failed(tag, err):
        bar.update()
        if on_error is not None:
            on_error(tag, err)

    async def go() -> dict:
        async with LLMClient(settings, cache_path) as client:
            await run_all(client, requests, check, replied, failed)
            return client.summary()

    try:
        return asyncio.run(go())
    finally:
        bar.close()
