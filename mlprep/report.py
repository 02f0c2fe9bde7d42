"""The whole-workflow overview: one self-contained HTML page (and a throughput chart) that `snakemake --report`
embeds beside every pipeline's own plots.

Per enabled pipeline: its few headline figures in words, against their reference and naming the model and weights
that made them (the full eval or summary JSON, flattened, folded below them), its eval plot, a table of items
ok / failed / skipped per rule (from the manifests, the shard stats and the checks), its failures by stage and
reason with the first rows, and the throughput of each rule from the `benchmark:` files (wall seconds per job,
items per second where the shard stats count the items). Every value from the data is HTML-escaped: item ids and
paths come from users' files.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mlprep.io import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineView:
    title: str
    metrics: str  # the JSON whose values are the headline
    plot: str
    # shard-stats folder under the pipeline's results -> (rule, benchmark file prefix)
    shard_rules: dict[str, tuple[str, str]] = field(default_factory=dict)
    extra_failures: tuple[str, ...] = ()  # JSONL files of failure records beside failures.parquet


VIEWS = {
    "sku_index": PipelineView("product images -> augmented image embeddings -> FAISS index", "eval.json", "eval.png",
                              {"shards": ("sku_encode_shard", "encode")}),
    "video_frames": PipelineView("video-text pairs -> CLIP4MC frame shards", "summary.json", "contact_sheet.png"),
    "speaker_embed": PipelineView("speech -> utterance and speaker embeddings", "eval.json", "eval.png",
                                  {"shards": ("speaker_embed_shard", "embed")}),
    "kline_factor": PipelineView("price files -> pattern library -> win-rate factor", "eval.json", "eval.png",
                                 {"shards": ("kline_library_shard", "library")}),
    "probe_qa": PipelineView("parquet images -> probe -> failure factors -> sample -> QA pairs", "summary.json",
                             "summary.png", {"shards": ("probe_shard", "probe"), "factors": ("probe_factors", "factors"),
                                             "qa": ("probe_qa_shard", "qa")}, ("qa_failures.jsonl",)),
}
MAX_METRICS = 40
MAX_FAILURE_ROWS = 25


def flatten(value, prefix: str = "", depth: int = 3) -> dict[str, object]:
    """Scalar leaves of nested dicts as 'a.b.c' keys (lists summarised by their length)."""
    out: dict[str, object] = {}
    if isinstance(value, dict) and depth:
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}.", depth - 1))
    elif isinstance(value, list):
        out[prefix.rstrip(".")] = f"[{len(value)} items]"
    else:
        out[prefix.rstrip(".")] = value
    return out


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _weights(identity: dict | None) -> str:
    if not identity:
        return "model not recorded"
    name = f"{identity.get('family')} {identity.get('name')}"
    if not identity.get("pretrained"):
        return f"{name} with RANDOM weights (no semantics: set the model's pretrained)"
    digest = identity.get("checkpoint_sha256")
    return f"{name}, weights {identity['pretrained']}" + (f" (sha256 {digest[:12]})" if digest else "")


def headlines(name: str, folder: Path) -> list[str]:
    """The pipeline's few figures a reader needs, in words, each against its reference."""
    data = _read_json(folder / VIEWS[name].metrics)
    if not data:
        return ["not evaluated yet"]
    if name == "sku_index":
        info = _read_json(folder / "index_info.json")
        aug, orig = data.get("augmented_index") or {}, data.get("originals_only_exact") or {}
        floor = data.get("shop_floor") or {}
        lines = []
        photos = data.get("query_photos") or {}
        if photos:  # the users' own photos first
            reranked = photos.get("reranked") or {}
            lines.append(f"your query photos: top-1 {_num(reranked.get('top1'))} re-ranked, "
                         f"{_num((photos.get('embedding') or {}).get('top1'))} by embeddings alone (top-5 "
                         f"{_num(reranked.get('top5'))}) on {photos.get('n_queries')} photos "
                         f"({photos.get('n_failed')} unreadable, counted as misses)")
        if floor.get("n_queries"):  # the harder figure first: what a user's photos get
            reranked = floor.get("reranked") or {}
            lines.append(f"shop-floor photos: top-1 {_num(reranked.get('top1'))} re-ranked, "
                         f"{_num((floor.get('embedding') or {}).get('top1'))} by embeddings alone (top-5 "
                         f"{_num(reranked.get('top5'))}) on {floor['n_queries']} queries, each searched with its own "
                         f"photo left out")
        lines.append(f"top-1 {_num(aug.get('top1'))} (top-5 {_num(aug.get('top5'))}) on {data.get('n_queries')} "
                     f"held-out augmented views of {data.get('n_skus')} SKUs (the index's own augmentation family: an "
                     f"upper bound); an index of the original photos only: top-1 {_num(orig.get('top1'))}; chance is "
                     f"{_num(1 / data['n_skus']) if data.get('n_skus') else '-'}")
        return lines + [f"made by {_weights(info.get('model_identity'))}"]
    if name == "speaker_embed":
        return [f"held-out identification top-1 {_num(data.get('top1'))}, EER {_num(data.get('eer'), 3)}, minDCF "
                f"{_num(data.get('min_dcf'), 3)} on {data.get('held_out')} held-out utterances of {data.get('speakers')} "
                f"speakers (chance top-1 {_num(1 / data['speakers']) if data.get('speakers') else '-'}, chance EER 0.5)"]
    if name == "kline_factor":
        factor, base = data.get("factor") or {}, data.get("baseline") or {}
        return [f"IC {_num(factor.get('ic'), 3)}, t {_num(factor.get('ic_t_stat'), 1)} over {factor.get('samples')} "
                f"sample points, against {_num(base.get('ic'), 3)} (t {_num(base.get('ic_t_stat'), 1)}) for as many "
                f"random matches known at each date; mean daily IC {_num(factor.get('mean_daily_ic'), 3)} "
                f"({_num(base.get('mean_daily_ic'), 3)} random)"]
    if name == "video_frames":
        splits = data.get("splits") or {}
        ok = sum(s.get("clips_ok", 0) for s in splits.values())
        failed = sum(s.get("clips_failed", 0) for s in splits.values())
        per_split = ", ".join(f"{split}: {counts.get('clips_ok', 0)}" for split, counts in splits.items())
        frames = sum(s.get("frames", 0) for s in splits.values())
        return [f"{ok} clips made into {frames} frames ({per_split}); {failed} clips failed"]
    if name == "probe_qa":
        probe, qa = (data.get("steps") or {}).get("probe") or {}, (data.get("steps") or {}).get("qa") or {}
        labels = len(data.get("failure_rate_per_label") or {})
        stats = [_read_json(p) for p in sorted((folder / "shards").glob("*/stats.json"))]
        model = next((s.get("model") for s in stats if s.get("model")), None)
        backend = stats[0].get("backend") if stats else None
        by = _weights(model) if model else f"the {backend} backend"
        return [f"probe accuracy {_num(probe.get('accuracy'))} on {probe.get('images')} images of {labels} labels "
                f"(chance {_num(1 / labels) if labels else '-'}): {probe.get('misclassified')} failures, "
                f"{qa.get('records')} QA pairs made from the sampled ones", f"probed by {by}"]
    return []


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p class='missing'>{html.escape(path.name)} was not made</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.is_file() else 0


def rule_counts(name: str, folder: Path) -> list[list[object]]:
    """rule, jobs, items ok, failed, skipped for the pipeline's manifest, shard rules and check."""
    rows = [[f"{name.split('_')[0]}_manifest", 1, _rows(folder / "manifest.parquet"),
             _rows(folder / "manifest_failures.parquet"), 0]]
    for sub, (rule, _) in VIEWS[name].shard_rules.items():
        stats = [_read_json(p) for p in sorted((folder / sub).glob("*/stats.json"))]
        rows.append([rule, len(stats), *(sum(int(s.get(f"items_{k}", 0) or 0) for s in stats)
                                         for k in ("ok", "failed", "skipped"))])
    if name == "video_frames":  # its shards write pkl + index files; the summary counts them per split
        for split, counts in (_read_json(folder / "summary.json").get("splits") or {}).items():
            rows.append([f"video_extract_shard ({split})", counts.get("shards", 0), counts.get("clips_ok", 0),
                         counts.get("clips_failed", 0), 0])
    check = _read_json(folder / "check.json")
    if check:
        rows.append([f"{name.split('_')[0]}_check (whole pipeline)", 1, check.get("items_ok"),
                     check.get("items_failed"), 0])
    return rows


def failure_tables(folder: Path, extra: tuple[str, ...]) -> tuple[str, int]:
    frames = []
    if (folder / "failures.parquet").is_file():
        frames.append(pd.read_parquet(folder / "failures.parquet"))
    for name in extra:
        path = folder / name
        if path.is_file():
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            frames.append(pd.DataFrame({"item_id": [f"{r['item_id']}#{r['k']}" for r in records],
                                        "path": [r["source"]["file"] for r in records], "stage": "qa",
                                        "reason_code": [r["reason_code"] for r in records],
                                        "reason": [r["reason"] for r in records]}))
    failures = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["item_id", "path", "stage", "reason_code", "reason"])
    if not len(failures):
        return "<p>No failures.</p>", 0
    counts = failures.groupby(["stage", "reason_code"]).size().reset_index(name="n").sort_values(
        "n", ascending=False, kind="stable")
    first = failures.head(MAX_FAILURE_ROWS)
    more = f"<p>... and {len(failures) - len(first)} more.</p>" if len(failures) > len(first) else ""
    return (_table(["stage", "reason code", "failures"], counts.to_numpy().tolist())
            + _table(["item", "path", "stage", "reason code", "reason"], first.astype(str).to_numpy().tolist())
            + more), len(failures)


def throughput(results: Path, pipelines: list[str]) -> pd.DataFrame:
    """pipeline, rule, jobs, seconds (sum of the jobs' wall time), items, items/s, max RSS MiB."""
    out = []
    for name in pipelines:
        bench_dir = results / "benchmarks" / name
        if not bench_dir.is_dir():
            continue
        by_prefix: dict[str, list[pd.DataFrame]] = {}
        for path in sorted(bench_dir.glob("*.tsv")):
            stem = path.stem
            prefix = stem.rsplit("_", 1)[0] if "-of-" in stem else stem
            frame = pd.read_csv(path, sep="\t").assign(shard=stem.rsplit("_", 1)[-1] if "-of-" in stem else "")
            by_prefix.setdefault(prefix, []).append(frame)
        items_by_prefix = {}
        for sub, (rule, prefix) in VIEWS[name].shard_rules.items():
            stats = [_read_json(p) for p in (results / name / sub).glob("*/stats.json")]
            items_by_prefix[prefix] = sum(int(s.get("items_ok", 0) or 0) + int(s.get("items_failed", 0) or 0)
                                          for s in stats)
        for prefix, frames in sorted(by_prefix.items()):
            frame = pd.concat(frames)
            seconds = float(frame["s"].sum())
            items = items_by_prefix.get(prefix)
            out.append({"pipeline": name, "rule": prefix, "jobs": len(frame), "seconds": round(seconds, 2),
                        "items": items, "items_per_s": round(items / seconds, 2) if items and seconds else None,
                        "max_rss_mib": round(float(frame["max_rss"].max()), 1)})
    return pd.DataFrame(out, columns=["pipeline", "rule", "jobs", "seconds", "items", "items_per_s", "max_rss_mib"])


def plot_throughput(table: pd.DataFrame, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p}: {r}" for p, r in zip(table["pipeline"], table["rule"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3, 0.35 * len(labels) + 1)), sharey=True)
    y = range(len(labels))
    left.barh(y, table["seconds"], color="#4c72b0")
    left.set_yticks(list(y), labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("wall seconds (all jobs of the rule)")
    rate = table["items_per_s"].fillna(0)
    right.barh(y, rate, color="#55a868")
    right.set_xlabel("items per second (shard rules)")
    for k, value in enumerate(table["items_per_s"]):
        right.text(0, k, "" if pd.isna(value) else f" {value:g}", va="center", fontsize=7)
    fig.suptitle("throughput per rule, from the benchmark files")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{border-bottom:2px solid #4c72b0}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f0f3f8}img{max-width:100%;border:1px solid #eee}.missing{color:#a33}nav a{margin-right:1em}
.headline{font-size:1.15em;line-height:1.5}.headline li{margin:.2em 0}details{margin:.5em 0}summary{cursor:pointer}
"""


def write_overview(results: Path | str, pipelines: list[str], out_html: Path | str, out_png: Path | str) -> dict:
    results = Path(results)
    table = throughput(results, pipelines)
    with atomic_path(out_png) as tmp:
        plot_throughput(table, tmp)
    parts = [f"<h1>mlprep: the whole workflow</h1><nav>{''.join(f'<a href=#{p}>{p}</a>' for p in pipelines)}</nav>"]
    totals = {}
    for name in pipelines:
        view, folder = VIEWS[name], results / name
        metrics = flatten(_read_json(folder / view.metrics))
        shown = list(metrics.items())[:MAX_METRICS]
        failures_html, n_failures = failure_tables(folder, view.extra_failures)
        totals[name] = n_failures
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in headlines(name, folder))
        parts.append(
            f"<section id='{name}'><h2>{name}</h2><p>{html.escape(view.title)}</p>"
            f"<ul class='headline'>{lines}</ul>"
            f"<details><summary>all metrics ({html.escape(view.metrics)}, {len(metrics)} values)</summary>"
            f"{_table(['metric', 'value'], [list(m) for m in shown])}</details>"
            f"<h3>plot</h3>{_image(folder / view.plot, name)}"
            f"<h3>items per rule</h3>{_table(['rule', 'jobs', 'ok', 'failed', 'skipped'], rule_counts(name, folder))}"
            f"<h3>failures ({n_failures})</h3>{failures_html}</section>")
    rows = table.astype(object).where(table.notna(), "").to_numpy().tolist()
    parts.append("<section id='throughput'><h2>throughput per rule</h2>"
                 + _table(list(table.columns), rows) + _image(Path(out_png), "throughput") + "</section>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mlprep overview</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    log.info("overview of %s: %d rules benchmarked, failures %s", ", ".join(pipelines), len(table), totals)
    return {"pipelines": pipelines, "failures": totals, "rules": len(table)}
