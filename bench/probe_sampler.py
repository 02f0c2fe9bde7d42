"""Benchmark of the sampler step (rule probe_sample: mlprep.probe.samples.sample) at scale (`make bench`).

`--rows` synthetic failure cases in the layout of failure_cases.parquet (label and prediction from `--labels`
classes, a verified factor from 20) are written to one parquet file in row groups of 1M (not timed); the step
streams it through the failure-key sampler, reads the sampled rows' details in a second streamed pass and writes
samples.jsonl and the QA shard lists, in a fresh process whose wall time and peak resident memory (VmHWM) are
reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_failures(path: Path, rows: int, labels: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    names = np.array([f"class_{k:03d}" for k in range(labels)])
    factors = np.array([f"factor_{k:02d}" for k in range(20)])
    writer = None
    for start in range(0, rows, 1_000_000):
        n = min(1_000_000, rows - start)
        file = f"part-{start // 2_000_000:05d}.parquet"
        in_file = np.arange(start, start + n) % 2_000_000
        table = pa.table({"item_id": pa.array([f"{file}:{r}" for r in in_file.tolist()]),
                          "id": pa.array([f"img{r:08d}" for r in range(start, start + n)]),  # the data set's own id
                          "file": pa.array(np.full(n, file)), "row_group": pa.array(in_file // 1000),
                          "group_row": pa.array(in_file % 1000), "row": pa.array(in_file),
                          "label": pa.array(names[rng.integers(0, labels, n)]),
                          "prediction": pa.array(names[rng.integers(0, labels, n)]),
                          "score": pa.array(rng.random(n)),
                          "factor": pa.array(factors[rng.integers(0, 20, n)]),
                          "explanation": pa.array(np.full(n, "the shape is hidden")),
                          "verified": pa.array(np.ones(n, bool)), "factor_status": pa.array(np.full(n, "verified"))})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1_000_000)
    writer.close()


def worker(path: str, per_key: int, key_by: str) -> None:
    from mlprep.probe.samples import sample

    folder = Path(path).parent
    cfg = {"data_dir": str(folder), "image_column": "image", "images_dir": None, "qa": {"shards": 64},
           "sampler": {"per_key": per_key, "key_by": key_by, "embed_images": False}}
    outputs = {"samples": folder / "samples.jsonl", "qa_lists": folder / "qa_lists", "stats": folder / "stats.json",
               "failures": folder / "sample_failures.parquet"}
    started = time.perf_counter()
    stats = sample(path, cfg, 7, True, outputs)
    seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "keys": stats["keys"], "sampled": stats["sampled"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--per-key", type=int, default=10)
    parser.add_argument("--key-by", default="labels")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    from mlprep.devices import cpu_summary

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "failures.parquet"
        write_failures(path, args.rows, args.labels)
        done = subprocess.run([sys.executable, __file__, "--worker", str(path), str(args.per_key), args.key_by],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the sampler step failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"sampler step on {cpu_summary()}: {args.rows:,} failure rows, {result['keys']:,} keys "
          f"({args.key_by}), {args.per_key} per key -> {result['sampled']:,} sampled in {result['seconds']:.1f} s, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB (targets: 60 s, 2 GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "rows": args.rows}))


if __name__ == "__main__":
    main()
