"""Snakemake entry: decode, augment and encode one shard of SKU images (rule sku_encode_shard)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # noqa: F821 - the repo root, for conda envs

from mlprep.logs import log_to_file  # noqa: E402
from mlprep.sku.encode import encode_shard  # noqa: E402

sm = snakemake  # noqa: F821
progress = log_to_file(sm.log[0])
encode_shard(
    shard_text=sm.wildcards.shard,
    list_path=sm.params.shard_list,
    cfg=sm.config["sku_index"],
    seed=sm.config["seed"],
    device_spec=sm.config["device"],
    precision_spec=sm.config["precision"],
    jpeg_decoder=sm.config["jpeg_decoder"],
    storage=sm.config["object_storage"],
    shop_floor_share=sm.params.settings["shop_floor_share"],
    continue_on_error=sm.config["continue_on_error"],
    threads=sm.threads,
    out_dir=sm.output[0],
    progress=progress,
)
