"""`mlprep serve`: the workflow's artefacts as an HTTP API and a web page (one ASGI app, FastAPI).

The app reads only the results folder it is given, through each pipeline's own code (mlprep.serve.pipelines),
answers image and audio queries with one model per process and concurrent requests batched into it
(mlprep.serve.batcher), reloads an artefact when the workflow rewrites it (mlprep.serve.registry), and says what
it lacks: a pipeline that has not been built answers 503 naming the missing files.

Operations: /healthz (the process is up), /readyz (every built pipeline is loaded), Prometheus /metrics
(requests and latency by route, batch sizes, errors by code, loaded artefacts), one JSON access-log line per
request. Safety: uploads are size-limited (the body is counted, not the header trusted) and their format sniffed
from the content; images are refused above `max_image_pixels` before decoding, audio above `max_audio_seconds`
from its header; with a token every /api call and /metrics needs `Authorization: Bearer <token>` (compared in
constant time); CORS is off unless origins are given; every id shown in the page is inserted as text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from mlprep.serve.batcher import Batcher
from mlprep.serve.pipelines import (RequestError, embed_uploads, load_kline, load_probe, load_sku, load_speaker,
                                    load_video, sku_search)
from mlprep.serve.registry import NotBuilt, Registry, Slot

log = logging.getLogger(__name__)
access = logging.getLogger("mlprep.serve.access")
PAGE = Path(__file__).with_name("page")

# the files whose (inode, size, mtime) make up each pipeline's version: the workflow renames them into place
PIPELINE_FILES = {
    "sku_index": ["index.faiss", "metadata.parquet", "index_info.json", "manifest.parquet", "local_features.parquet",
                  "local_features_points.npy", "local_features_descriptors.npy"],
    "speaker_embed": ["speakers.parquet", "speaker_embeddings.npy", "summary.json"],
    "kline_factor": ["library.parquet", "library_embeddings.npy", "library_closes.npy", "index.faiss",
                     "series_checks.parquet", "factor_stats.json"],
    "probe_qa": ["failure_cases.parquet", "summary.json"],
    "video_frames": ["index.parquet", "failures.parquet"],
}


@dataclass
class ServeSettings:
    results: Path = Path("results")
    token: str | None = None
    device: str | None = "cpu"
    threads: int = 2
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_audio_seconds: float = 120.0
    max_batch: int = 64
    encode_batch: int | str = 8  # rows per image-model forward pass (fixed, padded); "auto": the device's default
    batch_wait_ms: float = 2.0
    reload_s: float = 2.0
    cors_origins: list[str] = field(default_factory=list)
    max_k: int = 100
    speaker_threshold: float | None = None  # overrides eval.json's threshold
    rerank: bool = True  # SKU answers re-ranked geometrically where the index has its photos' local features


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mlprep_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("mlprep_request_seconds", "request latency", ["route"], registry=self.registry,
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10))
        self.batch = Histogram("mlprep_batch_size", "items per model batch", ["model"], registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.errors = Counter("mlprep_errors", "answers with an error code", ["code"], registry=self.registry)
        self.loaded = Gauge("mlprep_artefact_loaded", "1 while a pipeline's artefacts are loaded", ["pipeline"],
                            registry=self.registry)
        self.reloads = Gauge("mlprep_artefact_reloads", "new versions loaded since start", ["pipeline"],
                             registry=self.registry)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused (413) however it is sent (Content-Length
    or chunked): the bytes are counted as they arrive. On overflow the client gets the 413 at once, the app sees
    the client gone (http.disconnect) and whatever it still sends is dropped."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(send, self.limit)
        seen, refused, started = 0, False, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    if not started:
                        await _too_large(send, self.limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            nonlocal started
            if refused:
                return  # the 413 went out: the app's own answer is dropped
            started = True
            await send(message)

        await self.app(scope, counted, guarded)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"error": "too_large", "detail": f"the request body is over {limit:,} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _model_thread_setup(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def create_app(settings: ServeSettings):
    results = Path(settings.results)
    metrics = Metrics()
    encoders: dict = {}
    backends: dict = {}
    # Every model build, forward pass and FAISS search runs in this one thread. Each thread that runs torch's (or
    # FAISS's) parallel loops gets its own OpenMP team, and two teams on the same cores slow each other down for
    # good: measured on 2 cores, a speaker embedding took 9 ms from one thread and 75 ms once a second thread
    # had run the model too.
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model", initializer=_model_thread_setup,
                                      initargs=(settings.threads,))

    def on_model_thread(load):
        return lambda folder: model_thread.submit(load, folder).result()

    async def in_model_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(model_thread, fn, *args)

    loaders = {
        "sku_index": on_model_thread(lambda f: load_sku(f, encoders, settings.device, settings.threads,
                                                        settings.encode_batch, settings.rerank)),
        "speaker_embed": on_model_thread(lambda f: load_speaker(f, backends, settings.device, settings.threads,
                                                                settings.speaker_threshold)),
        "kline_factor": on_model_thread(load_kline),
        "probe_qa": load_probe,
        "video_frames": load_video,
    }
    registry = Registry({name: Slot(name, results / name, PIPELINE_FILES[name], loaders[name])
                         for name in PIPELINE_FILES}, settings.reload_s)

    def observe(model: str):
        return lambda n: metrics.batch.labels(model).observe(n)

    sku_batcher = Batcher(lambda items: _run_sku(registry, items, settings), settings.max_batch,
                          settings.batch_wait_ms / 1000, "sku", observe("sku"), model_thread)
    speaker_batcher = Batcher(lambda items: _run_speaker(items), settings.max_batch, settings.batch_wait_ms / 1000,
                              "speaker", observe("speaker"), model_thread)

    @asynccontextmanager
    async def lifespan(_app):
        await asyncio.to_thread(registry.start)
        sku_batcher.start()
        speaker_batcher.start()
        yield
        registry.stop()
        await sku_batcher.stop()
        await speaker_batcher.stop()
        model_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mlprep serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="The workflow's artefacts: SKU search, speaker identification and verification, "
                              "K-line pattern matches, probe failure cases and QA pairs, video clips.")
    app.state.registry, app.state.metrics, app.state.settings = registry, metrics, settings
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        path = request.url.path
        if settings.token and (path.startswith("/api/") or path == "/metrics"):
            scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
            # the scheme is case-insensitive (RFC 9110); the token is compared in constant time
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
                response = _error(401, "unauthorized", "this server needs Authorization: Bearer <token>")
                return _finish(request, response, started, metrics, "auth")
        try:
            response = await call_next(request)
        except ClientDisconnect:  # the body was refused as too large, or the client left: no one to answer
            return Response(status_code=400)
        except Exception:  # noqa: BLE001 - an unexpected error is one 500, never a dead server
            log.exception("%s %s failed", request.method, path)
            response = _error(500, "internal_error", "the server failed on this request (see its log)")
        route = request.scope.get("route")
        return _finish(request, response, started, metrics, getattr(route, "path", "unmatched"))

    @app.exception_handler(RequestError)
    async def request_error(_request, err: RequestError):
        metrics.errors.labels(err.code).inc()
        return _error(err.status, err.code, str(err))

    @app.exception_handler(NotBuilt)
    async def not_built(_request, err: NotBuilt):
        metrics.errors.labels("not_built").inc()
        return _error(503, "not_built", str(err), pipeline=err.pipeline)

    def get(pipeline: str):
        return registry.get(pipeline)

    # ------------------------------------------------------------ operations

    @app.get("/healthz", tags=["operations"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz():
        ready, status = registry.ready()
        return JSONResponse({"ready": ready, "pipelines": status}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, slot in registry.slots.items():
            status = slot.status()
            metrics.loaded.labels(name).set(1 if status["loaded"] else 0)
            metrics.reloads.labels(name).set(status["reloads"])
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status", tags=["operations"])
    async def status():
        """Each pipeline: loaded or not (and why), what it holds, the model and weights that made it."""
        out = {}
        for name, slot in registry.slots.items():
            state = slot.status()
            try:
                state["about"] = slot.get().describe()
            except NotBuilt as err:
                state["about"], state["detail"] = None, str(err)
            out[name] = state
        return {"pipelines": out, "token_required": bool(settings.token)}

    # ------------------------------------------------------------ sku_index

    @app.post("/api/sku/search", tags=["sku_index"])
    async def sku_search_route(request: Request, k: int = Query(5, ge=1), images: list[UploadFile] | None = File(None)):
        """Query images (multipart `images`, or JSON `{"images": [base64...], "k": 5}`): per image its top-k SKUs,
        each SKU once (its best view), or that image's error."""
        get("sku_index")
        if images:
            datas = [await upload.read() for upload in images]
        else:
            datas, k = await _json_images(request, k)
        if not datas:
            raise RequestError(422, "no_images", "send one or more images (multipart field `images`, or JSON)")
        if k < 1:
            raise RequestError(422, "bad_k", f"k must be at least 1, got {k}")
        k = min(k, settings.max_k)
        answers = await sku_batcher.submit([(data, k) for data in datas])
        out = []
        for n, answer in enumerate(answers):
            if isinstance(answer, NotBuilt):
                raise answer
            if isinstance(answer, BaseException):
                answer = {"error": {"code": "internal_error", "detail": type(answer).__name__}}
            if "error" in answer:
                metrics.errors.labels(answer["error"]["code"]).inc()
            out.append({"query": n, **answer})
        return {"k": k, "results": out}

    # The SKU id travels as a query value, not a path segment: ids may hold `/`, `..` or `%`, which a path
    # cannot carry through clients and routing intact.
    @app.get("/api/sku", tags=["sku_index"])
    async def sku_detail(sku_id: str = Query(..., alias="id", description="the SKU id, exactly as in the catalog")):
        """A SKU: name, category and the URLs of its catalog photos."""
        return get("sku_index").sku(sku_id)

    @app.get("/api/sku/photo", tags=["sku_index"])
    async def sku_photo(sku_id: str = Query(..., alias="id", description="the SKU id"),
                        n: int = Query(..., ge=0, description="the photo's position in the catalog")):
        """Catalog photo `n` of a SKU, read through the index's manifest."""
        data, kind = get("sku_index").photo(sku_id, n)
        return Response(data, media_type=kind, headers={"Cache-Control": "max-age=60"})

    # ------------------------------------------------------------ speaker_embed

    async def _embed_audio(upload: UploadFile):
        snapshot = get("speaker_embed")
        [vector] = await speaker_batcher.submit([(snapshot, await upload.read(), settings.max_audio_seconds)])
        if isinstance(vector, BaseException):
            raise vector
        return snapshot, vector

    @app.post("/api/speaker/identify", tags=["speaker_embed"])
    async def speaker_identify(audio: UploadFile = File(...), k: int = Query(5, ge=1)):
        """An utterance -> the top-k speakers by cosine score."""
        snapshot, vector = await _embed_audio(audio)
        return {"speakers": snapshot.identify(vector, min(k, settings.max_k)), "threshold": snapshot.threshold,
                "threshold_source": snapshot.threshold_source}

    @app.post("/api/speaker/verify", tags=["speaker_embed"])
    async def speaker_verify(audio: UploadFile = File(...), speaker: str | None = Form(None),
                             other: UploadFile | None = File(None)):
        """An utterance against a known speaker (`speaker`) or against a second utterance (`other`): the cosine
        score and the decision at the threshold the evaluation chose."""
        snapshot, vector = await _embed_audio(audio)
        if other is not None:
            _, second = await _embed_audio(other)
            return {"against": "utterance", **snapshot.verdict(float(vector @ second)),
                    "note": "the threshold was chosen on utterance-against-speaker trials; two single utterances "
                            "score lower, so a 'different' here is weaker evidence than against a speaker"}
        if not speaker:
            raise RequestError(422, "no_reference", "give `speaker` (an id from /api/speaker/speakers) or `other`")
        index = snapshot.index_of(speaker)
        return {"against": speaker, **snapshot.verdict(float(snapshot.vectors[index] @ vector))}

    @app.get("/api/speaker/speakers", tags=["speaker_embed"])
    async def speakers():
        return {"speakers": get("speaker_embed").names}

    # ------------------------------------------------------------ kline_factor

    @app.get("/api/kline/assets", tags=["kline_factor"])
    async def kline_assets():
        return {"assets": get("kline_factor").assets}

    @app.get("/api/kline/similar", tags=["kline_factor"])
    async def kline_similar(asset: str, date: str):
        """The window of `asset` ending on `date`, its top matches known at that date and their win rate."""
        snapshot = get("kline_factor")
        return await in_model_thread(snapshot.similar, asset, date)

    # ------------------------------------------------------------ probe_qa

    @app.get("/api/probe/keys", tags=["probe_qa"])
    async def probe_keys():
        return {"keys": get("probe_qa").keys()}

    @app.get("/api/probe/cases", tags=["probe_qa"])
    async def probe_cases(key: str | None = None, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)):
        return get("probe_qa").page(key, offset, limit)

    @app.get("/api/probe/cases/{case}/image", tags=["probe_qa"])
    async def probe_image(case: int):
        data, kind = await asyncio.to_thread(get("probe_qa").image, case)
        return Response(data, media_type=kind)

    # ------------------------------------------------------------ video_frames

    @app.get("/api/clips", tags=["video_frames"])
    async def clips(offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)):
        """The clips made into frames, a page at a time; `failed` counts those that were not (/api/clips/failed)."""
        return get("video_frames").page(offset, limit)

    @app.get("/api/clips/failed", tags=["video_frames"])
    async def failed_clips(offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)):
        """Every clip that could not be made into frames, with its reason code (a missing or broken file, a bad
        window, a decoder timeout ...)."""
        return get("video_frames").failures(offset, limit)

    @app.get("/api/clips/{clip}", tags=["video_frames"])
    async def clip(clip: int):
        return get("video_frames").clip(clip)

    @app.get("/api/clips/{clip}/frames/{i}", tags=["video_frames"])
    async def clip_frame(clip: int, i: int):
        data, kind = await asyncio.to_thread(get("video_frames").frame, clip, i)
        return Response(data, media_type=kind, headers={"Cache-Control": "max-age=60"})

    # ------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def api_docs():
        """Swagger UI from the package's own copy (swagger-ui-bundle-v2): nothing is fetched from elsewhere."""
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url=app.openapi_url, title="mlprep serve: API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png",
                                   # no badge from the public validator: the page asks nothing of other hosts
                                   swagger_ui_parameters={"validatorUrl": None})

    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    app.mount("/docs-assets", StaticFiles(directory=_swagger_ui_folder()), name="docs-assets")
    return BodyLimit(app, settings.max_upload_bytes) if settings.max_upload_bytes else app


def _swagger_ui_folder() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def _run_sku(registry: Registry, items: list, settings: ServeSettings) -> list:
    """The SKU batch: every queued image through the model at once, each answered with its own k."""
    try:
        snapshot = registry.get("sku_index")
    except NotBuilt as err:
        return [err] * len(items)
    k = max(k for _, k in items)
    answers = sku_search(snapshot, [data for data, _ in items], k, settings.max_image_pixels)
    return [{**a, "hits": a["hits"][:own]} if "hits" in a else a for a, (_, own) in zip(answers, items)]


def _run_speaker(items: list) -> list:
    """The speaker batch: items are (snapshot, upload bytes, max seconds). Each upload goes through the pipeline's
    audio checks (a bad one is that item's RequestError); those of one snapshot share one model call."""
    out: list = [None] * len(items)
    groups: dict[int, list[tuple[int, object]]] = {}
    for n, (snapshot, data, max_seconds) in enumerate(items):
        try:
            prepared = snapshot.prepare(data, max_seconds)
        except RequestError as err:
            out[n] = err
            continue
        groups.setdefault(id(snapshot), []).append((n, prepared))
    for members in groups.values():
        snapshot = items[members[0][0]][0]
        vectors = embed_uploads(snapshot, [prepared for _, prepared in members])
        for (n, _), vector in zip(members, vectors):
            out[n] = vector
    return out


async def _json_images(request, k: int) -> tuple[list[bytes], int]:
    if "application/json" not in request.headers.get("content-type", ""):
        raise RequestError(415, "unsupported_media", "send images as multipart `images` or JSON "
                                                     "{\"images\": [base64...]}")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested deeper than the parser goes
        detail = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise RequestError(422, "bad_json", f"the body is not JSON: {detail}") from None
    if not isinstance(body, dict):
        raise RequestError(422, "bad_json", f"the body must be a JSON object, not {type(body).__name__}")
    items, k = body.get("images") or [], body.get("k", k)
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise RequestError(422, "bad_json", "`images` must be a list of base64 strings")
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, "bad_k", f"k must be a whole number, got {str(k)[:40]!r}")
    try:
        return [base64.b64decode(i.split(",", 1)[-1], validate=True) for i in items], k
    except (ValueError, binascii.Error) as err:
        raise RequestError(422, "bad_json", f"an image is not base64: {err}") from err


def _error(status: int, code: str, detail: str, **extra):
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


def _finish(request, response, started: float, metrics: Metrics, route: str):
    seconds = time.perf_counter() - started
    metrics.requests.labels(route, request.method, str(response.status_code)).inc()
    metrics.latency.labels(route).observe(seconds)
    access.info(json.dumps({"method": request.method, "path": request.url.path, "route": route,
                            "status": response.status_code, "ms": round(seconds * 1000, 2),
                            "client": request.client.host if request.client else None}))
    return response
