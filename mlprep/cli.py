"""The `mlprep` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict


def _search_sku(args: argparse.Namespace) -> int:
    from mlprep.sku.search import SkuSearcher

    searcher = SkuSearcher(args.index, device=args.device, threads=args.threads, rerank=not args.no_rerank)
    hits, failed = searcher.search(args.images, k=args.k)
    for failure in failed:
        print(f"mlprep: error: {failure.error}", file=sys.stderr)
    if args.json:
        for hit in hits:
            print(json.dumps(asdict(hit)))
        for failure in failed:
            print(json.dumps(asdict(failure)))
    else:
        current = None
        for hit in hits:
            if hit.query != current:
                current = hit.query
                print(current)
            verified = f"  {hit.inliers} inliers" if hit.ranked_by == "geometry" else ""
            print(f"  {hit.rank:>2}. {hit.sku_id:<20} {hit.score:.4f}  {hit.name} [{hit.category}]{verified}")
    if failed:
        print(f"mlprep: {len(failed)} of {len(args.images)} query images could not be read", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    import ipaddress
    import os

    import uvicorn

    from mlprep.serve.app import ServeSettings, create_app

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"mlprep: error: --token-env {args.token_env}: that environment variable is not set", file=sys.stderr)
            return 2
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not token:
        print(f"mlprep: warning: serving on {args.host} without a token: anyone who reaches this port can query the "
              f"artefacts (set --token-env NAME to require a bearer token)", file=sys.stderr)
    settings = ServeSettings(results=args.results, token=token, device=args.device, threads=args.threads,
                             max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                             max_image_pixels=args.max_image_pixels, max_audio_seconds=args.max_audio_seconds,
                             max_batch=args.max_batch, encode_batch=args.encode_batch,
                             batch_wait_ms=args.batch_wait_ms, reload_s=args.reload_s,
                             cors_origins=args.cors_origin or [], speaker_threshold=args.speaker_threshold,
                             rerank=not args.no_rerank)
    logging.getLogger("mlprep").setLevel(logging.INFO)
    access = logging.getLogger("mlprep.serve.access")  # one JSON object per line, nothing around it
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False
    uvicorn.run(create_app(settings), host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


def _cosine(text: str) -> float:
    value = float(text)
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a cosine threshold lies in [-1, 1], got {text}")
    return value


def _batch_size(text: str) -> int | str:
    return text if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlprep",
        description="Tools around the mlprep workflow's artefacts. Exit status: 0 all answered, 1 some query "
                    "images could not be read (the others are answered), 2 bad arguments or index.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    search = sub.add_parser("search-sku", help="top-k SKUs for query images, from a built sku_index")
    search.add_argument("--index", required=True, help="index.faiss written by the workflow (results/sku_index/)")
    search.add_argument("--k", type=_positive_int, default=5, help="SKUs to print per image (default 5, at least 1)")
    search.add_argument("--device", default=None, help="auto|cpu|cuda[:i] (default: what built the index)")
    search.add_argument("--threads", type=int, default=2, help="CPU threads for the model (default 2)")
    search.add_argument("--json", action="store_true",
                        help="one JSON object per hit instead of a table, and one {query, reason_code, error} per "
                             "unreadable image")
    search.add_argument("--no-rerank", action="store_true",
                        help="rank by embeddings alone (default: the top candidates are re-ranked geometrically where "
                             "the index has its photos' local features; rerank.* in the config)")
    search.add_argument("images", nargs="+", help="query image files")
    search.set_defaults(func=_search_sku)

    serve = sub.add_parser("serve", help="the results folder as an HTTP API and a web page",
                           description="Serve every pipeline's artefacts under --results: SKU search, speaker "
                                       "identification and verification, K-line matches, probe failures and QA, "
                                       "clips; OpenAPI docs at /docs. Artefacts the workflow rewrites are reloaded.")
    serve.add_argument("--results", default="results", help="the workflow's results folder (default results)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-env", help="an environment variable holding a token every API call must send as "
                                           "`Authorization: Bearer <token>`")
    serve.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda[:i] or auto")
    serve.add_argument("--threads", type=int, default=2, help="CPU threads for the models (default 2)")
    serve.add_argument("--max-upload-mb", type=float, default=20, help="largest request body (default 20 MB)")
    serve.add_argument("--max-image-pixels", type=int, default=40_000_000,
                       help="larger query images are refused before decoding (default 40 MP)")
    serve.add_argument("--max-audio-seconds", type=float, default=120, help="longest recording accepted (120 s)")
    serve.add_argument("--no-rerank", action="store_true",
                       help="answer SKU searches by embeddings alone (default: the top candidates are re-ranked "
                            "geometrically where the index has its photos' local features)")
    serve.add_argument("--speaker-threshold", type=_cosine, default=None,
                       help="the cosine at and above which speaker verification says 'same speaker' (default: "
                            "the one speaker_embed's eval.json chose, see speaker_embed.eval.threshold)")
    serve.add_argument("--max-batch", type=int, default=64, help="most queries per model batch (default 64)")
    serve.add_argument("--encode-batch", type=_batch_size, default=8,
                       help="images per forward pass of the image model (fixed: a query's answer never depends on "
                            "what shared its pass; a lone query pays for a whole pass; default 8, 'auto': the "
                            "device's batch, e.g. 512 on CUDA)")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="how long a batch that is not full waits for more queries (default 2 ms)")
    serve.add_argument("--reload-s", type=float, default=2.0, help="how often to look for rewritten artefacts "
                                                                   "(default 2 s; 0: never)")
    serve.add_argument("--cors-origin", action="append", help="an origin allowed to call the API from a browser "
                                                              "(repeatable; default none)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"mlprep: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
