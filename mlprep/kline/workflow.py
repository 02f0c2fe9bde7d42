"""What the Snakemake DAG needs to know about kline_factor (mlprep.shardwork): appending bars to a symbol's
file or adding a symbol reruns only its library shard, then the cheap gather, factor and evaluation."""

from __future__ import annotations

from mlprep.kline.catalog import LIST_COLUMNS, count_symbols
from mlprep.shardwork import ShardedPipeline

# Keys that change a library shard's windows or embeddings: a change reruns every shard.
LIBRARY_KEYS = ("window", "stride", "horizon", "adjusted", "channels", "embedding", "chart")


class KlineWorkflow(ShardedPipeline):
    pipeline = "kline_factor"
    columns = LIST_COLUMNS

    def count_items(self) -> int:
        return count_symbols(self.cfg)

    def sync_payload(self) -> dict:
        return {"cfg": self.cfg}

    def library_settings(self) -> dict:
        return {k: self.cfg.get(k) for k in LIBRARY_KEYS}
