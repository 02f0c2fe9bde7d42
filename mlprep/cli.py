"""The `mlprep` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict


def _search_sku(args: argparse.Namespace) -> int:
    from mlprep.sku.search import SkuSearcher

    searcher = SkuSearcher(args.index, device=args.device, threads=args.threads)
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
            print(f"  {hit.rank:>2}. {hit.sku_id:<20} {hit.score:.4f}  {hit.name} [{hit.category}]")
    if failed:
        print(f"mlprep: {len(failed)} of {len(args.images)} query images could not be read", file=sys.stderr)
        return 1
    return 0


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
    search.add_argument("images", nargs="+", help="query image files")
    search.set_defaults(func=_search_sku)
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
