"""What the Snakemake DAG needs to know about speaker_embed (mlprep.shardwork): a new speaker reruns only its
shard, because all of a speaker's utterances share one (mlprep.speaker.corpus)."""

from __future__ import annotations

from mlprep.shardlists import cached_count
from mlprep.shardwork import ShardedPipeline
from mlprep.speaker.corpus import LIST_COLUMNS, count_utterances

# Keys that change a shard's embeddings: a change reruns every shard.
EMBED_KEYS = ("input", "parquet_column", "backend", "weights", "source", "length_quantum_s", "batch_size", "min_seconds",
              "embedding_dim", "trust_pickles", "min_utterances", "normalize", "outlier_std")


class SpeakerWorkflow(ShardedPipeline):
    pipeline = "speaker_embed"
    columns = LIST_COLUMNS

    def count_items(self) -> int:
        if self.cfg.get("manifest"):  # remembered while the manifest file is unchanged
            return cached_count(self.lists_dir, self.cfg["manifest"], lambda _: count_utterances(self.cfg))
        # a folder: scanned (a million files: seconds); containers: their index, cached per container
        return count_utterances(self.cfg, self.storage, self.lists_dir)

    @property
    def storage(self) -> dict | None:
        return self.config.get("object_storage")

    def sync_payload(self) -> dict:
        return {"cfg": self.cfg, "storage": self.storage}

    def embed_settings(self) -> dict:
        return {k: self.cfg.get(k) for k in EMBED_KEYS}
