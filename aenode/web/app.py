"""The routes of the operations web server (Starlette).

===============================  ================================================================
route                            what
===============================  ================================================================
``GET /``                        the dashboard (:mod:`aenode.web.pages`)
``GET /healthz``                 JSON; 200 when healthy, 503 naming the failing part
``GET /metrics``                 Prometheus text format (:mod:`aenode.web.prom`)
``GET /studies/{uid}``           the study's audit trail; ``/studies/{uid}.json`` as JSON
``GET /jobs/{id}/report.png``    the job's SC report page, its pixels rendered to PNG
``POST /jobs/{id}/retry``        only with ``http.allow_actions`` and the bearer token
===============================  ================================================================

Endpoints are plain functions (Starlette runs them in its thread pool) reading the store
through the owners' query functions.
"""

from __future__ import annotations

import hmac
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pydicom
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from aenode.config import Settings
from aenode.errors import InputError
from aenode.export.outbox import Outbox
from aenode.infer.cards import ModelCard
from aenode.jobs import get_job, retry_job
from aenode.receive.refusals import recent_refusals
from aenode.status import status_report, study_trail
from aenode.store import Store
from aenode.web.checks import check_health
from aenode.web.pages import DashboardData, audit_page, dashboard_page
from aenode.web.prom import make_registry

__all__ = ["build_app", "report_png"]

log = logging.getLogger(__name__)


def report_png(report_dcm: Path) -> bytes:
    """The pixels of an SC report page (RGB or grey) as PNG bytes.

    Raises
    ------
    aenode.errors.InputError
        If the file cannot be read or holds no pixel data; the message names the file.
    """
    try:
        ds = pydicom.dcmread(report_dcm)
        pixels = ds.pixel_array
    except (OSError, AttributeError, ValueError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{report_dcm}: cannot read the report's pixels: {exc}") from exc
    if pixels.ndim == 4:  # multi-frame: the first page
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def build_app(
    settings: Settings,
    store: Store,
    cards: Sequence[ModelCard],
    receivers: int,
) -> Starlette:
    """The Starlette app of one node.

    Parameters
    ----------
    settings : Settings
        The node's settings (``http``, ``node``, ``storage``, ``export``).
    store : Store
        A store connection of the web server's own (thread-safe).
    cards : sequence of ModelCard
        The models start-up loaded and warmed.
    receivers : int
        How many receiving processes listen on ``node.port``.

    Returns
    -------
    starlette.applications.Starlette
    """
    registry = make_registry(settings, lambda: store)
    models = [c.name for c in cards]
    node_name = f"{settings.node.ae_title} on port {settings.node.port}"

    def health_body() -> dict[str, object]:
        return check_health(settings, store, models, receivers).to_json()

    def healthz(request: Request) -> Response:
        body = health_body()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def dashboard(request: Request) -> Response:
        report = status_report(store, limit=50)
        data = DashboardData(
            node=node_name,
            health=health_body(),
            series=report.series,
            jobs=report.jobs,
            cards=list(cards),
            refusals=recent_refusals(store),
            allow_actions=settings.http.allow_actions,
        )
        return HTMLResponse(dashboard_page(data))

    def study(request: Request) -> Response:
        uid = request.path_params["uid"]
        return HTMLResponse(audit_page(node_name, uid, study_trail(store, uid)))

    def study_json(request: Request) -> Response:
        uid = request.path_params["uid"]
        return JSONResponse([e.to_json() for e in study_trail(store, uid)])

    def report(request: Request) -> Response:
        job = get_job(store, int(request.path_params["job"]))
        if job is None or not job.result_dir:
            return JSONResponse({"error": "no such job or no result yet"}, status_code=404)
        path = Path(job.result_dir) / "report.dcm"
        if not path.is_file():
            return JSONResponse({"error": f"job {job.id} wrote no report"}, status_code=404)
        try:
            return Response(report_png(path), media_type="image/png")
        except InputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)

    async def retry(request: Request) -> Response:
        if not settings.http.allow_actions:
            return JSONResponse(
                {"error": "actions are turned off (http.allow_actions)"}, status_code=403
            )
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given and request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            form = parse_qs((await request.body()).decode("utf-8", "replace"))
            given = (form.get("token") or [""])[0]
        expected = settings.http.token or ""
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            return JSONResponse({"error": "bad or missing token"}, status_code=401)
        job_id = int(request.path_params["job"])
        outbox = Outbox(store, settings.export, settings.calling_ae)
        try:
            what = retry_job(store, job_id, outbox)
        except InputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        log.info("job %s queued again from the dashboard (%s)", job_id, what)
        return JSONResponse({"job": job_id, "queued_again": what})

    routes = [
        Route("/", dashboard),
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/studies/{uid}.json", study_json),
        Route("/studies/{uid}", study),
        Route("/jobs/{job:int}/report.png", report),
        Route("/jobs/{job:int}/retry", retry, methods=["POST"]),
    ]
    return Starlette(routes=routes)
