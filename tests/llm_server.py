"""A local OpenAI-compatible chat server for the tests and the benchmark: real HTTP on 127.0.0.1.

`POST /v1/chat/completions` accepts text and image content parts and answers after `latency` seconds. With
the seeded rates it misbehaves the ways real endpoints do: 429 with Retry-After, 500, no answer (longer than
the client waits), a body that is not JSON, a model answer that is not JSON, and JSON that lacks fields.
`GET /stats` counts the requests, per request key as well (so a test can prove nothing was sent twice).
The answer is an instance of the JSON Schema the prompt gives after mlprep.llm.SCHEMA_MARKER (enum members
picked by the request's hash), as a model that follows instructions would write.

Run: `python tests/llm_server.py --latency 0.1 [--rate-429 0.2 ...]`; it prints its port on the first line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
from collections import Counter

from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlprep.llm import answer_for  # noqa: E402


def make_app(latency: float = 0.0, rate_429: float = 0.0, rate_500: float = 0.0, rate_timeout: float = 0.0,
             rate_malformed: float = 0.0, rate_bad_output: float = 0.0, hang_s: float = 30.0, seed: int = 0,
             retry_after: float = 0.05, rate_bad_fields: float = 0.0) -> web.Application:
    stats = {"requests": 0, "by_outcome": Counter(), "by_key": Counter(), "images": 0}

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        messages = body["messages"]
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        stats["requests"] += 1
        stats["by_key"][key] += 1
        prompt = []
        for message in messages:
            content = message["content"]
            for part in content if isinstance(content, list) else [{"type": "text", "text": content}]:
                if part["type"] == "image_url":
                    if not part["image_url"]["url"].startswith(("data:image/", "http")):
                        return web.json_response({"error": "bad image part"}, status=400)
                    stats["images"] += 1
                else:
                    prompt.append(part["text"])
        # drawn from the request and how many times it was sent: the same outcomes whatever order concurrent
        # requests arrive in, so a test's mix of misbehaviours is the same on every run
        draw = random.Random(f"{seed}:{key}:{stats['by_key'][key]}").random()
        if latency:
            await asyncio.sleep(latency)
        for outcome, rate in (("429", rate_429), ("500", rate_500), ("timeout", rate_timeout),
                              ("malformed", rate_malformed), ("bad_output", rate_bad_output),
                              ("bad_fields", rate_bad_fields)):
            if draw < rate:
                break
            draw -= rate
        else:
            outcome = "ok"
        stats["by_outcome"][outcome] += 1
        if outcome == "429":
            return web.json_response({"error": "rate limited"}, status=429, headers={"Retry-After": str(retry_after)})
        if outcome == "500":
            return web.json_response({"error": "server error"}, status=500)
        if outcome == "timeout":
            await asyncio.sleep(hang_s)
        if outcome == "malformed":
            return web.Response(text="<html>upstream error</html>", content_type="text/html")
        answer = answer_for(" ".join(prompt), f"model-{key[:6]}") or json.dumps({"answer": key[:6]})
        if outcome == "bad_fields":  # JSON, but not what was asked: every field but the first left out
            fields = json.loads(answer)
            answer = json.dumps(dict(list(fields.items())[:1]) if isinstance(fields, dict) else {})
        content = "this is not JSON" if outcome == "bad_output" else answer
        return web.json_response({"id": key[:12], "object": "chat.completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                               "finish_reason": "stop"}]})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": stats["requests"], "by_outcome": dict(stats["by_outcome"]),
                                  "distinct": len(stats["by_key"]), "max_per_key": max(stats["by_key"].values(),
                                                                                        default=0),
                                  "images": stats["images"]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/stats", get_stats)
    return app


async def serve(args) -> None:
    app = make_app(args.latency, args.rate_429, args.rate_500, args.rate_timeout, args.rate_malformed,
                   args.rate_bad_output, args.hang_s, args.seed, rate_bad_fields=args.rate_bad_fields)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    for name in ("429", "500", "timeout", "malformed", "bad-output", "bad-fields"):
        parser.add_argument(f"--rate-{name}", type=float, default=0.0)
    parser.add_argument("--hang-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop  # noqa: F401 - faster when present, not required

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
