"""probe_qa's cheap steps: manifest, gather (probe + factor shards), check, and the summary with its plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from mlprep.failures import FailureLog, check_failed_share, count_by_code, read_failures, write_failures
from mlprep.io import atomic_path, read_json, write_json, write_parquet
from mlprep.probe.catalog import scan
from mlprep.probe.factors import FACTOR_COLUMNS
from mlprep.probe.factors import SHARD_FILES as FACTOR_FILES
from mlprep.probe.probe import SHARD_FILES as PROBE_FILES
from mlprep.probe.qa import SHARD_FILES as QA_FILES
from mlprep.probe.zero_shot import PROBE_COLUMNS
from mlprep.storage import is_remote

log = logging.getLogger(__name__)


def manifest(cfg: dict, n_shards: int, continue_on_error: bool, outputs: dict, lists_dir=None) -> None:
    """Every row group with its rows; unreadable and empty files as failures. `lists_dir`: where the shard
    lists' refresh cached the footers and label sets, so that nothing is read from the files a second time."""
    catalog = scan(cfg, lists_dir)
    failures = FailureLog(continue_on_error)
    failures.extend(catalog.failures)
    write_parquet(catalog.frame, outputs["manifest"], "probe.manifest")
    write_failures(failures.records, outputs["failures"])
    log.info("%d row groups (%d rows) of %d files in %d shards, %d labels, %d failures", len(catalog.frame),
             int(catalog.frame["rows"].sum()), catalog.frame["file"].nunique(), n_shards, len(catalog.labels),
             len(failures))


def _concat(paths: list[Path], columns: list[str]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.read_parquet(paths[0])[columns] if paths else pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns].sort_values(["file", "row"], kind="stable").reset_index(
        drop=True)


def gather(probe_dirs: list[str], factor_dirs: list[str], manifest_failures: str, outputs: dict) -> dict:
    """probe.parquet (every probed image), failure_cases.parquet (the misclassified, with their factors) and
    failures.parquet (every item that could not be probed or factored, with its reason)."""
    probe = _concat([Path(d) / PROBE_FILES["probe"] for d in probe_dirs], PROBE_COLUMNS)
    cases = _concat([Path(d) / FACTOR_FILES["factors"] for d in factor_dirs], FACTOR_COLUMNS)
    failures = read_failures([manifest_failures, *(Path(d) / PROBE_FILES["failures"] for d in probe_dirs),
                              *(Path(d) / FACTOR_FILES["failures"] for d in factor_dirs)])
    write_parquet(probe, outputs["probe"], "probe.probe")
    write_parquet(cases, outputs["cases"], "probe.factors")
    write_parquet(failures, outputs["failures"], "failures")
    item_failures = failures[failures["stage"].isin(["manifest", "read", "probe"])]
    stats = {
        "probed": len(probe), "correct": int(probe["correct"].sum()), "misclassified": int((~probe["correct"]).sum()),
        "accuracy": float(probe["correct"].mean()) if len(probe) else None,
        "items_failed": len(item_failures), "factor_failures": int(len(failures) - len(item_failures)),
        "factor_status": {str(k): int(v) for k, v in cases["factor_status"].value_counts().items()},
        "failures_by_code": count_by_code(failures),
        "shards": [read_json(Path(d) / PROBE_FILES["stats"]) for d in probe_dirs],
    }
    write_json(stats, outputs["stats"])
    log.info("gathered %d probed images, %d failure cases", len(probe), len(cases))
    return stats


def check(stats_path, failures_path, max_failed_fraction: float, out) -> dict:
    """Fail the run when no image, or too large a share of them, could be probed (LLM answers that failed
    for good are counted in the summary, not here: the probe result stands without them)."""
    stats = read_json(stats_path)
    failures = pd.read_parquet(failures_path)
    failures = failures[failures["stage"].isin(["manifest", "read", "probe"])]
    result = check_failed_share("probe_qa", stats["probed"], failures, max_failed_fraction, failures_path)
    write_json(result, out)
    log.info("check passed: %s", result)
    return result


def _merge_jsonl(paths: list[Path], out: Path | str) -> int:
    keyed = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    keyed.append(((record["item_id"], record["k"]), line))
    keyed.sort(key=lambda pair: pair[0])
    lines = [line for _, line in keyed]
    with atomic_path(out) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return len(lines)


def dataset_info(cfg: dict) -> dict:
    """Where the dataset is and how it is read: what `mlprep serve` needs to show a failure case's image."""
    def resolved(value):
        return (value if is_remote(value) else str(Path(value).resolve())) if value else None

    return {"data_dir": resolved(cfg["data_dir"]), "images_dir": resolved(cfg.get("images_dir")),
            "image_column": cfg["image_column"], "label_column": cfg["label_column"],
            "id_column": cfg.get("id_column"), "object_storage": cfg.get("object_storage")}


def summary(probe_path, cases_path, probe_stats, sample_stats, qa_dirs: list[str], top: int, outputs: dict,
            dataset: dict | None = None) -> dict:
    """qa.jsonl and qa_failures.jsonl (the shards merged), summary.json, and the confusion plot."""
    n_qa = _merge_jsonl([Path(d) / QA_FILES["qa"] for d in qa_dirs], outputs["qa"])
    n_qa_failed = _merge_jsonl([Path(d) / QA_FILES["failures"] for d in qa_dirs], outputs["qa_failures"])
    probe = pd.read_parquet(probe_path, columns=["label", "prediction", "correct"])
    cases = pd.read_parquet(cases_path, columns=["label", "prediction", "factor", "factor_status", "backend"])
    gathered, sampled = read_json(probe_stats), read_json(sample_stats)
    per_label = probe.groupby("label").agg(images=("correct", "size"), correct=("correct", "sum"))
    per_label["failure_rate"] = 1 - per_label["correct"] / per_label["images"]
    confusions = cases.groupby(["label", "prediction"]).size().sort_values(ascending=False, kind="stable")
    factors = cases.loc[cases["factor_status"] == "verified", "factor"].value_counts()
    qa_stats = [read_json(Path(d) / QA_FILES["stats"]) for d in qa_dirs]
    result = {
        "steps": {
            "probe": {"images": gathered["probed"], "items_failed": gathered["items_failed"],
                      "correct": gathered["correct"], "misclassified": gathered["misclassified"],
                      "accuracy": gathered["accuracy"]},
            "factors": {"cases": len(cases), **gathered["factor_status"],
                        "requests_failed": gathered["factor_failures"]},
            "sampler": {k: sampled[k] for k in ("cases", "keys", "sampled", "per_key", "key_by")},
            "qa": {"records": n_qa, "failed": n_qa_failed, "expected": sum(s["requests"] for s in qa_stats),
                   "llm": [s.get("llm") for s in qa_stats]},
        },
        "failure_rate_per_label": {str(k): {"images": int(r.images), "failure_rate": round(float(r.failure_rate), 6)}
                                   for k, r in per_label.iterrows()},
        "top_confusions": [{"label": str(a), "prediction": str(b), "count": int(n)}
                           for (a, b), n in confusions.head(top).items()],
        "factor_frequencies": {str(k): int(v) for k, v in factors.items()},
        "llm_backends": sorted(str(b) for b in cases["backend"].dropna().unique()),
        "dataset": dataset,
    }
    write_json(result, outputs["summary"])
    with atomic_path(outputs["plot"]) as tmp:
        plot_confusion(probe, result, tmp)
    log.info("summary: %s", result["steps"])
    return result


def plot_confusion(probe: pd.DataFrame, result: dict, path) -> None:
    """Row-normalised confusion matrix (the most frequent labels, at most 30) and the factor frequencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = probe["label"].value_counts().index[:30].tolist()
    matrix = pd.crosstab(probe["label"], probe["prediction"]).reindex(index=labels, columns=labels, fill_value=0)
    rates = matrix.to_numpy(float) / np.maximum(matrix.sum(axis=1).to_numpy(float)[:, None], 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    image = left.imshow(rates, cmap="viridis", vmin=0, vmax=1)
    left.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    left.set_yticks(range(len(labels)), labels, fontsize=7)
    left.set_xlabel("prediction")
    left.set_ylabel("label")
    accuracy = result["steps"]["probe"]["accuracy"]
    left.set_title(f"probe confusion (row share), accuracy {accuracy:.3f}" if accuracy is not None else "no images")
    fig.colorbar(image, ax=left, fraction=0.046)
    freq = result["factor_frequencies"]
    names = list(freq)[:15]
    right.barh(range(len(names)), [freq[n] for n in names])
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    offline = result.get("llm_backends") == ["template"]
    right.set_title("verified failure factors" + (" (template backend: placeholders)" if offline else ""))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
