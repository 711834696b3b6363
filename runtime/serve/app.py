"""The FastAPI app of persense-serve: REST endpoints over one shared EngineSet, and the web page at `/`.

    POST /v1/references  image + (mask | box | point...[, label...]) [precision]  -> {"id", "mask", ...}
    POST /v1/segment     image + reference [box | text] [method] [images=true]      -> {"count", "instances", ...}
    GET  /v1/info, GET /healthz, GET /docs (OpenAPI)

Masks are COCO RLE (pycocotools). Every refused request is a 4xx with {"detail": "<one line>"} (docs/ERRORS.md,
"persense-serve"); the endpoints are plain functions, run by the server's thread pool on the shared engines.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from persense.runtime.errors import PersenseError
from persense.runtime.pipeline.reference_prompt import parse_numbers
from persense.runtime.serve.engines import EngineSet, NotFound, reference_id
from persense.runtime.serve.limits import BodyLimit
from persense.runtime.serve.payloads import (
    TooLarge,
    client_message,
    instances,
    png_base64,
    read_image,
    rle,
    saved,
    upload_folder,
)

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("persense.serve")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may bring."""

    max_upload_bytes: int = 32 * 2**20
    max_side: int = 8192
    concurrency: int = 8  # requests computed at once (the thread pool that runs the endpoints)


class RequestFailed(Exception):
    """A refused request: HTTP status and a one-line message without server paths."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


STATUS = ((NotFound, 404), (TooLarge, 413), (PersenseError, 400))


def refused(error: PersenseError, folder: Path | None) -> RequestFailed:
    """The 4xx a PersenseError becomes (404 unknown names, 413 over the bounds, else 400)."""
    status = next(code for kind, code in STATUS if isinstance(error, kind))
    return RequestFailed(status, client_message(error, folder))


def create_app(engines: EngineSet, limits: Limits = Limits()) -> FastAPI:
    """The app serving `engines` (opened once by the caller, shared by every request)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = limits.concurrency
        yield

    app = FastAPI(
        lifespan=lifespan,
        title="persense",
        summary="Every instance of a reference object in an image: PerSense on exported SAM engines",
        version="1",
    )
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestFailed)
    async def _failed(_: Request, exc: RequestFailed) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"detail": f"{field}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": " ".join(str(exc.detail).split())}, status_code=exc.status_code)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the engines are open."""
        return {"status": "ok"}

    @app.get("/v1/info")
    def info() -> dict:
        """What this server runs and offers: model, backend, precisions and methods to choose from, its bounds."""
        ps = engines.default
        return {
            "model_type": ps.manifest.model_type,
            "manifest": ps.manifest.digest(),
            "backend": ps.backend,
            "counter": ps.counter_name,
            "precision": ps.precision,
            "precisions": list(engines.precisions),
            "methods": list(engines.methods),
            "max_upload_bytes": limits.max_upload_bytes,
            "max_side": limits.max_side,
        }

    @app.post("/v1/references")
    def create_reference(
        image: Annotated[UploadFile, File(description="the reference image")],
        mask: Annotated[UploadFile | None, File(description="the object's 0/255 mask (or give box/point)")] = None,
        box: Annotated[str | None, Form(description="x0,y0,x1,y1 around the object")] = None,
        point: Annotated[list[str] | None, Form(description="x,y on the object; repeatable")] = None,
        label: Annotated[list[int] | None, Form(description="per point: 1 on the object, 0 off it")] = None,
        precision: Annotated[str | None, Form(description="one of /v1/info's precisions")] = None,
    ) -> dict:
        """Encode a reference object (from a mask, or SAM's mask for a box or clicks); its id is content-addressed
        and kept in the reference cache, so it outlives the server."""
        with upload_folder() as folder:
            try:
                ps = engines.get(precision)
                warnings: list[str] = []
                rgb = read_image(saved(folder, "image", image.file.read()), limits.max_side, warnings)
                given = saved(folder, "mask", mask.file.read()) if mask is not None else None
                reference = ps.reference(
                    rgb,
                    given,
                    box=parse_numbers(box, 4, "box") if box else None,
                    points=[parse_numbers(p, 2, "point") for p in point] if point else None,
                    labels=label,
                )
                made = reference.mask
                return {
                    "id": reference_id(reference),
                    "source": reference.source,
                    "size": list(rgb.shape[:2]),
                    "mask": None if made is None else rle(made),
                    "encoding_ms": round(reference.encoding_ms, 3),
                    "warnings": warnings + list(reference.warnings),
                }
            except PersenseError as exc:
                raise refused(exc, folder) from exc

    @app.post("/v1/segment")
    def segment(
        image: Annotated[UploadFile, File(description="the target image")],
        reference: Annotated[str, Form(description="an id from POST /v1/references")],
        box: Annotated[str | None, Form(description="x0,y0,x1,y1: the first exemplar in the target")] = None,
        text: Annotated[str | None, Form(description="the object's name for the exported Grounding DINO")] = None,
        method: Annotated[str | None, Form(description="persense or persense++ (see /v1/info)")] = None,
        images: Annotated[bool, Form(description="also return union and label map as base64 PNGs")] = False,
    ) -> dict:
        """Every instance of the reference object in the image: count, per-instance box, score, point and mask."""
        with upload_folder() as folder:
            try:
                ps, ref = engines.reference(reference)
                chosen = engines.method(method)
                warnings: list[str] = []
                rgb = read_image(saved(folder, "image", image.file.read()), limits.max_side, warnings)
                first = parse_numbers(box, 4, "box", "target") if box else None
                result = ps.segment(rgb, ref, first, text=text or None, method=chosen)
                body = {
                    "count": len(result.points),
                    "size": list(rgb.shape[:2]),
                    "method": result.method,
                    "precision": ps.precision,
                    "instances": instances(result),
                    "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
                    "warnings": warnings + list(result.warnings),
                }
                if images:
                    body |= {"union_png": png_base64(result.union), "label_map_png": png_base64(result.labels)}
                return body
            except PersenseError as exc:
                raise refused(exc, folder) from exc

    return app
