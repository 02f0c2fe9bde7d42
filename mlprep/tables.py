"""Every parquet table the workflow writes, with its one declared Arrow schema.

A table's column types must not depend on the data: pandas infers `double` for an empty column, and
`large_string` or `string` depending on how a frame was built, so a gathered table would change type with the
shard count or when a shard is empty, and a reader that joins two runs would break. `write_parquet` therefore
takes a table name from TABLES, writes exactly these columns with exactly these types (a missing or extra column
is an error that names the table) and stores the name in the file's metadata, where `table_name` and the tests
find it.
"""

from __future__ import annotations

import pyarrow as pa

TEXT = pa.string()
I64 = pa.int64()
F64 = pa.float64()
F32 = pa.float32()
TIME = pa.timestamp("ns")


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(fields))


FAILURES = _schema(("item_id", TEXT), ("path", TEXT), ("stage", TEXT), ("reason_code", TEXT), ("reason", TEXT),
                   ("id", TEXT))

SKU_CATALOG = _schema(("item_id", TEXT), ("sku_id", TEXT), ("name", TEXT), ("category", TEXT), ("image", TEXT),
                      ("path", TEXT), ("shard", I64))
SKU_VIEWS = _schema(("item_id", TEXT), ("sku_id", TEXT), ("image", TEXT), ("view", pa.int32()),
                    ("augmentation", TEXT), ("content_hash", TEXT))

PROBE_ROWS = _schema(("item_id", TEXT), ("id", TEXT), ("file", TEXT), ("row_group", I64), ("group_row", I64),
                     ("row", I64), ("label", TEXT), ("prediction", TEXT), ("score", F64), ("correct", pa.bool_()))

SPEAKER_STATS = _schema(("speaker_key", TEXT), ("dataset", TEXT), ("speaker_id", TEXT), ("num_utterances", I64),
                        ("failed_utterances", I64), ("dropped_outliers", I64), ("utterance_list", pa.list_(TEXT)),
                        ("original_paths", pa.list_(TEXT)), ("embedding_dim", I64), ("spread", F64),
                        ("embedding_mean", F32), ("embedding_std", F32), ("embedding_min", F32),
                        ("embedding_max", F32))

VIDEO_CATALOG = _schema(("clip_id", TEXT), ("text", TEXT), ("clip", TEXT), ("path", TEXT), ("start", F64),
                        ("end", F64), ("split", TEXT), ("shard", I64))
VIDEO_CLIPS = _schema(("clip_id", TEXT), ("text", TEXT), ("n_frames", pa.int32()), ("status", TEXT),
                      ("repeated", pa.bool_()), ("note", TEXT))

KLINE_WINDOWS = _schema(("symbol", TEXT), ("end_pos", I64), ("end_date", TIME), ("known_date", TIME),
                        ("fwd_return", F64))

TABLES: dict[str, pa.Schema] = {
    "failures": FAILURES,
    # sku_index
    "sku.catalog": SKU_CATALOG,
    "sku.manifest": SKU_CATALOG.append(pa.field("listed", I64)),
    "sku.shard_views": SKU_VIEWS,
    "sku.views": _schema(("item_id", TEXT), ("sku_id", TEXT), ("name", TEXT), ("category", TEXT), ("image", TEXT),
                         ("view", pa.int32()), ("augmentation", TEXT), ("content_hash", TEXT)),
    # local features of catalog photos (geometric re-ranking): rows first..first+count of the points and
    # descriptors arrays beside the table
    "sku.local_features": _schema(("item_id", TEXT), ("sku_id", TEXT), ("image", TEXT), ("first", I64),
                                  ("count", I64)),
    "sku.shop_floor": _schema(("item_id", TEXT), ("sku_id", TEXT), ("image", TEXT), ("query", pa.int32()),
                              ("first", I64), ("count", I64)),
    # real query photos searched by the eval (sku_index.eval.queries)
    "sku.query_photos": _schema(("image", TEXT), ("sku_id", TEXT), ("in_catalog", pa.bool_()), ("status", TEXT),
                                ("reason_code", TEXT), ("error", TEXT), ("embedding_top", pa.list_(TEXT)),
                                ("reranked_top", pa.list_(TEXT)), ("inliers", I64), ("ranked_by", TEXT)),
    # the index's rows in the layout autofaiss and clip-retrieval read (embeddings/metadata/metadata_*.parquet)
    "sku.embedding_metadata": _schema(("image_path", TEXT), ("caption", TEXT), ("sku_id", TEXT), ("item_id", TEXT),
                                      ("view", pa.int32()), ("category", TEXT)),
    "sku.catalog_checks": _schema(("check", TEXT), ("sku_a", TEXT), ("item_a", TEXT), ("image_a", TEXT),
                                  ("sku_b", TEXT), ("item_b", TEXT), ("image_b", TEXT), ("score", F64),
                                  ("action", TEXT)),
    # probe_qa
    "probe.manifest": _schema(("item_id", TEXT), ("file", TEXT), ("row_group", I64), ("first_row", I64),
                              ("rows", I64), ("size", I64), ("stamp", TEXT)),
    "probe.probe": PROBE_ROWS,
    "probe.factors": _schema(*zip(PROBE_ROWS.names, PROBE_ROWS.types), ("factor", TEXT), ("explanation", TEXT),
                             ("verified", pa.bool_()), ("verify_reason", TEXT), ("factor_status", TEXT),
                             ("attempts", I64), ("model", TEXT), ("backend", TEXT), ("prompt_hash", TEXT)),
    # speaker_embed
    "speaker.manifest": _schema(("item_id", TEXT), ("dataset", TEXT), ("speaker_id", TEXT), ("utterance_id", TEXT),
                                ("path", TEXT), ("shard", I64), ("size", I64), ("stamp", TEXT),
                                ("duration_s", F64)),
    "speaker.utterances": _schema(("item_id", TEXT), ("dataset", TEXT), ("speaker_id", TEXT), ("utterance_id", TEXT),
                                  ("speaker_key", TEXT), ("path", TEXT), ("duration_s", F64)),
    "speaker.skipped": _schema(("speaker_key", TEXT), ("dataset", TEXT), ("speaker_id", TEXT),
                               ("num_utterances", I64), ("failed_utterances", I64), ("reason", TEXT)),
    "speaker.shard_speakers": SPEAKER_STATS,
    # the embedding's length is the model's: `speakers_schema(dim)` is this table's schema for that model
    "speaker.speakers": SPEAKER_STATS.append(pa.field("embedding", pa.list_(F32, 1))),
    # video_frames
    "video.catalog": VIDEO_CATALOG,
    "video.shard_index": _schema(*zip(VIDEO_CLIPS.names, VIDEO_CLIPS.types), ("reason_code", TEXT), ("path", TEXT)),
    "video.index": _schema(*zip(VIDEO_CLIPS.names, VIDEO_CLIPS.types), ("split", TEXT), ("pkl", TEXT),
                           ("reason_code", TEXT)),
    # kline_factor
    "kline.manifest": _schema(("symbol", TEXT), ("path", TEXT), ("shard", I64), ("size", I64), ("mtime_ns", I64)),
    "kline.windows": KLINE_WINDOWS,
    "kline.series_checks": _schema(("check", TEXT), ("symbol_a", TEXT), ("symbol_b", TEXT), ("common_bars", I64),
                                   ("return_corr", F64), ("log_price_gap", F64), ("action", TEXT)),
    "kline.factor": _schema(("date", TIME), ("asset", TEXT), ("win_rate", F64), ("mean_fwd_return", F64),
                            ("n_matches", I64), ("mean_similarity", F64)),
}

# tables whose one column's length depends on the model: (table, column)
SIZED_COLUMNS = {"speaker.speakers": "embedding"}
TABLE_KEY = b"mlprep.table"


def speakers_schema(dim: int) -> pa.Schema:
    """speakers.parquet for a model whose embeddings have `dim` values."""
    schema = TABLES["speaker.speakers"]
    return schema.set(schema.get_field_index("embedding"), pa.field("embedding", pa.list_(F32, max(dim, 1))))


def schema_of(name: str) -> pa.Schema:
    if name not in TABLES:
        raise KeyError(f"no declared table {name!r} (mlprep/tables.py declares: {', '.join(sorted(TABLES))})")
    return TABLES[name]


def to_arrow(frame, name: str) -> pa.Table:
    """A DataFrame as table `name`: its declared columns in order, cast to their declared types. A column that
    is missing, or one the declaration does not hold, is an error naming both."""
    schema = schema_of(name)
    have, want = list(frame.columns), schema.names
    missing, extra = [c for c in want if c not in have], [c for c in have if c not in want]
    if missing or extra:
        raise ValueError(f"table {name!r}: " + "; ".join(
            part for part in (f"missing column(s) {missing}" if missing else "",
                              f"undeclared column(s) {extra} (declare them in mlprep/tables.py)" if extra else "")
            if part))
    if not len(frame):
        return schema.empty_table()
    return pa.Table.from_pandas(frame[want], schema=schema, preserve_index=False)


def named(table: pa.Table, name: str, extra: dict[bytes, bytes] | None = None) -> pa.Table:
    """`table` with its declared name (and `extra`) as its only schema metadata: no pandas note, whose dtype names
    some readers cannot read back."""
    return table.replace_schema_metadata({TABLE_KEY: name.encode(), **(extra or {})})


def table_name(schema: pa.Schema) -> str | None:
    raw = (schema.metadata or {}).get(TABLE_KEY)
    return raw.decode() if raw else None


def conforms(schema: pa.Schema, name: str) -> list[str]:
    """What differs between a written file's schema and table `name`'s declaration ([] when nothing)."""
    declared = schema_of(name)
    problems = []
    if schema.names != declared.names:
        problems.append(f"columns {schema.names} != declared {declared.names}")
    for field in declared:
        if field.name not in schema.names:
            continue
        got = schema.field(field.name).type
        if SIZED_COLUMNS.get(name) == field.name:
            ok = pa.types.is_fixed_size_list(got) and got.value_type == field.type.value_type
        else:
            ok = got == field.type
        if not ok:
            problems.append(f"{field.name}: {got} != declared {field.type}")
    return problems
