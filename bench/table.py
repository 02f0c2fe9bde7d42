"""Every pipeline's benchmark in one run, and one table of the results (`make bench`).

Runs each benchmark script of bench/ in turn (each writes its figures as JSON), then prints one table: pipeline,
stage, our figure, the reference it is compared with (encoder-only, decode-only, ideal, bare client, seed-style
baseline or a target) and the ratio, with the machine, its cores, the precision and the device in the header. The
table is also written to results/bench/table.md and table.json; with --readme it replaces the generated table in
docs/performance.md (between the bench-table markers; with --gpu, docs/gpu.md's gpu-table).

    .venv/bin/python bench/table.py --readme            # everything (~30 minutes on 2 cores)
    .venv/bin/python bench/table.py --only llm_client probe_sampler
    .venv/bin/python bench/table.py --gpu images/device_check.json video/device_check.json --readme   # GPU rows
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
GPU_START, GPU_END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


@dataclass
class Row:
    pipeline: str
    stage: str
    ours: float
    unit: str
    reference: str
    reference_value: float | None
    ratio: float | None  # > 1: ours is better (faster, or more per second), unless the stage says "of"
    target: str = ""


def per_s(a: float, b: float) -> float:
    return a / b if b else float("nan")


def steady_rate(marks: list, seconds: float) -> float | None:
    """Items per second after the first batch or group was queued (readers started, the first data read), from
    `marks`, (seconds since the start, items) for each one queued, and the whole run's `seconds`: None when the
    whole run was one, too little work to tell the steady state from start-up."""
    if len(marks) < 2:
        return None
    return sum(n for _, n in marks[1:]) / max(seconds - marks[0][0], 1e-9)


def sku_rows(j: dict) -> list[Row]:
    v = j["views_per_s"]
    job = max(rate for name, rate in v.items() if name.startswith("shard job"))
    rows = [Row("sku_index", "encode shard job", job, "views/s", "encoder only", v["encoder only"],
                per_s(job, v["encoder only"]), ">= 0.9")]
    serial = v.get("stages one after the other")  # the readers, the render and the encoder, each at its rate alone
    if serial:
        rows.append(Row("sku_index", "encode: readers, render, encoder one after the other", serial, "views/s",
                        "encoder only", v["encoder only"], per_s(serial, v["encoder only"]), ""))
    return rows + [Row("sku_index", "encode shard job", job, "views/s", "seed approach (PIL per view, 1 image per "
                       "call)", v["seed approach"], per_s(job, v["seed approach"]))]


def rerank_rows(j: dict) -> list[Row]:
    e, r = j["embedding only"], j["re-ranked"]
    return [Row("sku_index", f"shop-floor top-1, look-alikes ({j['queries']} queries), re-ranked", r["top1"],
                "accuracy", "embedding only", e["top1"], per_s(r["top1"], e["top1"]), ">= +0.15"),
            Row("sku_index", "shop-floor top-5, look-alikes, re-ranked", r["top5"], "accuracy", "embedding only",
                e["top5"], per_s(r["top5"], e["top5"]), ">= 1.0"),
            Row("sku_index", "re-rank of the top 10, p50 (p90 {:.0f} ms)".format(r["ms_per_query_p90"]),
                r["ms_per_query_p50"], "ms", "target", 100, per_s(100, r["ms_per_query_p50"]), "<= 100 ms"),
            Row("sku_index", "keypoint artefact per catalog photo", j["keypoint_bytes_per_photo"] / 1024, "KB",
                "target", 64, per_s(64, j["keypoint_bytes_per_photo"] / 1024), "<= 64 KB")]


def descriptor_rows(j: dict) -> list[Row]:
    d, a = j["descriptors"], j["augmentations"]
    best, plain, before = d["gem, centre + whole"], d["model, centre"], j["previous_defaults"]
    default = next(v for name, v in a.items() if name.startswith("default"))
    return [Row("sku_index", f"shop-floor top-1, look-alikes ({j['queries']} queries), default descriptor",
                best["top1"], "accuracy", "previous defaults", before["top1"], per_s(best["top1"], before["top1"])),
            Row("sku_index", "shop-floor top-1, GeM + whole-photo crop", best["top1"], "accuracy",
                "average pooling, centre crop", plain["top1"], per_s(best["top1"], plain["top1"])),
            Row("sku_index", "shop-floor top-1, default augmentations", default["top1"], "accuracy",
                "originals only", a["no augmentation (originals only)"]["top1"],
                per_s(default["top1"], a["no augmentation (originals only)"]["top1"]), "> 1 (seed's claim)")]


def container_rows(j: dict) -> list[Row]:
    job = j["rows"]["shard job"]
    ratio, seconds = job["ratio"], job["seconds"]
    own = j["member_bytes"]
    return [Row("sku_index", "shard job from local tars", ratio["webdataset"], "x files", "target", 0.9,
                per_s(ratio["webdataset"], 0.9), ">= 0.9x files"),
            Row("sku_index", "shard job from parquet of bytes", ratio["parquet"], "x files", "files", 1.0,
                ratio["parquet"]),
            Row("sku_index", "shard job from tars on the local S3 server ({:.2f} requests/item)".format(
                j["requests_per_item"]["s3-webdataset"]), seconds["webdataset"] / seconds["s3-webdataset"],
                "x local tars", "target", 0.8, per_s(seconds["webdataset"] / seconds["s3-webdataset"], 0.8),
                ">= 0.8x local tars"),
            Row("sku_index", "bytes a shard job reads from tars", j["bytes_read"]["webdataset"] / own,
                "x its members", "target", 1.1, per_s(1.1, j["bytes_read"]["webdataset"] / own), "<= 1.1x"),
            Row("sku_index", "requests of a no-op index of a bucket",
                sum(j["noop_index_requests"]["s3-webdataset"].values()), "requests", "listing only", 1, None,
                "O(containers)")]


def video_rows(j: dict) -> list[Row]:
    s = j["s_per_video"]
    job = 1 / s["extract job"]
    rows = [Row("video_frames", "extract job", job, "videos/s", "decode only", 1 / s["decode only"],
                per_s(s["decode only"], s["extract job"]), ">= 0.8"),
            Row("video_frames", "extract job", job, "videos/s", "naive (seed: OpenCV reads every frame)",
                1 / s["naive (seed)"], per_s(s["naive (seed)"], s["extract job"])),
            Row("video_frames", "2 extract shards vs 1", per_s(j["one_shard_s"], j["two_shards_s"]), "x",
                "decode only, 2 processes vs 1", per_s(j["decode_only_one_s"], j["decode_only_two_s"]),
                per_s(j["one_shard_s"], j["two_shards_s"]) / per_s(j["decode_only_one_s"], j["decode_only_two_s"]))]
    if "one_job" in j:  # one job given several threads: that many clips at once against one clip at a time
        threads, lanes = j["one_job"]["threads"], j["one_job"]["s_per_video"]
        rows.append(Row("video_frames", f"one job of {threads} threads, {threads} clips at once",
                        1 / lanes["clips at once"], "videos/s", f"one clip at a time, {threads} codec threads",
                        1 / lanes["one clip at a time"], per_s(lanes["one clip at a time"], lanes["clips at once"]),
                        ">= 1"))
    return rows


def speaker_rows(j: dict) -> list[Row]:
    rows = []
    for backend in ("resemblyzer", "speechbrain"):
        if backend not in j:
            continue
        u = j[backend]["utt_per_s"]
        setup = j[backend].get("auto_setup", "shard job (1 worker)")  # the row `decode_workers: auto` runs here
        rows.append(Row("speaker_embed", f"{backend} {setup} (decode_workers: auto)", u[setup], "utt/s", "model only",
                        u["model only"], per_s(u[setup], u["model only"]), ">= 0.8"))
        rows.append(Row("speaker_embed", f"{backend}, 2 jobs vs 1", per_s(j[backend]["one_job_s"],
                        j[backend]["two_jobs_s"]), "x", "1 job", 1.0,
                        per_s(j[backend]["one_job_s"], j[backend]["two_jobs_s"]), ">= 1.7"))
    if "speaker_step" in j:
        ours, seed = j["speaker_step"]["mlprep"]["step_s"], j["speaker_step"]["seed"]["step_s"]
        rows.append(Row("speaker_embed", "speaker step, 1M x 256", ours, "s", "seed-style loop", seed,
                        per_s(seed, ours), ">= 20"))
    return rows


def kline_rows(j: dict) -> list[Row]:
    rows = [Row("kline_factor", "library", j["library_windows_per_s"], "windows/s", "target", 50_000,
                per_s(j["library_windows_per_s"], 50_000), ">= 1"),
            Row("kline_factor", "chart rendering", j["chart_windows_per_s"], "windows/s", "target", 2_000,
                per_s(j["chart_windows_per_s"], 2_000), ">= 1"),
            Row("kline_factor", f"factor, {j['samples']} samples, price", j["factor_s"], "s",
                "seed-style loop (chart PNG + CLIP + search per sample)", j["seed_s"], per_s(j["seed_s"], j["factor_s"])),
            Row("kline_factor", f"factor, {j['samples']} samples, chart", j["chart_factor_s"], "s",
                "seed-style loop", j["seed_s"], per_s(j["seed_s"], j["chart_factor_s"]))]
    if "panel" in j:
        p = j["panel"]
        rows.append(Row("kline_factor", f"`all` panel, {p['windows']:,} windows", p["total_s"], "s", "target 600 s",
                        600, per_s(600, p["total_s"]), ">= 1"))
    return rows


def llm_rows(j: dict) -> list[Row]:
    c = j["concurrency"]
    c32, c256 = c.get("32") or c.get(32), c.get("256") or c.get(256)
    return [Row("probe_qa", "LLM client, 32 in flight", c32["mlprep_rps"], "req/s", "ideal (32 / 100 ms)",
                c32["ideal_rps"], per_s(c32["mlprep_rps"], c32["ideal_rps"]), ">= 0.9"),
            Row("probe_qa", "LLM client, 256 in flight", c256["mlprep_rps"], "req/s", "bare aiohttp client",
                c256["bare_rps"], per_s(c256["mlprep_rps"], c256["bare_rps"]), ">= 0.9"),
            Row("probe_qa", "LLM client, 32 in flight", c32["mlprep_rps"], "req/s", "sequential client",
                j["sequential_rps"], per_s(c32["mlprep_rps"], j["sequential_rps"]), ">= 20")]


def sampler_rows(j: dict) -> list[Row]:
    return [Row("probe_qa", f"sampler step, {j['rows']:,} failures", j["seconds"], "s", "target 60 s", 60,
                per_s(60, j["seconds"]), ">= 1"),
            Row("probe_qa", "sampler step peak RSS", j["peak_rss_mib"], "MiB", "target 2 GiB", 2048,
                per_s(2048, j["peak_rss_mib"]), ">= 1")]


def zero_shot_rows(j: dict) -> list[Row]:
    return [Row("probe_qa", "clip_zero_shot probe", j["probe_img_per_s"], "img/s", "encoder only",
                j["encoder_img_per_s"], per_s(j["probe_img_per_s"], j["encoder_img_per_s"]), ">= 0.8")]


def e2e_rows(j: dict) -> list[Row]:
    rows = []
    for pipeline, unit in (("sku_index", "images"), ("video_frames", "clips")):
        f = j[pipeline]
        n, flow, script = f["sizes"][-1], f["workflow_s"][-1], f["script_s"][-1]
        rows.append(Row(pipeline, f"whole workflow, {n} {unit}", flow, "s", "seed-style script", script,
                        per_s(script, flow)))
    return rows


def serve_rows(j: dict) -> list[Row]:
    rows = []
    for name, pipeline, unit in (("sku", "SKU search", "img/s"), ("speaker", "speaker identify", "utt/s")):
        ref, runs = j["references"][name], j["load"][name]
        most = max(runs, key=int)
        load, one = runs[most], runs["1"]
        rows.append(Row("serve", f"{pipeline}, {most} clients ({sum(load['errors'].values())} errors)", load["per_s"],
                        unit, f"the same path batched ({j['batch']}), no HTTP", ref["batched_per_s"],
                        per_s(load["per_s"], ref["batched_per_s"]), ">= 0.8"))
        rows.append(Row("serve", f"{pipeline}, 1 client, p50 latency (p99 {one['p99_ms']} ms)", one["p50_ms"], "ms",
                        "the same path, one item, no HTTP", 1000 * ref["one_s"], per_s(1000 * ref["one_s"],
                                                                                      one["p50_ms"]),
                        ">= 0.77 (p50 <= 1.3x)"))
    plain, most = j.get("sku_without_rerank"), max(j["load"]["sku"], key=int)
    if plain:
        rows.append(Row("serve", f"SKU search re-ranked, {most} clients", j["load"]["sku"][most]["per_s"], "img/s",
                        "the same server ranking by embeddings alone", plain["per_s"],
                        per_s(j["load"]["sku"][most]["per_s"], plain["per_s"]), ">= 0.5"))
    return rows


BENCHES = {  # name -> (script, extra arguments, rows from its JSON)
    "sku_encode": ("sku_encode.py", ["--rounds", "3"], sku_rows),
    "sku_rerank": ("sku_rerank.py", [], rerank_rows),
    "sku_descriptors": ("sku_descriptors.py", [], descriptor_rows),
    "containers": ("containers.py", ["--images", "128", "--per-container", "32", "--repeat", "2"], container_rows),
    "video_frames": ("video_frames.py", [], video_rows),
    "speaker": ("speaker.py", ["--copies", "40"], speaker_rows),
    "kline": ("kline.py", [], kline_rows),
    "llm_client": ("llm_client.py", [], llm_rows),
    "probe_sampler": ("probe_sampler.py", [], sampler_rows),
    "probe_zero_shot": ("probe_zero_shot.py", [], zero_shot_rows),
    "end_to_end": ("end_to_end.py", [], e2e_rows),
    "serve": ("serve.py", [], serve_rows),
}
TABLE_DOC = REPO / "docs" / "performance.md"  # where --readme puts the CPU table
GPU_DOC = REPO / "docs" / "gpu.md"  # and --gpu --readme the GPU one


def machine() -> dict:
    import torch

    from mlprep.devices import cpu_summary, precision_name, select_device, select_precision

    device = select_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only (no GPU)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu_summary(), "cores": os.cpu_count(), "device": f"{device.type}: {name}",
            "precision": precision_name(select_precision("auto", device)),
            "date": datetime.date.today().isoformat(), "commit": commit or "unknown"}


def fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def markdown(rows: list[Row], info: dict, failed: list[str]) -> str:
    lines = [f"Measured {info['date']} at commit {info['commit']} on {info['cpu']}, "
             f"{info['device']}, precision auto = {info['precision']}, one run of `make bench` "
             "(each ratio from figures measured side by side in that run).", "",
             "| pipeline | stage | ours | compared with | reference | ratio | target |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.pipeline} | {r.stage} | {fmt(r.ours)} {r.unit} | {r.reference} | {fmt(r.reference_value)} | "
                     f"**{fmt(r.ratio)}** | {r.target} |")
    if failed:
        lines += ["", f"Not measured in this run (the benchmark failed): {', '.join(failed)}."]
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path, start: str = START, end: str = END) -> None:
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no {start} ... {end} markers to put the table between")
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}")


def gpu_table(paths: list[str]) -> str:
    """One table of the GPU rows of bench/device_check.sh's runs (its device_check.json files)."""
    rows, failed, info = [], [], None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data.get("dry_run"):
            raise SystemExit(f"{path} is a dry run on the CPU: no GPU figures in it")
        info = info or data["machine"]
        rows += [Row(**r) for r in data["table_rows"]]
        failed += [f"{k} ({v['status']})" for k, v in data["steps"].items() if v["status"] != "ok"]
    info = {**info, "device": f"cuda: {info.get('gpu')}", "precision": "bf16", "date": info["date"][:10],
            "cpu": f"{info['cpu']}, torch {info['torch']}"}
    return markdown(rows, info, failed).replace("one run of `make bench`", "one run of bench/device_check.sh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run these benchmarks only")
    parser.add_argument("--readme", action="store_true", help="write the table into docs/performance.md (README "
                                                              "links to it)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench"))
    parser.add_argument("--gpu", nargs="+", metavar="DEVICE_CHECK_JSON",
                        help="instead: the GPU table from bench/device_check.sh's device_check.json files")
    args = parser.parse_args()
    if args.gpu:
        table = gpu_table(args.gpu)
        print(table)
        if args.readme:
            update_readme(table, GPU_DOC, GPU_START, GPU_END)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    failed = []
    for name in args.only or BENCHES:
        script, extra, extract = BENCHES[name]
        with tempfile.TemporaryDirectory() as tmp:
            figures = Path(tmp) / "figures.json"
            print(f"\n=== bench/{script} {' '.join(extra)}", flush=True)
            done = subprocess.run([sys.executable, str(REPO / "bench" / script), *extra, "--json", str(figures)],
                                  cwd=REPO)
            if done.returncode != 0 or not figures.exists():
                failed.append(f"{script} (exit {done.returncode})")
                continue
            data = json.loads(figures.read_text())
        (out / f"{name}.json").write_text(json.dumps(data, indent=2))
        rows.extend(extract(data))
    info = machine()
    table = markdown(rows, info, failed)
    print("\n" + table)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps({"machine": info, "rows": [asdict(r) for r in rows],
                                                "failed": failed}, indent=2))
    if args.readme:
        update_readme(table, TABLE_DOC)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
