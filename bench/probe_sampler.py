"""Benchmark of the failure-key sampler (mlprep.probe.sampler) at scale (`make bench`).

`--rows` synthetic failure rows (label and prediction from `--labels` classes, a factor from 20) are written to
one parquet file in row groups of 1M (not timed); the sampler streams the file one row group at a time in a
fresh process, whose wall time and peak resident memory (VmHWM) are reported.
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
        table = pa.table({"file": pa.array(np.full(n, f"part-{start // 2_000_000:05d}.parquet")),
                          "row": pa.array(np.arange(start, start + n)),
                          "label": pa.array(names[rng.integers(0, labels, n)]),
                          "prediction": pa.array(names[rng.integers(0, labels, n)]),
                          "factor": pa.array(factors[rng.integers(0, 20, n)])})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1_000_000)
    writer.close()


def worker(path: str, per_key: int, key_by: str) -> None:
    from mlprep.probe.sampler import KeySampler

    started = time.perf_counter()
    source = pq.ParquetFile(path)
    sampler = KeySampler(per_key, seed=7, key_by=key_by)
    for group in range(source.num_row_groups):
        sampler.add(source.read_row_group(group).to_pandas())
    sample = sampler.result()
    seconds = time.perf_counter() - started
    peak = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "keys": int(sample["key"].nunique()),
                      "sampled": len(sample)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--per-key", type=int, default=10)
    parser.add_argument("--key-by", default="labels")
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
                              capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"failure-key sampler on {cpu_summary()}: {args.rows:,} failure rows, {result['keys']:,} keys "
          f"({args.key_by}), {args.per_key} per key -> {result['sampled']:,} sampled in {result['seconds']:.1f} s, "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB (targets: 60 s, 2 GiB)")


if __name__ == "__main__":
    main()
