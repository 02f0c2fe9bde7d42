"""What `mlprep serve` loads of each pipeline's results, through that pipeline's own code.

Each `load_*` builds an immutable snapshot of one pipeline's artefacts (the registry swaps snapshots when the
workflow rewrites them); the methods answer requests from a snapshot. Files are only ever reached through the
artefacts' own records (the SKU manifest's paths, the probe dataset's rows, the video index's shard names): an id
or index from a request selects a record, never a path. The only pickles loaded are this workflow's own video
shards, found through its own index.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mlprep.failures import ItemError
from mlprep.io import read_json


class RequestError(ValueError):
    """A request that cannot be answered: `status` (HTTP), a stable `code`, a message for the client."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


IMAGE_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


def image_response(data: bytes) -> tuple[bytes, str]:
    """(bytes, media type) of an image to send: its own bytes where browsers show the format, else a PNG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = IMAGE_TYPES.get(img.format or "")
            if kind:
                return data, kind
            out = io.BytesIO()
            img.convert("RGB").save(out, format="PNG")
            return out.getvalue(), "image/png"
    except Exception as err:  # noqa: BLE001
        raise RequestError(500, "unreadable_artefact", f"the stored image does not decode: {type(err).__name__}") from err


def _page(total: int, offset: int, limit: int) -> slice:
    if offset < 0 or limit < 1:
        raise RequestError(422, "bad_page", "offset must be >= 0 and limit >= 1")
    return slice(min(offset, total), min(total, offset + limit))


def _random(identity: dict | None) -> bool:
    return bool(identity) and not identity.get("pretrained")


# ---------------------------------------------------------------- sku_index


@dataclass
class SkuSnapshot:
    searcher: object  # mlprep.sku.search.SkuSearcher
    photos: dict[str, list[str]]  # sku id -> catalog photo paths (the manifest's), in catalog order
    names: dict[str, tuple[str, str]]  # sku id -> (name, category)
    info: dict

    def describe(self) -> dict:
        identity = self.info.get("model_identity")
        return {"skus": len(self.names), "vectors": int(self.searcher.index.ntotal), "model": identity,
                "random_weights": _random(identity)}

    def sku(self, sku_id: str) -> dict:
        if sku_id not in self.names:
            raise RequestError(404, "unknown_sku", f"no SKU {sku_id!r} in the index")
        name, category = self.names[sku_id]
        return {"sku_id": sku_id, "name": name, "category": category,
                "photos": [f"/api/sku/photo?id={_quote(sku_id)}&n={n}" for n in range(len(self.photos.get(sku_id, [])))]}

    def photo(self, sku_id: str, n: int) -> tuple[bytes, str]:
        paths = self.photos.get(sku_id)
        if paths is None:
            raise RequestError(404, "unknown_sku", f"no SKU {sku_id!r} in the index")
        if not 0 <= n < len(paths):
            raise RequestError(404, "unknown_photo", f"SKU {sku_id!r} has {len(paths)} photos")
        try:
            data = Path(paths[n]).read_bytes()  # a path the workflow's manifest holds, never one a request names
        except OSError as err:
            raise RequestError(404, "photo_gone", f"photo {n} of SKU {sku_id!r} is no longer on disk") from err
        return image_response(data)


def _quote(value: str) -> str:
    """An id as a query value. In a query, unlike in a path, no client or server turns `%2F` back into a
    separator or resolves `.` and `..` segments, so every id (with `/`, `..`, `%`, `#`, spaces, unicode)
    comes back exactly."""
    from urllib.parse import quote

    return quote(value, safe="")


def load_sku(folder: Path, encoders: dict, device: str | None, threads: int,
             batch_size: int | str = "auto", rerank: bool = True) -> SkuSnapshot:
    from mlprep.sku.search import SkuSearcher

    searcher = SkuSearcher(folder / "index.faiss", device=device, threads=threads, encoders=encoders,
                           batch_size=batch_size, rerank=rerank)
    manifest = pd.read_parquet(folder / "manifest.parquet", columns=["sku_id", "name", "category", "path", "listed"])
    manifest = manifest.sort_values("listed", kind="stable")
    indexed = set(searcher.skus.tolist())
    photos: dict[str, list[str]] = {}
    names: dict[str, tuple[str, str]] = {}
    for row in manifest.itertuples(index=False):
        if row.sku_id in indexed:
            photos.setdefault(row.sku_id, []).append(str(row.path))
            names.setdefault(row.sku_id, (str(row.name), str(row.category)))
    return SkuSnapshot(searcher, photos, names, searcher.info)


def sku_search(snapshot: SkuSnapshot, images: list[bytes], k: int, max_pixels: int) -> list[dict]:
    """One answer per image: its top-k SKUs (each SKU once, by its best view) with name, category, score and
    photo links, or its error. The batch's images go through the model together."""
    searcher = snapshot.searcher
    vectors, ok, failed = searcher.embed_bytes(images, max_pixels)
    answers: list[dict] = [{} for _ in images]
    for position, ranked in zip(ok, searcher.rank_images([images[p] for p in ok], vectors, k) if len(ok) else []):
        answers[position] = {"hits": [{"rank": n, "score": round(float(r.score), 6),
                                       "embedding_score": round(float(r.embedding_score), 6), "inliers": r.inliers,
                                       "ranked_by": r.ranked_by, **snapshot.sku(r.sku_id)}
                                      for n, r in enumerate(ranked, start=1)]}
    for position, code, reason in failed:
        answers[position] = {"error": {"code": code, "detail": reason}}
    return answers


# ---------------------------------------------------------------- speaker_embed


@dataclass
class SpeakerSnapshot:
    keys: list[str]
    names: list[dict]
    vectors: np.ndarray  # unit rows, one per speaker
    threshold: float | None
    threshold_source: str
    backend: object | None  # None when the embeddings were precomputed: uploads cannot be embedded
    model: dict | None
    min_seconds: float

    def describe(self) -> dict:
        threshold = None if self.threshold is None else round(float(self.threshold), 4)
        return {"speakers": len(self.keys), "model": self.model, "threshold": threshold,
                "threshold_source": self.threshold_source, "random_weights": False}

    def index_of(self, speaker_key: str) -> int:
        try:
            return self.keys.index(speaker_key)
        except ValueError:
            raise RequestError(404, "unknown_speaker", f"no speaker {speaker_key!r}") from None

    def prepare(self, data: bytes, max_seconds: float):
        """An upload as the backend's model input (the pipeline's own audio checks), or RequestError 422 with
        the reason code (not_audio, truncated, silent, too_short, too_long, ...)."""
        from mlprep.speaker.audio import load_audio

        if self.backend is None:
            raise RequestError(503, "no_speaker_model", "speaker_embed was built from precomputed embeddings: "
                                                       "there is no model to embed an upload with")
        if not data:
            raise RequestError(422, "empty_audio", "the upload is empty (0 bytes)")
        try:
            return self.backend.prepare(load_audio(data, self.backend.sample_rate, self.min_seconds, max_seconds))
        except ItemError as err:
            raise RequestError(422, err.code, str(err)) from err

    def identify(self, vector: np.ndarray, k: int) -> list[dict]:
        scores = self.vectors @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return [{"rank": r + 1, **self.names[i], "score": round(float(scores[i]), 6)} for r, i in enumerate(order)]

    def verdict(self, score: float) -> dict:
        same = None if self.threshold is None else bool(score >= self.threshold)
        return {"score": round(float(score), 6), "same_speaker": same, "threshold": self.threshold,
                "threshold_source": self.threshold_source}


def load_speaker(folder: Path, backends: dict, device: str | None, threads: int,
                 threshold: float | None = None) -> SpeakerSnapshot:
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "speakers.parquet", columns=["speaker_key", "dataset", "speaker_id",
                                                                 "num_utterances"]).to_pandas()
    vectors = np.load(folder / "speaker_embeddings.npy", allow_pickle=False).astype(np.float32)
    if len(vectors) != len(table):
        raise ValueError(f"{folder}: {len(table)} speakers but {len(vectors)} embeddings")
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    evaluation = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else {}
    summary = read_json(folder / "summary.json")
    threshold, source = _speaker_threshold(evaluation, threshold)
    model = summary.get("model")
    backend = None
    if model:
        from mlprep.devices import job_device
        from mlprep.speaker.backends import load_backend

        key = json.dumps(model, sort_keys=True)
        if key not in backends:
            backends[key] = load_backend(model["backend"], job_device(device or "cpu", threads), 64,
                                         model.get("weights"), model.get("source"),
                                         model.get("length_quantum_s") or 0.1)
        backend = backends[key]
    names = [{"speaker": r.speaker_key, "dataset": r.dataset, "speaker_id": r.speaker_id,
              "utterances": int(r.num_utterances)} for r in table.itertuples(index=False)]
    return SpeakerSnapshot(table["speaker_key"].tolist(), names, vectors, threshold, source, backend, model,
                           float((model or {}).get("min_seconds") or 0.5))


def _speaker_threshold(evaluation: dict, given: float | None) -> tuple[float | None, str]:
    """The verification threshold and a sentence saying where it came from: --speaker-threshold, else eval.json's
    operating threshold (`threshold`; results made before it had only `threshold_at_eer`)."""
    from mlprep.speaker.evaluate import describe_threshold

    if given is not None:
        return float(given), f"{given:.4f}: set by --speaker-threshold"
    if evaluation.get("threshold") is not None:
        return float(evaluation["threshold"]), "eval.json threshold " + describe_threshold(evaluation)
    if evaluation.get("threshold_at_eer") is not None:
        return float(evaluation["threshold_at_eer"]), (f"eval.json threshold_at_eer (EER {evaluation.get('eer')}; "
                                                       f"rerun speaker_evaluate for the operating threshold)")
    return None, "no evaluation: no decision, scores only"


def embed_uploads(snapshot: SpeakerSnapshot, prepared: list) -> list:
    """The batch runner of speaker uploads: prepared model inputs -> unit embeddings (one model call)."""
    vectors = snapshot.backend.encode(prepared)
    return [v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors]


# ---------------------------------------------------------------- kline_factor


@dataclass
class KlineSnapshot:
    lib: object  # mlprep.kline.search.Library
    index: object  # faiss index of every window, id = library row
    spec: object  # mlprep.kline.search.SearchSpec
    rows: dict[tuple[str, np.datetime64], int]
    assets: list[dict]

    def describe(self) -> dict:
        return {"assets": len(self.assets), "windows": len(self.lib.meta), "window": self.spec.window,
                "horizon": self.spec.horizon, "top_k": self.spec.top_k, "rerank": self.spec.rerank,
                "random_weights": False}

    def similar(self, asset: str, date: str) -> dict:
        """The window of `asset` ending on `date`, its best matches known at that date (the factor's own search)
        and the win rate they give, with every window's closes for the charts."""
        from mlprep.kline.prices import parse_dates
        from mlprep.kline.search import known_hits, select_matches, similarities

        when = parse_dates(pd.Series([date])).iloc[0]
        if pd.isna(when):
            raise RequestError(422, "bad_date", f"{date!r} is not a date")
        row = self.rows.get((asset, np.datetime64(when, "ns")))
        if row is None:
            known = next((a for a in self.assets if a["asset"] == asset), None)
            if known is None:
                raise RequestError(404, "unknown_asset", f"no asset {asset!r} in the pattern library")
            raise RequestError(404, "no_window", f"no window of {asset} ends on {when.date()} (its windows end "
                                                 f"{known['first']} to {known['last']}, on trading days)")
        lib, spec = self.lib, self.spec
        q = np.array([row])
        scores, rows = known_hits(lib, self.index, q, spec.search_k + spec.overlap_room)
        chosen, match_rows, _ = select_matches(lib, spec, q, scores, rows)
        picked = match_rows[0][chosen[0]]
        sims = similarities(lib, q, picked[None, :])[0] if len(picked) else np.zeros(0)
        fwd = lib.fwd[picked]
        meta = lib.meta
        matches = [{"asset": str(meta["symbol"].iat[m]), "end_date": str(pd.Timestamp(lib.end_date[m]).date()),
                    "known_date": str(pd.Timestamp(lib.known_date[m]).date()), "similarity": round(float(s), 6),
                    "forward_return": round(float(f), 6), "closes": [round(float(c), 6) for c in lib.closes[m]]}
                   for m, s, f in zip(picked, sims, fwd)]
        return {"asset": asset, "date": str(when.date()), "window": spec.window, "horizon": spec.horizon,
                "closes": [round(float(c), 6) for c in lib.closes[row]],
                "forward_return": None if not np.isfinite(lib.fwd[row]) or lib.known_date[row] > lib.end_date[row]
                else round(float(lib.fwd[row]), 6),
                "matches": matches, "n_matches": len(matches),
                "win_rate": round(float((fwd > 0).mean()), 6) if len(fwd) else None,
                "mean_forward_return": round(float(fwd.mean()), 6) if len(fwd) else None,
                "note": "matches are windows whose forward return was known on this date (no look-ahead); the "
                        "query's own forward return is shown only for judging, it is not used"}


def load_kline(folder: Path) -> KlineSnapshot:
    from mlprep.indexing import read_index
    from mlprep.kline.search import SearchSpec
    from mlprep.kline.steps import load_library

    lib = load_library(folder / "library.parquet", folder / "library_embeddings.npy", folder / "library_closes.npy",
                       folder / "series_checks.parquet")
    index = read_index(folder / "index.faiss")
    stats = read_json(folder / "factor_stats.json")
    if "spec" not in stats:
        raise ValueError(f"{folder / 'factor_stats.json'} holds no search spec (made before mlprep serve): rerun "
                         f"kline_win_rate")
    spec = SearchSpec(**stats["spec"])
    symbols = lib.meta["symbol"].to_numpy()
    rows = {(s, d): k for k, (s, d) in enumerate(zip(symbols, lib.end_date))}
    frame = pd.DataFrame({"asset": symbols, "date": lib.end_date})
    assets = [{"asset": str(a), "first": str(pd.Timestamp(g["date"].min()).date()),
               "last": str(pd.Timestamp(g["date"].max()).date()), "windows": int(len(g))}
              for a, g in frame.groupby("asset", sort=True)]
    return KlineSnapshot(lib, index, spec, rows, assets)


# ---------------------------------------------------------------- probe_qa


# a QA pair with its lineage: which request made it (its cache key, seed, prompt), from which dataset row
QA_FIELDS = ("qa_id", "k", "question", "answer", "model", "backend", "factor", "failure_key", "prompt_hash",
             "request_key", "request_seed", "seed", "source")


@dataclass
class ProbeSnapshot:
    cases: pd.DataFrame
    qa: dict[str, list[dict]]
    dataset: dict
    summary: dict

    def describe(self) -> dict:
        probe = (self.summary.get("steps") or {}).get("probe") or {}
        accuracy = probe.get("accuracy")
        return {"cases": len(self.cases), "accuracy": None if accuracy is None else round(float(accuracy), 3),
                "images": probe.get("images"),
                "random_weights": False}

    def keys(self) -> list[dict]:
        counts = self.cases.groupby("key", sort=True).size()
        return [{"key": str(k), "cases": int(n)} for k, n in counts.items()]

    def page(self, key: str | None, offset: int, limit: int) -> dict:
        frame = self.cases if not key else self.cases[self.cases["key"] == key]
        part = frame.iloc[_page(len(frame), offset, limit)]
        rows = []
        for n, row in zip(part.index, part.itertuples(index=False)):
            rows.append({"case": int(n), "item_id": row.item_id, "id": None if pd.isna(row.id) else str(row.id),
                         "file": row.file, "row": int(row.row), "label": row.label, "prediction": row.prediction,
                         "score": round(float(row.score), 6), "factor": row.factor, "explanation": row.explanation,
                         "factor_status": row.factor_status, "key": row.key, "image": f"/api/probe/cases/{int(n)}/image",
                         "qa": [{k: r.get(k) for k in QA_FIELDS} for r in self.qa.get(row.item_id, [])]})
        return {"total": int(len(frame)), "offset": offset, "limit": limit, "cases": rows}

    def image(self, case: int) -> tuple[bytes, str]:
        from mlprep.probe.reader import image_bytes, read_row_group

        if not 0 <= case < len(self.cases):
            raise RequestError(404, "unknown_case", f"there are {len(self.cases)} failure cases")
        if not self.dataset.get("data_dir"):
            raise RequestError(503, "no_dataset", "the probe's summary does not say where its dataset is (rebuild "
                                                  "probe_summary)")
        row = self.cases.iloc[case]
        try:  # the dataset file and row the workflow's own records name
            cells = read_row_group(self.dataset["data_dir"], row["file"], int(row["row_group"]),
                                   [self.dataset["image_column"]], storage=self.dataset.get("object_storage"))[
                                       self.dataset["image_column"]]
            data = image_bytes(cells.iloc[int(row["group_row"])], self.dataset.get("images_dir"))
        except (ItemError, IndexError, OSError) as err:
            raise RequestError(404, "image_gone", f"the image of case {case} cannot be read now: {err}") from err
        return image_response(data)


def load_probe(folder: Path) -> ProbeSnapshot:
    from mlprep.probe.sampler import failure_keys

    summary = read_json(folder / "summary.json")
    cases = pd.read_parquet(folder / "failure_cases.parquet")
    cases = cases.reset_index(drop=True)
    cases["key"] = failure_keys(cases, "labels") if len(cases) else pd.Series(dtype=str)
    qa: dict[str, list[dict]] = {}
    path = folder / "qa.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                qa.setdefault(record["item_id"], []).append(record)
    return ProbeSnapshot(cases, qa, summary.get("dataset") or {}, summary)


# ---------------------------------------------------------------- video_frames

SHARD_FILE = re.compile(r"^\d{3,}-of-\d{3,}\.pkl$")


@dataclass
class VideoSnapshot:
    folder: Path
    clips: pd.DataFrame  # the index's ok clips: clip_id, text, n_frames, split, pkl, note
    failed: pd.DataFrame  # every clip that failed, in the manifest or its shard: clip_id, file, stage, code, reason
    _shards: OrderedDict = field(default_factory=OrderedDict)  # the last two shards read, newest last
    _lock: threading.Lock = field(default_factory=threading.Lock)  # frame requests run in several threads

    def describe(self) -> dict:
        return {"clips": len(self.clips), "failed": len(self.failed),
                "splits": sorted(self.clips["split"].unique().tolist()), "random_weights": False}

    def failures(self, offset: int, limit: int) -> dict:
        """The clips that failed, with their reason codes (the file's name, never its folder)."""
        part = self.failed.iloc[_page(len(self.failed), offset, limit)]
        return {"total": len(self.failed), "offset": offset, "limit": limit,
                "failed": [{"clip_id": r.clip_id, "file": r.file, "stage": r.stage, "reason_code": r.reason_code,
                            "reason": r.reason} for r in part.itertuples(index=False)]}

    def page(self, offset: int, limit: int) -> dict:
        part = self.clips.iloc[_page(len(self.clips), offset, limit)]
        return {"total": len(self.clips), "offset": offset, "limit": limit, "failed": len(self.failed),
                "clips": [self._row(int(n), row) for n, row in zip(part.index, part.itertuples(index=False))]}

    def _row(self, n: int, row) -> dict:
        return {"clip": n, "clip_id": row.clip_id, "text": row.text, "split": row.split, "n_frames": int(row.n_frames),
                "note": row.note, "frames": [f"/api/clips/{n}/frames/{i}" for i in range(int(row.n_frames))]}

    def clip(self, n: int) -> dict:
        if not 0 <= n < len(self.clips):
            raise RequestError(404, "unknown_clip", f"there are {len(self.clips)} clips")
        return self._row(n, next(self.clips.iloc[[n]].itertuples(index=False)))

    def frame(self, n: int, i: int) -> tuple[bytes, str]:
        from PIL import Image

        info = self.clip(n)
        if not 0 <= i < info["n_frames"]:
            raise RequestError(404, "unknown_frame", f"clip {n} has {info['n_frames']} frames")
        record = self._record(self.clips.iloc[n])
        out = io.BytesIO()
        Image.fromarray(record["frames"][i]).save(out, format="JPEG", quality=90)
        return out.getvalue(), "image/jpeg"

    def _record(self, row) -> dict:
        import pickle

        split, name = str(row["split"]), str(row["pkl"])
        path = (self.folder / split / name).resolve()
        if not SHARD_FILE.match(name) or path.parent != (self.folder / split).resolve():
            raise RequestError(500, "bad_index", "the video index names a shard outside its folder")
        with self._lock:
            if path not in self._shards:
                with open(path, "rb") as handle:
                    self._shards[path] = {r["id"]: r for r in pickle.load(handle)}  # noqa: S301 - our own shard
                while len(self._shards) > 2:
                    self._shards.popitem(last=False)
            self._shards.move_to_end(path)
            records = self._shards[path]
        record = records.get(row["clip_id"])
        if record is None:
            raise RequestError(404, "clip_gone", f"clip {row['clip_id']!r} is not in {split}/{name} any more")
        return record


def _without_folder(reason: str, path: str) -> str:
    """A failure's reason as the service shows it: the file's folder (a decoder quotes the whole path) left out."""
    folder = str(Path(path).parent)
    return reason.replace(folder + "/", "") if folder not in ("", ".") else reason


def load_video(folder: Path) -> VideoSnapshot:
    index = pd.read_parquet(folder / "index.parquet")
    clips = index[index["status"] == "ok"].sort_values(["split", "clip_id"], kind="stable").reset_index(drop=True)
    failures = pd.read_parquet(folder / "failures.parquet")
    failed = pd.DataFrame({"clip_id": failures["item_id"].astype(str),
                           "file": [Path(str(p)).name for p in failures["path"]],
                           "stage": failures["stage"].astype(str), "reason_code": failures["reason_code"].astype(str),
                           "reason": [_without_folder(str(r), str(p)) for r, p in
                                      zip(failures["reason"], failures["path"])]})
    failed = failed.sort_values(["clip_id", "file"], kind="stable").reset_index(drop=True)
    return VideoSnapshot(folder, clips[["clip_id", "text", "n_frames", "split", "pkl", "note"]], failed)
