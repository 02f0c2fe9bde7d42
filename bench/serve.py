"""Load benchmark of `mlprep serve`, measured side by side in one run (`make bench`).

The server runs in its own process on a loopback port over a results folder of the demo's sku_index and
speaker_embed (built here first unless --results names one), with the same threads as the references:
  SKU search, N clients   N concurrent clients each sending single-image queries for --seconds: answered
                          queries per second, p50 / p99 latency, errors (there must be none)
  SKU search, 1 client    one client, one query at a time: p50 / p99 latency
  encoder batched         the service's own query path (decode, query crops, encode, rank, re-rank: SkuSearcher)
                          in this process, --batch images per call: images per second, the ceiling that dynamic
                          batching can reach
  encoder, one image      the same path, one image per call: the latency floor of a lone query
and the same four for speaker identification (the pipeline's audio checks + the backend's encoder). The
references run while the server is idle, the load while this process only waits on sockets. Ratios are what
to read: throughput / batched throughput (target >= 0.8 at 32 clients), p50 / one-image latency (<= 1.3).

    .venv/bin/python bench/serve.py                          # ~3 minutes on 2 cores
    .venv/bin/python bench/serve.py --clients 8 32 --seconds 10 --results results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_results(work: Path) -> Path:
    """The demo's sku_index and speaker_embed, through the workflow."""
    import yaml

    from mlprep.config import only

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(only("sku_index", "speaker_embed"))
    for section, keys in {"sku_index": ("sku_data", "images_dir"), "speaker_embed": ("corpus_dir",)}.items():
        for key in keys:
            config[section][key] = str(REPO / config[section][key])
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                    str(work), "--configfile", str(work / "config.yaml"), "--cores", "all", "sku_index",
                    "speaker_embed"], check=True, stdout=subprocess.DEVNULL)
    return work / "results"


def queries() -> list[bytes]:
    """Shop-floor-like queries: the middle 70% of every demo catalog photo, as JPEG."""
    import io

    from PIL import Image

    out = []
    for path in sorted((REPO / "resources" / "demo" / "sku" / "images").glob("*.jpg")):
        with Image.open(path) as img:
            w, h = img.size
            buffer = io.BytesIO()
            img.convert("RGB").crop((w * 15 // 100, h * 15 // 100, w * 85 // 100, h * 85 // 100)).save(
                buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


def utterances() -> list[bytes]:
    return [p.read_bytes() for p in sorted((REPO / "resources" / "demo" / "speech").rglob("utt*.wav"))]


def timed(run, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        out.append(time.perf_counter() - started)
    return out


def references(results: Path, images: list[bytes], audio: list[bytes], batch: int, threads: int,
               seconds: float, encode_batch: int) -> dict:
    """The service's own code paths in this process, batched and one item at a time."""
    import torch

    from mlprep.serve.pipelines import embed_uploads, load_speaker
    from mlprep.sku.search import SkuSearcher

    torch.set_num_threads(threads)
    searcher = SkuSearcher(results / "sku_index" / "index.faiss", device="cpu", threads=threads,
                           batch_size=encode_batch)  # the server's own forward-pass size, re-ranking as it does

    def search(batch_images: list[bytes]):
        vectors, ok, _ = searcher.embed_bytes(batch_images)
        return searcher.rank_images([batch_images[p] for p in ok], vectors, 5)

    batched = [images[k % len(images)] for k in range(batch)]
    search(batched)  # warm-up
    rounds = max(2, int(seconds / max(1e-3, min(timed(lambda: search(batched), 1)))))
    sku_batch = timed(lambda: search(batched), min(rounds, 20))
    one_at_a_time = iter(range(10**9))  # the same rotation of payloads as the clients send
    sku_one = timed(lambda: search([images[next(one_at_a_time) % len(images)]]), 30)
    speaker = load_speaker(results / "speaker_embed", {}, "cpu", threads)

    def identify_batch(clips):
        prepared = [speaker.prepare(c, 120.0) for c in clips]
        return speaker.identify(embed_uploads(speaker, prepared)[0], 5)

    clips = [audio[k % len(audio)] for k in range(batch)]
    identify_batch(clips)
    speaker_batch = timed(lambda: identify_batch(clips), 5)
    speaker_one = timed(lambda: identify_batch([audio[next(one_at_a_time) % len(audio)]]), 30)
    return {"sku": {"batched_per_s": batch / float(np.median(sku_batch)), "one_s": float(np.median(sku_one))},
            "speaker": {"batched_per_s": batch / float(np.median(speaker_batch)),
                        "one_s": float(np.median(speaker_one))}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(results: Path, threads: int, encode_batch: int, log: Path,
                 rerank: bool = True) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlprep.cli", "serve", "--results", str(results), "--port",
                             str(port), "--threads", str(threads), "--encode-batch", str(encode_batch),
                             "--reload-s", "0", *([] if rerank else ["--no-rerank"])], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not get ready in 120 s")


async def load(base: str, route: str, field: str, payloads: list[bytes], clients: int, seconds: float,
               max_requests: int) -> dict:
    """`clients` concurrent clients, each posting one payload at a time until the time or the count runs out."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    stop_at = time.perf_counter() + seconds

    async def client(n: int, http: httpx.AsyncClient) -> None:
        nonlocal sent
        k = n
        while time.perf_counter() < stop_at and sent < max_requests:
            sent += 1
            data = payloads[k % len(payloads)]
            k += clients
            started = time.perf_counter()
            try:
                response = await http.post(route, files={field: ("q", data)})
                ok = response.status_code == 200 and all("hits" in r for r in response.json().get("results", []))
                if not ok:
                    errors[str(response.status_code)] = errors.get(str(response.status_code), 0) + 1
                    continue
            except httpx.HTTPError as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "answered": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


def batch_sizes(base: str) -> dict:
    import httpx

    text = httpx.get(base + "/metrics", timeout=30).text
    out = {}
    for model in ("sku", "speaker"):
        values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("mlprep_batch_size_") and f'model="{model}"' in line and "_bucket" not in line}
        count = values.get("mlprep_batch_size_count", 0)
        out[model] = round(values.get("mlprep_batch_size_sum", 0) / count, 2) if count else None
    return out


def main() -> None:
    from mlprep.devices import cpu_summary

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", help="a results folder holding sku_index and speaker_embed (default: build the "
                                          "demo's in a temporary folder)")
    parser.add_argument("--clients", type=int, nargs="+", default=[32], help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=15, help="each load phase's length (default 15 s)")
    parser.add_argument("--max-requests", type=int, default=5000, help="most requests per phase")
    parser.add_argument("--batch", type=int, default=64, help="the batched reference's batch (the server's "
                                                              "default --max-batch)")
    parser.add_argument("--encode-batch", type=int, default=8, help="the server's --encode-batch (default 8)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 2))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    images, audio = queries(), utterances()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = Path(args.results) if args.results else build_results(work)
        print(f"{cpu_summary()}, {args.threads} threads, device cpu; results {results}", flush=True)
        ref = references(results, images, audio, args.batch, args.threads, args.seconds / 3, args.encode_batch)
        print(json.dumps(ref, indent=1), flush=True)
        proc, base = start_server(results, args.threads, args.encode_batch, work / "serve.log")
        try:
            runs = {"sku": {}, "speaker": {}}
            for name, route, field, payloads in (("sku", "/api/sku/search?k=5", "images", images),
                                                 ("speaker", "/api/speaker/identify?k=5", "audio", audio)):
                asyncio.run(load(base, route, field, payloads, 4, 2, 200))  # warm-up
                for clients in sorted({1, *args.clients}):
                    runs[name][str(clients)] = asyncio.run(load(base, route, field, payloads, clients, args.seconds,
                                                                args.max_requests))
                    print(name, runs[name][str(clients)], flush=True)
            mean_batch = batch_sizes(base)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        # the same SKU load on a server that ranks by embeddings alone: what the geometric re-ranking costs
        proc, base = start_server(results, args.threads, args.encode_batch, work / "serve_plain.log", rerank=False)
        try:
            asyncio.run(load(base, "/api/sku/search?k=5", "images", images, 4, 2, 200))
            plain = asyncio.run(load(base, "/api/sku/search?k=5", "images", images, max(args.clients), args.seconds,
                                     args.max_requests))
            print("sku without re-ranking", plain, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    figures = {"cpu": cpu_summary(), "threads": args.threads, "device": "cpu", "batch": args.batch,
               "encode_batch": args.encode_batch,
               "references": ref, "load": runs, "mean_batch": mean_batch, "sku_without_rerank": plain}
    for name in ("sku", "speaker"):
        most = runs[name][str(max(args.clients))]
        one = runs[name]["1"]
        figures[name] = {"throughput_ratio": round(most["per_s"] / ref[name]["batched_per_s"], 3),
                         "p50_ratio": round(one["p50_ms"] / (1000 * ref[name]["one_s"]), 3),
                         "errors": sum(most["errors"].values()) + sum(one["errors"].values())}
    figures["sku"]["rerank_throughput_ratio"] = round(runs["sku"][str(max(args.clients))]["per_s"] / plain["per_s"], 3)
    print(json.dumps({k: figures[k] for k in ("sku", "speaker", "mean_batch")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
