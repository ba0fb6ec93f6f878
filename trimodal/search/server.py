"""`mm serve`: a search page over an index, and the JSON API behind it (FastAPI; uvicorn runs it).

FastAPI rather than gradio: the API is part of the contract (documented routes, multipart uploads, one
JSON error shape) and the page is one static file, which a real browser test drives; gradio's widgets
would add a second front end and its own API, for no widget the page needs.

Routes:

    GET  /                          the page
    GET  /api/health                {"status": "ok", "split", "images", "modalities", "family"}
    GET  /api/info                  what the page shows once: the run, split, counts, the run's recalls
    POST /api/search                multipart: `text`, or an `image` or `audio` file; `in` (image, text or
                                    audio); `k` (1…100). Answers {"query", "in", "results": [{"rank",
                                    "score", "key", "caption", "image_url", "audio_urls"}]}, and
                                    "generated_caption" for an image query to a captioning run
    GET  /media/{key}/image         the image of an indexed key, from the shards
    GET  /media/{key}/audio/{n}     its n-th spoken caption

Every failure is a 4xx with {"error": "one line"}, and the server keeps serving. Media are looked up by
key among the indexed items only, so no request names a path: nothing outside the shards can be reached.
"""

from __future__ import annotations

import asyncio
import io
from importlib import resources
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from trimodal.errors import TrimodalError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # an upload larger than this is refused (413)
MAX_K = 100
_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "wav": "audio/wav",
          "flac": "audio/flac"}


def create_app(index, encoder, *, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    """The FastAPI app over a `SearchIndex` and its `QueryEncoder`."""
    from trimodal.search.searcher import search

    app = FastAPI(title="trimodal search", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
    page = resources.files("trimodal.search").joinpath("page.html").read_text(encoding="utf-8")
    lock = asyncio.Lock()  # one query at a time through the model: torch runs it on every core anyway

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in exc.errors()[:3])
        return error(422, f"malformed request ({problems})")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    async def home() -> str:
        return page

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": "ok", "split": index.manifest["split"], "images": index.manifest["images"],
                "modalities": index.modalities, "family": index.manifest["family"]}

    @app.get("/api/info")
    async def info() -> dict:
        manifest = index.manifest
        return {"run": manifest["run"], "checkpoint": manifest["checkpoint"], "split": manifest["split"],
                "family": manifest["family"], "images": manifest["images"], "modalities": index.modalities,
                "rows": {m: info["rows"] for m, info in manifest["modalities"].items()},
                "queries": encoder.featurizer.modalities, "recalls": manifest.get("recalls"),
                "captions": encoder.captions, "max_upload_bytes": max_upload_bytes, "max_k": MAX_K}

    @app.post("/api/search")
    async def api_search(request: Request):
        length = int(request.headers.get("content-length") or 0)
        if length > max_upload_bytes + 64 * 1024:
            return error(413, f"the upload ({length:,} bytes) is larger than {max_upload_bytes:,} bytes, the limit")
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return error(400, f"malformed request: send multipart/form-data (got {content_type or 'no content type'})")
        try:
            form = await request.form(max_files=2, max_fields=8)
        except Exception as exc:  # noqa: BLE001 - starlette's multipart parser raises several kinds
            return error(400, f"malformed request: not a multipart form ({type(exc).__name__})")
        query = await _query(form, max_upload_bytes)
        if isinstance(query, tuple) and query[0] == "error":
            return error(query[1], query[2])
        kind, value = query
        modality = form.get("in") or None
        try:
            k = int(form.get("k") or 10)
        except ValueError:
            return error(422, f"k must be a whole number (got {form.get('k')!r})")
        if not 1 <= k <= MAX_K:
            return error(422, f"k must be between 1 and {MAX_K} (got {k})")
        if modality is not None and modality not in index.modalities:
            return error(422, f"'in' must be one of {', '.join(index.modalities)} (got {modality!r})")
        async with lock:
            try:
                results = await asyncio.to_thread(search, index, encoder, kind, value, modality=modality, k=k)
                generated = (await asyncio.to_thread(encoder.caption, value)
                             if kind == "image" and encoder.captions else None)
            except TrimodalError as exc:
                return error(415 if "cannot decode" in str(exc) else 422, str(exc).splitlines()[0])
        answer = {"query": kind, "in": results[0].modality if results else modality,
                  "results": [_result(result) for result in results]}
        if generated is not None:
            answer["generated_caption"] = generated
        return answer

    @app.get("/media/{key}/image")
    async def image(key: str):
        return await _media(key, "image", 0)

    @app.get("/media/{key}/audio/{number}")
    async def audio(key: str, number: int):
        return await _media(key, "audio", number)

    async def _media(key: str, kind: str, number: int):
        try:
            data, member = await asyncio.to_thread(index.media, key, kind, number)
        except KeyError:
            return error(404, f"no {kind} {key!r}{f' number {number}' if kind == 'audio' else ''} in this index")
        except TrimodalError as exc:
            return error(404, str(exc).splitlines()[0])
        return Response(data, media_type=_TYPES.get(member.rsplit(".", 1)[-1], "application/octet-stream"),
                        headers={"Cache-Control": "max-age=3600"})

    return app


async def _query(form, max_bytes: int):
    """("text" | "image" | "audio", value) of the form, or ("error", status, message)."""
    from starlette.datastructures import UploadFile

    text = form.get("text")
    files = [(name, form.get(name)) for name in ("image", "audio") if isinstance(form.get(name), UploadFile)]
    given = ([("text", text)] if isinstance(text, str) and text != "" else []) + files
    if not given:
        return "error", 400, "empty query: give `text`, or an `image` or `audio` file"
    if len(given) > 1:
        return "error", 400, f"one query at a time (got {', '.join(name for name, _ in given)})"
    kind, value = given[0]
    if kind == "text":
        if not value.strip():
            return "error", 400, "empty query: the text is blank"
        if len(value) > 2000:
            return "error", 413, "the text query is longer than 2,000 characters"
        return kind, value
    data = await value.read(max_bytes + 1)
    if len(data) > max_bytes:
        return "error", 413, f"the {kind} upload is larger than {max_bytes:,} bytes"
    if not data:
        return "error", 400, f"the {kind} upload is empty"
    problem = _not_a(kind, data)
    if problem:
        return "error", 415, problem
    return kind, data


def _not_a(kind: str, data: bytes) -> str | None:
    """Why `data` is not an image (or audio) the featurizer can read, or None."""
    if kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            Image.open(io.BytesIO(data)).verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            return f"the upload is not an image that can be decoded ({type(exc).__name__})"
        return None
    import soundfile

    try:
        soundfile.info(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - libsndfile's errors
        return f"the upload is not audio that can be decoded (wav or flac: {str(exc).splitlines()[0][:120]})"
    return None


def _result(result) -> dict:
    key = quote(result.key, safe="")
    return {"rank": result.rank, "score": round(result.score, 6), "key": result.key, "caption": result.caption,
            "captions": result.captions, "image_url": f"/media/{key}/image",
            "audio_urls": [f"/media/{key}/audio/{n}" for n in range(len(result.utterances))]}
