"""Benchmark of the shared LLM client (mlprep.llm) against the local OpenAI-compatible test server, which runs
in its own process with a fixed latency, side by side in one run (`make bench`).

  mlprep client   LLMClient.complete for `--requests` distinct requests (no cache hits), at concurrency 32
                  and 256, against the ideal (concurrency / latency) and against a bare aiohttp client that
                  posts the same bodies with a semaphore and nothing else (retries, cache, checks off)
  sequential      one request at a time (the seed's synchronous client), on `--sequential` requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from mlprep.llm import ask_json  # noqa: E402


QA_SCHEMA = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}}}


def messages(k: int) -> list[dict]:
    return [{"role": "user", "content": ask_json(f"request {k}.", QA_SCHEMA)}]


async def mlprep_client(url: str, n: int, concurrency: int, offset: int) -> float:
    from mlprep.llm import LLMClient, LLMSettings, run_all

    settings = LLMSettings(backend="openai", base_url=url, concurrency=concurrency, api_key_env=None)
    with tempfile.TemporaryDirectory() as tmp:
        async with LLMClient(settings, Path(tmp) / "cache.sqlite") as client:
            started = time.perf_counter()
            await run_all(client, [(k, messages(offset + k)) for k in range(n)], json.loads)
            seconds = time.perf_counter() - started
            assert client.counters.sent == n
    return seconds


async def bare_client(url: str, n: int, concurrency: int, offset: int) -> float:
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(k):
            async with semaphore:
                async with session.post(f"{url}/chat/completions", json={"model": "m", "messages": messages(k)}) as r:
                    json.loads((await r.json())["choices"][0]["message"]["content"])

        started = time.perf_counter()
        await asyncio.gather(*(one(offset + k) for k in range(n)))
        return time.perf_counter() - started


async def sequential_client(url: str, n: int, offset: int) -> float:
    from mlprep.llm import LLMClient, LLMSettings

    settings = LLMSettings(backend="openai", base_url=url, concurrency=1, api_key_env=None)
    async with LLMClient(settings, None) as client:
        started = time.perf_counter()
        for k in range(n):
            await client.complete(messages(offset + k), json.loads)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    from mlprep.devices import cpu_summary

    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        asyncio.run(bare_client(url, 64, 32, 10**8))  # warm up the server
        figures = {}
        offset = 0
        for concurrency in (32, 256):
            ours = asyncio.run(mlprep_client(url, args.requests, concurrency, offset))
            offset += args.requests
            bare = asyncio.run(bare_client(url, args.requests, concurrency, offset))
            offset += args.requests
            ideal = concurrency / args.latency
            figures[concurrency] = {"mlprep_rps": args.requests / ours, "bare_rps": args.requests / bare,
                                    "ideal_rps": ideal}
        sequential = asyncio.run(sequential_client(url, args.sequential, offset)) / args.sequential
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"LLM client benchmark on {cpu_summary()}: {args.requests} distinct requests per row, server latency "
          f"{args.latency * 1000:.0f} ms, server in its own process")
    print(f"{'concurrency':>11} {'mlprep req/s':>13} {'bare aiohttp':>13} {'ideal':>7} {'vs ideal':>9} {'vs bare':>8}")
    for concurrency, f in figures.items():
        print(f"{concurrency:>11} {f['mlprep_rps']:13.1f} {f['bare_rps']:13.1f} {f['ideal_rps']:7.0f} "
              f"{f['mlprep_rps'] / f['ideal_rps']:9.2f} {f['mlprep_rps'] / f['bare_rps']:8.2f}")
    print(f"sequential client: {1 / sequential:.1f} req/s; concurrency 32 is "
          f"x{figures[32]['mlprep_rps'] * sequential:.1f}, 256 is x{figures[256]['mlprep_rps'] * sequential:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"concurrency": figures, "sequential_rps": 1 / sequential}, indent=2))


if __name__ == "__main__":
    main()
