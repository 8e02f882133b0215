"""The review web app (FastAPI): server-rendered pages, a small JSON API, a few lines of plain JS.

Pages: `/` (the grid: filters, progress, faces in priority order), `/face/{run}/{image}/{k}` (one face:
input | restored, the whole photo with the face's box, QA values, its decision history). Images:
`/img/input|restored/{run}/{image}/{k}` and `/img/photo/{run}/{image}`, addressed by catalog keys only,
so a URL can never name a file. API: `GET /api/faces`, `GET /api/faces/{run}/{image}/{k}`,
`POST /api/decisions`.

Only for this machine: the server binds 127.0.0.1, requests must name 127.0.0.1 or localhost as their
host (a DNS-rebinding page cannot reach it) and a POST from a page of another origin is refused.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.templating import Jinja2Templates

from app.review.decisions import FaceKey
from app.review.queue import DECISION_FILTERS, FACE_STATUSES, QA_COLUMNS, ReviewFilters, bucket_choices
from app.review.service import PixelsUnavailable, ReviewService, UnknownRun
from catalogs import REVIEW_DECISIONS

HOST = "127.0.0.1"
ALLOWED_HOSTS = ("127.0.0.1", "localhost")
PAGE_SIZE = 48
STATIC_FILES = {"review.js": "text/javascript", "review.css": "text/css"}
_NO_STORE = {"Cache-Control": "no-store"}


def create_app(service: ReviewService) -> FastAPI:
    """The app over one `ReviewService`."""
    app = FastAPI(title="DynFace review", docs_url=None, redoc_url=None, openapi_url=None)
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("app.review", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _format_number
    templates = Jinja2Templates(env=env)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.update(reviewer=service.reviewer, catalog=service.catalog.uri)
        return templates.TemplateResponse(request, name, context, status_code=status, headers=_NO_STORE)

    def message(request: Request, status: int, title: str, text: str) -> HTMLResponse:
        return render(request, "message.html", status=status, title=title, text=text)

    @app.middleware("http")
    async def this_machine_only(request: Request, call_next: Callable) -> Response:
        host = request.headers.get("host", "")
        if _host_name(host) not in ALLOWED_HOSTS:
            return Response(f"refused: the review app answers only to {HOST}\n", status_code=400)
        origin = request.headers.get("origin")
        if request.method not in ("GET", "HEAD") and origin is not None and origin != f"http://{host}":
            return Response("refused: a request from another site\n", status_code=403)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def grid(
        request: Request,
        run: str = "",
        status: str = "",
        bucket: str = "",
        decision: str = "",
        page: str = "1",
    ) -> HTMLResponse:
        try:
            filters = _filters(run, status, bucket, decision)
            number = max(1, int(page))
        except ValueError as err:
            return message(request, 400, "Bad filter", str(err))
        service.refresh_decisions()
        try:
            view = service.view(filters, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        except UnknownRun as err:
            return message(request, 404, "Unknown run", str(err))
        pages = max(1, math.ceil(view.total / PAGE_SIZE))
        query = {"run": run, "status": status, "bucket": bucket, "decision": decision}
        return render(
            request,
            "grid.html",
            faces=[_card(row) for row in view.faces.to_dict("records")],
            total=view.total,
            counts=view.counts.as_dict(),
            messages=view.messages,
            filters=query,
            runs=service.runs if service.run_id is None else [service.run_id],
            statuses=FACE_STATUSES,
            buckets=bucket_choices(service.faces),
            decisions=DECISION_FILTERS,
            page_number=number,
            pages=pages,
            prev_url=f"/?{urlencode({**query, 'page': number - 1})}" if number > 1 else "",
            next_url=f"/?{urlencode({**query, 'page': number + 1})}" if number < pages else "",
            back_url=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
        )

    @app.get("/face/{run_id}/{image_id}/{face_index}", response_class=HTMLResponse)
    def face_page(
        request: Request, run_id: str, image_id: str, face_index: str, back: str = "/"
    ) -> HTMLResponse:
        key = _key(run_id, image_id, face_index)
        row = None if key is None else service.face_row(key)
        if key is None or row is None:
            return message(request, 404, "No such face", "The catalog has no face at this address.")
        card = _card(service.decided_row(key))
        notes = []
        if card["status"] == "ok" and not service.output_exists(row):
            notes.append(f"The restored face is missing: {row['output_uri']} does not exist.")
        if card["status"] != "ok":
            notes.append(
                f"Sampling failed for this face ({row['error']}); the photo keeps its source pixels."
            )
        boxes = [
            {**_box(other), "current": int(other["face_index"]) == key.face_index}
            for other in service.image_faces(run_id, image_id).to_dict("records")
        ]
        history = [_history_row(r) for r in service.history(key).to_dict("records")]
        return render(
            request,
            "face.html",
            face=card,
            notes=notes,
            boxes=boxes,
            history=history,
            back_url=back if back.startswith("/") and not back.startswith("//") else "/",
        )

    @app.get("/img/{kind}/{run_id}/{image_id}/{face_index}")
    def face_image(kind: str, run_id: str, image_id: str, face_index: str) -> Response:
        key = _key(run_id, image_id, face_index)
        if kind not in ("input", "restored") or key is None or service.face_row(key) is None:
            return _svg_message("no such face", 404)
        try:
            data = service.input_png(key) if kind == "input" else service.restored_png(key)
        except PixelsUnavailable as err:
            return _svg_message(str(err), 404)
        return Response(data, media_type="image/png", headers=_NO_STORE)

    @app.get("/img/photo/{run_id}/{image_id}")
    def photo_image(run_id: str, image_id: str) -> Response:
        try:
            data = service.photo_jpeg(run_id, image_id)
        except LookupError:
            return _svg_message("no such photo", 404)
        except PixelsUnavailable as err:
            return _svg_message(str(err), 404)
        return Response(data, media_type="image/jpeg", headers=_NO_STORE)

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:  # a fixed list: nothing else in the package is reachable
            return Response("not found\n", status_code=404)
        data = resources.files("app.review").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC_FILES[name])

    @app.get("/api/faces")
    def api_faces(
        run: str = "",
        status: str = "",
        bucket: str = "",
        decision: str = "",
        offset: int = 0,
        limit: int = 100,
    ) -> JSONResponse:
        try:
            filters = _filters(run, status, bucket, decision)
            view = service.view(filters, offset=max(0, offset), limit=max(1, min(limit, 1000)))
        except UnknownRun as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(
            {
                "total": view.total,
                "counts": view.counts.as_dict(),
                "messages": view.messages,
                "faces": [_card(row) for row in view.faces.to_dict("records")],
            }
        )

    @app.get("/api/faces/{run_id}/{image_id}/{face_index}")
    def api_face(run_id: str, image_id: str, face_index: str) -> JSONResponse:
        key = _key(run_id, image_id, face_index)
        row = None if key is None else service.face_row(key)
        if key is None or row is None:
            return JSONResponse({"error": "no such face"}, status_code=404)
        card = _card(service.decided_row(key))
        card["history"] = [_history_row(r) for r in service.history(key).to_dict("records")]
        return JSONResponse(card)

    @app.post("/api/decisions")
    async def api_decide(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            key = _key(str(body["run_id"]), str(body["image_id"]), str(body["face_index"]))
            decision, note = body["decision"], body.get("note")
            if key is None:
                raise ValueError("not a face key")
            if decision not in REVIEW_DECISIONS or not (note is None or isinstance(note, str)):
                raise ValueError(f"decision must be one of {REVIEW_DECISIONS} and note a string")
        except (ValueError, KeyError, TypeError) as err:
            return JSONResponse({"error": f"bad decision request: {err}"}, status_code=400)
        try:
            row = service.decide(key, decision, note)
        except LookupError as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        counts = service.counts(run=body.get("counts_run") or None)
        return JSONResponse({"decision": _history_row(row), "counts": counts.as_dict()})

    return app


def serve(app: FastAPI, *, port: int) -> None:
    """Run the app on 127.0.0.1:`port` until interrupted."""
    import uvicorn

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


# -- helpers ---------------------------------------------------------------------------------------------
def _host_name(host: str) -> str:
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _filters(run: str, status: str, bucket: str, decision: str) -> ReviewFilters:
    try:
        bucket_value = int(bucket) if bucket else None
    except ValueError:
        raise ValueError(f"bucket must be a number, got {bucket!r}") from None
    return ReviewFilters(
        run=run or None, status=status or None, bucket=bucket_value, decision=decision or None
    )


def _key(run_id: str, image_id: str, face_index: str) -> FaceKey | None:
    """A face key from URL parts, or None (lookups are exact, so anything else simply matches nothing)."""
    if not face_index.isdigit() or len(face_index) > 6:
        return None
    return FaceKey(run_id, image_id, int(face_index))


def _card(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe view of one face the grid, the face page and the API share."""
    run_id, image_id, k = row["run_id"], row["image_id"], int(row["face_index"])
    address = f"{run_id}/{image_id}/{k}"
    return {
        "run_id": run_id,
        "image_id": image_id,
        "face_index": k,
        "rank": int(row["rank"]),
        "priority": _scalar(row["priority"]),
        **{column: _scalar(row[column]) for column in QA_COLUMNS},
        "t_start": _scalar(row["t_start"]),
        "bucket": _scalar(row["bucket"]),
        "status": row["status"],
        "error": _scalar(row.get("error")),
        "relative_path": _scalar(row["image_relative_path"]) or image_id[:12],
        "width": _scalar(row["image_width"]),
        "height": _scalar(row["image_height"]),
        "decision": _scalar(row.get("decision")),
        "note": _scalar(row.get("note")),
        "reviewer": _scalar(row.get("reviewer")),
        "decided_at": _time(row.get("decided_at")),
        "input_url": f"/img/input/{address}",
        "restored_url": f"/img/restored/{address}",
        "photo_url": f"/img/photo/{run_id}/{image_id}",
        "face_url": f"/face/{address}",
    }


def _box(row: dict[str, Any]) -> dict[str, Any]:
    """A face's bbox as percentages of its photo (for a box drawn over the scaled photo)."""
    x0, y0, x1, y1 = (float(v) for v in row["bbox"])
    w, h = float(row["image_width"]), float(row["image_height"])
    return {
        "face_index": int(row["face_index"]),
        "left": round(100 * x0 / w, 3),
        "top": round(100 * y0 / h, 3),
        "width": round(100 * (x1 - x0) / w, 3),
        "height": round(100 * (y1 - y0) / h, 3),
    }


def _history_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "decision": row["decision"],
        "note": _scalar(row.get("note")),
        "reviewer": row["reviewer"],
        "decided_at": _time(row["decided_at"]),
        "review_id": row["review_id"],
    }


def _scalar(value: Any) -> Any:
    """numpy/pandas scalars -> plain Python; NaN/NA -> None."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _time(value: Any) -> str | None:
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    stamp = pd.Timestamp(value)
    return stamp.tz_convert(dt.UTC).isoformat(timespec="seconds") if stamp.tzinfo else stamp.isoformat()


def _format_number(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _svg_message(text: str, status: int) -> Response:
    """An image that says what is wrong, so a broken face reads as a message inside the grid."""
    from html import escape

    lines = [text[i : i + 28] for i in range(0, min(len(text), 28 * 6), 28)]
    tspans = "".join(f'<tspan x="4" dy="13">{escape(line)}</tspan>' for line in lines)
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100" viewBox="0 0 200 100">'
        '<rect width="200" height="100" fill="#fde8e8"/>'
        f'<text font-family="sans-serif" font-size="11" fill="#8a1c1c" y="4">{tspans}</text></svg>'
    )
    return Response(svg, status_code=status, media_type="image/svg+xml", headers=_NO_STORE)
