"""What the Snakemake DAG needs to know about probe_qa (mlprep.shardwork): probe shards over row groups, a new
parquet file reruns only the shards its row groups land in; the label set is part of every probe shard's
fingerprint. The QA shards are cut by the sampler (their count is `qa.shards`), after it has run."""

from __future__ import annotations

from mlprep.probe.catalog import LABELS_FILE, LIST_COLUMNS, count_row_groups, labels_digest, with_storage
from mlprep.sharding import shard_names
from mlprep.shardlists import file_digest, list_path
from mlprep.shardwork import ShardedPipeline

# Keys whose change alters what a probe shard writes (a change reruns every probe shard).
PROBE_KEYS = ("image_column", "label_column", "id_column", "images_dir", "probe")
# LLM settings that change an answer (concurrency, limits and retries do not).
ANSWER_KEYS = ("backend", "base_url", "model", "temperature", "max_tokens")


class ProbeWorkflow(ShardedPipeline):
    pipeline = "probe_qa"
    columns = LIST_COLUMNS

    def count_items(self) -> int:
        return count_row_groups(with_storage(self.config), self.lists_dir)

    def sync_payload(self) -> dict:
        return {"cfg": with_storage(self.config)}

    @property
    def labels_path(self) -> str:
        return f"{self.lists_dir}/{LABELS_FILE}"

    def shard_fingerprint(self, wildcards) -> str:
        """The shard's list and the label set."""
        if not self.main_process:
            return file_digest(list_path(self.lists_dir, wildcards.shard)) + labels_digest(self.lists_dir)
        return self.fingerprints()[wildcards.shard] + labels_digest(self.lists_dir)

    def answer_settings(self) -> dict:
        llm = self.cfg["llm"]
        return {k: llm.get(k) for k in ANSWER_KEYS}

    def probe_settings(self) -> dict:
        settings = {k: self.cfg.get(k) for k in PROBE_KEYS}
        if self.cfg["probe"]["backend"] in ("classifier", "clip_zero_shot"):
            settings["jpeg_decoder"] = self.config["jpeg_decoder"]
        if self.cfg["probe"]["backend"] == "openai":
            settings["llm"] = self.answer_settings()
        return settings

    def factor_settings(self) -> dict:
        return {"factors": self.cfg["factors"], "llm": self.answer_settings(), "image_column": self.cfg["image_column"]}

    def qa_settings(self) -> dict:
        return {"qa": self.cfg["qa"], "llm": self.answer_settings(), "image_column": self.cfg["image_column"]}

    @property
    def qa_shards(self) -> list[str]:
        return shard_names(int(self.cfg["qa"]["shards"]))

    def probe_dirs(self, wildcards=None) -> list[str]:
        return self.shard_dirs()

    def factor_dirs(self, wildcards=None) -> list[str]:
        return [f"{self.dir}/factors/{shard}" for shard in self.shards]

    def qa_dirs(self, wildcards=None) -> list[str]:
        return [f"{self.dir}/qa/{shard}" for shard in self.qa_shards]
