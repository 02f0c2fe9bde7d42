"""`mlprep serve`: the real server (uvicorn on a free loopback port, its own process) over results folders that
real workflow runs made, called over HTTP; its page driven in Chromium through Playwright."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import wave
import zlib
from pathlib import Path

import httpx
import hypothesis
import numpy as np
import pandas as pd
import pytest
import schemathesis
from PIL import Image

from conftest import AWKWARD_IDS, HOSTILE, REPO, make_catalog, run_snakemake, workflow_config
from test_views import huge_jpeg, huge_png

ARTIFACTS = Path(os.environ.get("MLPREP_TEST_ARTIFACTS", REPO / "results" / "test-artifacts")) / "serve"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """`mlprep serve` in its own process; `log()` is what it wrote to stderr (warnings, JSON access lines)."""

    def __init__(self, results: Path, *args: str, host: str = "127.0.0.1", env: dict | None = None,
                 ready: bool = True):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.stderr = results.parent / f"serve-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "mlprep.cli", "serve", "--results", str(results),
                                      "--host", host, "--port", str(self.port), *args],
                                     stdout=subprocess.DEVNULL, stderr=open(self.stderr, "w"),
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.log()}"
            try:
                status = httpx.get(f"{self.base}/readyz" if ready else f"{self.base}/healthz", timeout=5).status_code
                if status == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not get ready: {self.log()}")

    def log(self) -> str:
        return self.stderr.read_text()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base + path, timeout=60, **kw)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", quality=92)
    return out.getvalue()


def crop(path: Path, keep: float = 0.7) -> bytes:
    """The middle `keep` of a photo, as a shop-floor snapshot of it would be."""
    with Image.open(path) as img:
        w, h = img.size
        dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
        return jpeg(img.crop((dx, dy, w - dx, h - dy)).resize((int(w * keep * 0.8), int(h * keep * 0.8))))


def bomb_png(side: int) -> bytes:
    """A real PNG of side x side black pixels: a few kB on the wire, side^2 bytes once decoded."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(side) for _ in range(side)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


# ---------------------------------------------------------------- the demo's results, served


@pytest.fixture(scope="module")
def demo(hostile_demo) -> Path:
    return hostile_demo


@pytest.fixture(scope="module")
def server(demo):
    served = Served(demo / "results", "--max-upload-mb", "2", "--max-image-pixels", "20000000",
                    "--max-audio-seconds", "20")
    yield served
    served.stop()


def sku_photo(demo: Path, n: int, k: int = 1) -> Path:
    return demo / "resources" / "demo" / "sku" / "images" / f"sku{n:04d}_{k}.jpg"


def utterance(speaker: str, n: int) -> Path:
    return REPO / "resources" / "demo" / "speech" / speaker / f"utt{n}.wav"


def test_operations_say_what_is_loaded_and_which_model_made_it(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    ready = server.get("/readyz").json()
    assert ready["ready"] and all(p["loaded"] for p in ready["pipelines"].values()), ready
    status = server.get("/api/status").json()
    assert set(status["pipelines"]) == {"sku_index", "speaker_embed", "kline_factor", "probe_qa", "video_frames"}
    sku = status["pipelines"]["sku_index"]["about"]
    assert sku["model"]["name"] == "tf_efficientnet_lite0" and sku["model"]["family"] == "timm"
    assert sku["model"]["pretrained"] == "packaged:efficientnet-lite0" and not sku["random_weights"]
    assert len(sku["model"]["checkpoint_sha256"]) == 64 and sku["skus"] == 16 + len(AWKWARD_IDS)
    assert status["pipelines"]["speaker_embed"]["about"]["model"]["backend"] == "resemblyzer"
    spec = server.get("/openapi.json").json()
    assert {"/api/sku/search", "/api/speaker/identify", "/api/speaker/verify", "/api/kline/similar",
            "/api/probe/cases", "/api/clips/{clip}"} <= set(spec["paths"])
    assert server.get("/docs").status_code == 200


def test_a_crop_of_a_catalog_photo_finds_its_sku_first_each_sku_once(server, demo):
    answer = server.post("/api/sku/search", params={"k": 5},
                         files=[("images", ("snap.jpg", crop(sku_photo(demo, 1)), "image/jpeg"))]).json()
    [result] = answer["results"]
    hits = result["hits"]
    assert hits[0]["sku_id"] == "sku0001" and hits[0]["name"] == "Espresso cup" and hits[0]["category"] == "kitchen"
    assert len(hits) == 5 and len({h["sku_id"] for h in hits}) == 5  # grouped by SKU, not one hit per view
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5] and hits[0]["score"] > hits[1]["score"]
    # re-ranked: the crop matches its catalog photo geometrically, and the answer says so
    assert hits[0]["ranked_by"] == "geometry" and hits[0]["inliers"] >= 10, hits[0]
    assert hits[0]["score"] > hits[0]["embedding_score"] and all(h["ranked_by"] == "embedding" for h in hits[1:])
    photo = server.get(hits[0]["photos"][0])
    assert photo.headers["content-type"] == "image/jpeg"
    assert photo.content == sku_photo(demo, 1, 0).read_bytes()
    # the same query as JSON with base64 gets the same answer
    as_json = server.post("/api/sku/search", json={"images": [base64.b64encode(crop(sku_photo(demo, 1))).decode()],
                                                     "k": 5}).json()
    assert as_json["results"][0]["hits"] == hits


def test_every_url_the_api_hands_out_resolves_whatever_the_sku_id(server, demo):
    images = demo / "resources" / "demo" / "sku" / "images"
    for n, sku_id in enumerate(AWKWARD_IDS):
        query = (images / f"awkward{n}.jpg").read_bytes()  # the catalog photo itself: its SKU comes first
        [result] = server.post("/api/sku/search", params={"k": 1},
                               files=[("images", ("q.jpg", query, "image/jpeg"))]).json()["results"]
        hit = result["hits"][0]
        assert hit["sku_id"] == sku_id, (sku_id, hit)
        [url] = hit["photos"]
        # the URL exactly as handed out, sent raw (as a browser's <img src> would): no client-side re-encoding
        photo = httpx.get(server.base + url, timeout=60)
        assert photo.status_code == 200, (sku_id, url, photo.text[:200])
        assert photo.content == query
        detail = server.get("/api/sku", params={"id": sku_id}).json()
        assert detail["sku_id"] == sku_id and detail["photos"] == [url]
    assert server.get("/api/sku/photo", params={"id": "A/B", "n": -1}).status_code == 422


def test_a_bad_image_in_a_batch_is_that_querys_error_the_others_are_answered(server, demo):
    good = crop(sku_photo(demo, 2))
    uploads = {"good": good, "empty": b"", "truncated": good[:400], "text": b"just some words, no image",
               "bomb": bomb_png(6000), "huge_png": huge_png(50000), "huge_jpeg": huge_jpeg(65000)}
    assert len(uploads["bomb"]) < 100_000  # 36 MP decoded from a few kB
    response = server.post("/api/sku/search", params={"k": 3},
                           files=[("images", (f"{name}.jpg", data, "image/jpeg")) for name, data in uploads.items()])
    assert response.status_code == 200
    results = {name: r for name, r in zip(uploads, response.json()["results"])}
    assert results["good"]["hits"][0]["sku_id"] == "sku0002"
    codes = {name: r["error"]["code"] for name, r in results.items() if name != "good"}
    assert codes == {"empty": "not_an_image", "truncated": "truncated", "text": "not_an_image",
                     "bomb": "too_many_pixels", "huge_png": "too_many_pixels", "huge_jpeg": "too_many_pixels"}, results
    assert "6000x6000" in results["bomb"]["error"]["detail"]


def test_bad_requests_get_clear_4xx_answers(server):
    too_big = os.urandom(3 * 1024 * 1024)
    response = server.post("/api/sku/search", files=[("images", ("big.jpg", too_big, "image/jpeg"))])
    assert response.status_code == 413 and response.json()["error"] == "too_large"

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(6):
            yield os.urandom(512 * 1024)

    response = server.post("/api/sku/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert server.post("/api/sku/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    bad = server.post("/api/sku/search", json={"images": ["not base64 !!"]})
    assert bad.status_code == 422 and bad.json()["error"] == "bad_json"
    assert server.post("/api/sku/search", json={"images": []}).json()["error"] == "no_images"
    assert server.post("/api/sku/search", params={"k": 0}, json={"images": []}).status_code == 422
    one = base64.b64encode(jpeg(Image.new("RGB", (64, 64), "red"))).decode()
    assert server.post("/api/sku/search", json={"images": [one], "k": 0}).json()["error"] == "bad_k"
    assert server.get("/api/sku", params={"id": "nope"}).json()["error"] == "unknown_sku"
    for path in ["/api/sku/photo?id=..%2F..%2Fetc%2Fpasswd&n=0", "/api/sku/photo?id=sku0001&n=7",
                 "/api/sku/photo?id=%2Fetc%2Fpasswd&n=0", "/static/../../pyproject.toml", "/api/clips/999/frames/0",
                 "/api/probe/cases/999/image", "/api/sku/..%2F..%2Fetc%2Fpasswd/photos/0"]:
        response = server.get(path)
        assert response.status_code == 404, (path, response.status_code, response.text[:200])
        assert b"root:" not in response.content and b"[project]" not in response.content


def test_hostile_bodies_get_4xx_never_5xx(server):
    """Found by hand: a 4 KB JSON body nested 2,000 deep raised RecursionError in the JSON parser: a 500."""
    json_type = {"content-type": "application/json"}
    bodies = {
        "deep nesting": b"[" * 2000 + b"]" * 2000,
        "deep objects": b'{"images": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
        "huge number k": b'{"images": ["aGk="], "k": 1e400}',
        "huge int k": b'{"images": ["aGk="], "k": ' + b"9" * 5000 + b"}",  # past the parser's digit limit
        "string k": b'{"images": ["aGk="], "k": "5"}',
        "bool k": b'{"images": ["aGk="], "k": true}',
        "null body": b"null",
        "a list": b'[1, 2, 3]',
        "images not a list": b'{"images": {"a": 1}}',
        "images of numbers": b'{"images": [1, 2]}',
        "invalid utf-8": b'{"images": ["' + bytes([0xFF, 0xFE]) + b'"]}',
        "truncated": b'{"images": ["aGk=',
        "NaN": b'{"images": [], "k": NaN}',
    }
    for name, body in bodies.items():
        response = server.post("/api/sku/search", content=body, headers=json_type)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        assert response.json()["error"] in ("bad_json", "bad_k", "no_images"), (name, response.text[:300])
    big = server.post("/api/sku/search", content=b'{"images": ["aGk="], "k": ' + b"9" * 40 + b"}", headers=json_type)
    assert big.status_code == 200 and big.json()["k"] == 100  # a large k is capped (at 100)
    for path, params in [("/api/kline/similar", {"asset": "S000", "date": "\x00"}),
                         ("/api/kline/similar", {"asset": "S000", "date": "99999-99-99"}),

                         ("/api/probe/cases", {"offset": "-5"}), ("/api/clips", {"limit": "10000000000000000000000"}),
                         ("/api/sku/photo", {"id": "x", "n": "99999999999999999999999999"})]:
        response = server.get(path, params=params)
        assert 400 <= response.status_code < 500, (path, params, response.status_code, response.text[:300])
    for raw in ["/api/kline/similar?asset=%FF%FE&date=2020-01-01", "/api/sku?id=%FF%00%C0", "/api/sku/photo?id=%&n=0",
                "/api/clips?offset=%FF&limit=1"]:  # invalid UTF-8 and broken escapes in the query
        response = httpx.get(server.base + raw, timeout=60)
        assert response.status_code < 500, (raw, response.status_code, response.text[:300])


def test_no_request_the_openapi_schema_allows_gets_a_5xx(server):
    """Every route, fuzzed from the service's own OpenAPI schema with schemathesis (seeded, bounded examples per
    operation, sent to the real server): never a 5xx."""
    schema = schemathesis.openapi.from_url(server.base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    seen: dict[str, set[int]] = {}

    for operation in operations:
        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        def no_server_error(case):
            response = case.call(base_url=server.base, timeout=60)
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500, (case.method, case.formatted_path, case.query, response.status_code,
                                                response.text[:300])

        no_server_error()
    assert len(seen) == len(operations), seen
    assert any(code == 200 for codes in seen.values() for code in codes)  # not only refusals: it reached the code


def test_a_voice_finds_its_speaker_and_verification_uses_the_evals_threshold(server, demo, tmp_path):
    from mlprep.video.decode import ffmpeg_exe

    files = {"audio": ("u.wav", utterance("studio/alice", 3).read_bytes(), "audio/wav")}
    answer = server.post("/api/speaker/identify", params={"k": 3}, files=files).json()
    assert [s["speaker"] for s in answer["speakers"]][0] == "studio/alice" and len(answer["speakers"]) == 3
    evaluation = json.loads((demo / "results" / "speaker_embed" / "eval.json").read_text())
    assert answer["threshold"] == pytest.approx(evaluation["threshold"])
    # the demo's voices separate: the threshold sits inside the gap, not on the lowest own-speaker score
    assert evaluation["threshold_rule"] == "gap_middle", evaluation
    assert evaluation["highest_nontarget_score"] < answer["threshold"] < evaluation["lowest_target_score"]
    same = server.post("/api/speaker/verify", files=files, data={"speaker": "studio/alice"}).json()
    other = server.post("/api/speaker/verify", files=files, data={"speaker": "phone/chen"}).json()
    assert same["same_speaker"] is True and other["same_speaker"] is False, (same, other)
    assert same["score"] == pytest.approx(answer["speakers"][0]["score"], abs=1e-5)
    assert "middle of the gap" in same["threshold_source"] and "trials" in same["threshold_source"]
    pairs = {other: server.post("/api/speaker/verify", files={**files, "other": ("o.wav", utterance(other, 4)
                                                                                .read_bytes(), "audio/wav")}).json()
             for other in ("studio/alice", "phone/chen")}
    assert all(p["against"] == "utterance" for p in pairs.values())
    assert pairs["studio/alice"]["score"] > pairs["phone/chen"]["score"] + 0.05, pairs
    assert server.post("/api/speaker/verify", files=files, data={"speaker": "nobody"}).status_code == 404
    # what a browser records (WebM with Opus) and a phone (M4A with AAC) identify the same speaker
    for suffix, codec, media in ((".webm", "libopus", "audio/webm"), (".m4a", "aac", "audio/mp4")):
        made = tmp_path / f"upload{suffix}"
        subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(utterance("studio/alice", 3)), "-c:a",
                        codec, str(made)], check=True)
        answer = server.post("/api/speaker/identify", files={"audio": (made.name, made.read_bytes(), media)}).json()
        assert answer["speakers"][0]["speaker"] == "studio/alice", (suffix, answer)


def test_bad_audio_uploads_are_4xx_naming_the_reason_code(server):
    rng = np.random.default_rng(0)
    good = utterance("studio/bruno", 1).read_bytes()
    uploads = {"empty_audio": b"", "truncated": good[:2000], "not_audio": b"<html>not audio</html>",
               "silent": wav(np.zeros(32000)), "too_short": wav(0.3 * rng.standard_normal(1600)),
               "too_long": wav(0.3 * rng.standard_normal(16000 * 25))}
    for code, data in uploads.items():
        response = server.post("/api/speaker/identify", files={"audio": ("x.wav", data, "audio/wav")})
        assert response.status_code == 422 and response.json()["error"] == code, (code, response.text)


def test_kline_similar_shows_the_matches_behind_the_factor(server, demo):
    assets = server.get("/api/kline/assets").json()["assets"]
    assert len(assets) >= 4 and all(a["windows"] > 0 for a in assets)
    factor = pd.read_parquet(demo / "results" / "kline_factor" / "factor.parquet")
    for row in factor.iloc[[0, len(factor) // 2, -1]].itertuples():
        date = str(pd.Timestamp(row.date).date())
        answer = server.get("/api/kline/similar", params={"asset": row.asset, "date": date}).json()
        assert answer["asset"] == row.asset and answer["date"] == date
        assert answer["n_matches"] == row.n_matches == len(answer["matches"])
        assert answer["win_rate"] == pytest.approx(row.win_rate, abs=1e-6)  # what the factor says, and why
        assert answer["mean_forward_return"] == pytest.approx(row.mean_fwd_return, abs=1e-6)
        assert all(m["known_date"] <= date for m in answer["matches"])  # no look-ahead
        assert len(answer["closes"]) == answer["window"] and all(len(m["closes"]) == answer["window"]
                                                                   for m in answer["matches"])
    assert server.get("/api/kline/similar", params={"asset": "NOPE", "date": "2019-01-02"}).json()["error"] == \
        "unknown_asset"
    assert server.get("/api/kline/similar", params={"asset": assets[0]["asset"], "date": "soon"}).status_code == 422
    early = server.get("/api/kline/similar", params={"asset": assets[0]["asset"], "date": "1990-01-02"}).json()
    assert early["error"] == "no_window" and assets[0]["first"] in early["detail"]


def test_probe_cases_page_by_failure_key_with_images_and_qa(server, demo):
    keys = server.get("/api/probe/keys").json()["keys"]
    cases = pd.read_parquet(demo / "results" / "probe_qa" / "failure_cases.parquet")
    assert sum(k["cases"] for k in keys) == len(cases) > 0
    first = server.get("/api/probe/cases", params={"limit": 3}).json()
    second = server.get("/api/probe/cases", params={"limit": 3, "offset": 3}).json()
    assert first["total"] == len(cases) and len(first["cases"]) == min(3, len(cases))
    assert not {c["item_id"] for c in first["cases"]} & {c["item_id"] for c in second["cases"]}
    key = keys[0]["key"]
    filtered = server.get("/api/probe/cases", params={"key": key, "limit": 200}).json()
    assert filtered["total"] == keys[0]["cases"] and all(c["key"] == key for c in filtered["cases"])
    qa_items = {json.loads(line)["item_id"] for line in (demo / "results" / "probe_qa" / "qa.jsonl").read_text()
                .splitlines()}
    case = first["cases"][0]
    assert case["id"] and case["label"] != case["prediction"] and case["factor_status"]
    assert bool(case["qa"]) == (case["item_id"] in qa_items)
    with_qa = next(c for c in filtered["cases"] + first["cases"] if c["qa"]) if qa_items else None
    if with_qa:  # each pair with its lineage: the request that made it and the dataset row
        pair = with_qa["qa"][0]
        assert pair["qa_id"].startswith(with_qa["item_id"]) and pair["request_key"] and pair["prompt_hash"]
        assert pair["source"]["file"] == with_qa["file"] and pair["source"]["row"] == with_qa["row"]
    image = server.get(case["image"])
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size[0] > 0


def test_clips_page_through_with_their_frames(server, demo):
    page = server.get("/api/clips", params={"limit": 2}).json()
    index = pd.read_parquet(demo / "results" / "video_frames" / "index.parquet")
    assert page["total"] == int((index["status"] == "ok").sum()) and len(page["clips"]) == 2
    clip = server.get(f"/api/clips/{page['clips'][1]['clip']}").json()
    assert clip == page["clips"][1] and clip["n_frames"] == 16 and clip["text"]
    frame = server.get(clip["frames"][15])
    assert frame.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(frame.content)).size == (256, 160)
    assert server.get(f"/api/clips/{clip['clip']}/frames/16").status_code == 404
    # the clips that failed are listed too, with their reason codes, and the file's name (not its folder)
    assert page["failed"] == 2
    failed = server.get("/api/clips/failed").json()
    assert failed["total"] == 2
    codes = {f["file"]: f["reason_code"] for f in failed["failed"]}
    assert codes["gone.mp4"] == "missing" and codes["broken.mp4"] in ("not_a_video", "decode_error", "truncated")
    assert all("/" not in f["file"] and "/resources/" not in f["reason"] for f in failed["failed"]), failed


def test_concurrent_queries_are_batched_and_counted_in_metrics(server, demo):
    queries = [crop(sku_photo(demo, n % 16), 0.8) for n in range(24)]
    answers: list = [None] * len(queries)

    def ask(n: int) -> None:
        answers[n] = server.post("/api/sku/search", params={"k": 1},
                                 files=[("images", ("q.jpg", queries[n], "image/jpeg"))])

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers)
    assert server.get("/api/sku", params={"id": "no-such-sku"}).status_code == 404
    top1 = np.mean([a.json()["results"][0]["hits"][0]["sku_id"] == f"sku{n % 16:04d}" for n, a in enumerate(answers)])
    assert top1 >= 0.75, top1
    metrics = server.get("/metrics").text
    batches = float(_metric(metrics, 'mlprep_batch_size_count{model="sku"}'))
    items = float(_metric(metrics, 'mlprep_batch_size_sum{model="sku"}'))
    assert batches < items, (batches, items)  # some queries shared a forward pass
    assert 'mlprep_requests_total{method="POST",route="/api/sku/search",status="200"}' in metrics
    assert 'mlprep_errors_total{code="unknown_sku"}' in metrics
    assert 'mlprep_request_seconds_bucket{le="0.5",route="/api/sku/search"}' in metrics
    assert 'mlprep_artefact_loaded{pipeline="sku_index"} 1.0' in metrics
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(line["path"] == "/api/sku/search" and line["status"] == 200 and line["ms"] > 0 for line in lines)


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name))


# ---------------------------------------------------------------- what a folder lacks, the token, the bind


def test_an_unbuilt_folder_says_which_pipeline_is_missing_and_the_token_is_required(tmp_path):
    (tmp_path / "results").mkdir()
    served = Served(tmp_path / "results", "--token-env", "MLPREP_TEST_TOKEN", env={"MLPREP_TEST_TOKEN": "s3cret"},
                    ready=False)
    try:
        auth = {"Authorization": "Bearer s3cret"}
        assert served.get("/healthz").status_code == 200  # the process is up, no token needed
        assert served.get("/readyz").status_code == 503
        assert served.get("/api/status").status_code == 401
        assert served.get("/api/status", headers={"Authorization": "Bearer s3cre"}).status_code == 401
        for scheme in ("bearer", "BEARER", "Bearer "):  # the scheme is case-insensitive
            assert served.get("/api/status", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        for wrong in ("Basic s3cret", "s3cret", "Bearers3cret", "Bearer s3cret x"):
            assert served.get("/api/status", headers={"Authorization": wrong}).status_code == 401, wrong
        assert served.get("/metrics").status_code == 401
        status = served.get("/api/status", headers=auth).json()
        assert status["token_required"] and not any(p["loaded"] for p in status["pipelines"].values())
        for path, pipeline in [("/api/kline/assets", "kline_factor"), ("/api/probe/keys", "probe_qa"),
                               ("/api/clips", "video_frames"), ("/api/speaker/speakers", "speaker_embed")]:
            response = served.get(path, headers=auth)
            assert response.status_code == 503 and response.json()["pipeline"] == pipeline
            assert "has not been built" in response.json()["detail"] and f"snakemake {pipeline}" in \
                response.json()["detail"]
        response = served.post("/api/sku/search", headers=auth, files=[("images", ("a.jpg", b"x", "image/jpeg"))])
        assert response.status_code == 503 and "index.faiss" in response.json()["detail"]
    finally:
        served.stop()


def test_binding_beyond_loopback_without_a_token_warns(tmp_path):
    (tmp_path / "results").mkdir()
    served = Served(tmp_path / "results", host="0.0.0.0", ready=False)
    try:
        assert "without a token" in served.log()
    finally:
        served.stop()
    missing = subprocess.run([sys.executable, "-m", "mlprep.cli", "serve", "--token-env", "MLPREP_UNSET_TOKEN"],
                             capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                  if k != "MLPREP_UNSET_TOKEN"})
    assert missing.returncode == 2 and "MLPREP_UNSET_TOKEN" in missing.stderr


# ---------------------------------------------------------------- hot reload


def test_a_rebuilt_index_is_served_without_a_failed_request_and_a_broken_one_keeps_the_old(tmp_path, tiny_clip):
    """The workflow reruns with two more SKUs while clients query; then a broken index file is renamed in."""
    work = tmp_path
    make_catalog(work / "data", 6)
    catalog = json.loads((work / "data" / "sku_data.json").read_text())
    (work / "data" / "sku_data.json").write_text(json.dumps(catalog[:4]))
    config = workflow_config(work, {**tiny_clip, "pretrained": None}, shards=1)  # random weights: the page warns
    run_snakemake(work, config, "sku_index")
    served = Served(work / "results", "--reload-s", "0.3")
    query = (work / "data" / "images" / catalog[5]["images"][0]).read_bytes()
    new_sku = catalog[5]["sku_id"]
    seen: list[list[tuple[int, str]]] = [[] for _ in range(4)]
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=served.base, timeout=60) as http:
            while not stop.is_set():
                response = http.post("/api/sku/search", params={"k": 1}, files=[("images", ("q.jpg", query))])
                top = response.json()["results"][0]["hits"][0]["sku_id"] if response.status_code == 200 else ""
                seen[n].append((response.status_code, top))

    try:
        status = served.get("/api/status").json()["pipelines"]["sku_index"]
        assert status["about"]["random_weights"] and status["about"]["skus"] == 4
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        (work / "data" / "sku_data.json").write_text(json.dumps(catalog))
        run_snakemake(work, config, "sku_index")
        deadline = time.time() + 30
        while time.time() < deadline and not all(s and s[-1][1] == new_sku for s in seen):
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        for answers in seen:
            assert answers and all(code == 200 for code, _ in answers), answers
            tops = [top for _, top in answers]
            assert tops[0] != new_sku and tops[-1] == new_sku
            switched = tops.index(new_sku)
            assert set(tops[switched:]) == {new_sku}  # once switched, never back to the old index
        status = served.get("/api/status").json()["pipelines"]["sku_index"]
        assert status["reloads"] >= 1 and status["about"]["skus"] == 6
        # the new SKU's photo features came with the index: its catalog photo matches them (a small drawn package
        # has few keypoints, so fewer inliers than verification asks for, but only reloaded features give any)
        [hit] = served.post("/api/sku/search", params={"k": 1},
                            files=[("images", ("q.jpg", query))]).json()["results"][0]["hits"]
        assert hit["sku_id"] == new_sku and hit["inliers"] > 0, hit

        index = work / "results" / "sku_index" / "index.faiss"
        good = index.read_bytes()
        broken = index.with_name("index.faiss.tmp")
        broken.write_bytes(b"not an index")
        broken.rename(index)
        deadline = time.time() + 20
        while time.time() < deadline and not served.get("/api/status").json()["pipelines"]["sku_index"]["error"]:
            time.sleep(0.2)
        status = served.get("/api/status").json()["pipelines"]["sku_index"]
        assert status["error"] and status["loaded"], status
        answer = served.post("/api/sku/search", files=[("images", ("q.jpg", query))])
        assert answer.status_code == 200 and answer.json()["results"][0]["hits"][0]["sku_id"] == new_sku
        assert served.get("/readyz").status_code == 200
        broken.write_bytes(good)
        broken.rename(index)
        deadline = time.time() + 20
        while time.time() < deadline and served.get("/api/status").json()["pipelines"]["sku_index"]["error"]:
            time.sleep(0.2)
        assert served.get("/api/status").json()["pipelines"]["sku_index"]["error"] is None
        with browser_page() as page:
            page.goto(served.base + "/")
            warning = page.locator('[data-model="sku_index"] .warning')
            warning.wait_for()
            assert "RANDOM weights" in warning.inner_text() and warning.is_visible()
            page.screenshot(path=str(_artifact("random-weights.png")))
    finally:
        stop.set()
        served.stop()


# ---------------------------------------------------------------- the page, in Chromium


def _artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


class browser_page:
    """A Playwright page in Debian's Chromium (skipped, or failed where CI requires it, without Chromium)."""

    def __enter__(self):
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            if os.environ.get("MLPREP_REQUIRE_CHROMIUM") == "1":
                pytest.fail("chromium is not installed (make test installs it as root)")
            pytest.skip("chromium is not installed")
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                            "--disable-component-update", "--disable-sync"])
        page = self._browser.new_page(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        page.on("request", lambda request: self.requests.append(request.url))
        self.page = page
        return page

    def __exit__(self, *exc):
        self._browser.close()
        self._playwright.stop()


def test_the_page_in_a_browser(server, demo, tmp_path):
    snapshot = tmp_path / "snapshot.jpg"
    snapshot.write_bytes(crop(sku_photo(demo, 1)))
    hostile = tmp_path / "hostile.jpg"
    hostile.write_bytes(crop(sku_photo(demo, 4), 0.9))
    browser = browser_page()
    with browser as page:
        page.goto(server.base + "/")
        page.locator("#tabs button").first.wait_for()
        assert page.locator("#tabs button").count() == 5
        model = page.locator('[data-model="sku_index"]').inner_text()
        assert "tf_efficientnet_lite0" in model and "packaged:efficientnet-lite0" in model and "RANDOM" not in model

        page.set_input_files("#sku-file", str(snapshot))
        page.locator(".card").first.wait_for()
        first = page.locator(".card").first
        assert first.get_attribute("data-sku") == "sku0001" and "Espresso cup" in first.inner_text()
        page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth)")
        page.screenshot(path=str(_artifact("sku.png")))

        page.set_input_files("#sku-file", str(hostile))
        page.wait_for_function("document.querySelector('.card') && document.querySelector('.card').dataset.sku "
                               "=== 'sku0004'")
        assert HOSTILE in page.locator(".card h4").first.inner_text()  # the markup shows as text
        assert page.evaluate("window.__pwned") is None and page.locator('img[src="x"]').count() == 0
        page.screenshot(path=str(_artifact("sku-hostile-name.png")))

        awkward = tmp_path / "awkward.jpg"  # a SKU whose id holds '/' and '..': its photo still shows
        awkward.write_bytes((demo / "resources" / "demo" / "sku" / "images" / "awkward1.jpg").read_bytes())
        page.set_input_files("#sku-file", str(awkward))
        page.wait_for_function("document.querySelector('.card') && document.querySelector('.card').dataset.sku "
                               "=== '../../escape'")
        page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth)")

        page.click('#tabs button[data-tab="speaker_embed"]')
        page.set_input_files("#speaker-file", str(utterance("phone/dana", 2)))
        page.locator("#speaker-results tr[data-speaker]").first.wait_for()
        assert page.locator("#speaker-results tr[data-speaker]").first.get_attribute("data-speaker") == "phone/dana"
        page.screenshot(path=str(_artifact("speakers.png")))

        page.click('#tabs button[data-tab="kline_factor"]')
        factor = pd.read_parquet(demo / "results" / "kline_factor" / "factor.parquet")
        row = factor.iloc[len(factor) // 2]
        page.locator(f'#kline-asset option[value="{row.asset}"]').wait_for(state="attached")
        page.select_option("#kline-asset", row.asset)
        page.fill("#kline-date", str(pd.Timestamp(row.date).date()))
        page.click("#kline-form button")
        page.locator(".kline-chart polyline").nth(int(row.n_matches)).wait_for()
        assert page.locator(".kline-chart").count() == 1 + int(row.n_matches)
        assert f"win rate {row.win_rate:.2f}" in page.locator("#kline-result").inner_text()
        page.screenshot(path=str(_artifact("kline.png")))

        page.click('#tabs button[data-tab="probe_qa"]')
        page.locator(".case img").first.wait_for()
        page.wait_for_function("[...document.querySelectorAll('.case img')].every(i => i.complete && i.naturalWidth)")
        assert "taken for" in page.locator(".case h4").first.inner_text()
        page.screenshot(path=str(_artifact("probe.png")), full_page=True)

        page.click('#tabs button[data-tab="video_frames"]')
        page.wait_for_function("document.querySelectorAll('#clip-view .frames img').length === 16 && "
                               "[...document.querySelectorAll('#clip-view .frames img')].every(i => i.naturalWidth)")
        page.locator("#clip-failed summary").click()
        assert page.locator('#clip-failed li[data-code="missing"]').count() == 1
        assert "gone.mp4" in page.locator("#clip-failed").inner_text()
        page.screenshot(path=str(_artifact("clips.png")))

        page.goto(server.base + "/docs")  # the API docs, from the package's own Swagger UI
        page.locator(".opblock").nth(len(server.get("/openapi.json").json()["paths"]) - 1).wait_for(timeout=30000)
        assert "/api/sku/search" in page.locator("#swagger-ui").inner_text()
        page.screenshot(path=str(_artifact("docs.png")))
        for shot in ("sku", "speakers", "kline", "probe", "clips", "docs"):
            pixels = np.asarray(Image.open(_artifact(f"{shot}.png")).convert("L"), dtype=np.float32)
            assert pixels.std() > 10, f"{shot}: blank screenshot"
    assert browser.requests and all(url.startswith((server.base, "blob:", "data:")) for url in browser.requests), \
        [url for url in browser.requests if not url.startswith(server.base)]  # nothing from elsewhere
