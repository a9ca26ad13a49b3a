"""The recommender replica as a faust-streaming app.

An agent applies the embedding-updates topic to the replica's own store (not a faust Table: state
lives in gnaq_stream.serve.replica), and faust's web server answers:

    GET /recommend/{user}?k=20   {"user", "k", "model_version", "user_version", "items": [{"item", "score"}]}
    GET /healthz                 {"status": "ok" | "waiting", "model_version", "users", "items", "model_bytes"}
    GET /metrics                 Prometheus text format

Every error is JSON {"error": ...} with a 4xx (or 503 before a model has arrived). Agent and views
share one event loop, so a request never sees a record half applied.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import faust
from aiohttp import web as aiohttp_web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gnaq_stream.config import ServeConfig
from gnaq_stream.metrics import ServeMetrics
from gnaq_stream.serve.replica import NotReady, Replica, UnknownUser
from gnaq_stream.updates_format import UpdateFormatError

log = logging.getLogger("gnaq_stream.serve")
MAX_USER_ID_BYTES = 256
MAX_REQUEST_LINE = 64 * 1024  # longer request lines are refused by the HTTP parser itself


@aiohttp_web.middleware
async def json_errors(request: aiohttp_web.Request, handler):
    """aiohttp's own errors (no such route, wrong method) as JSON like ours."""
    try:
        return await handler(request)
    except aiohttp_web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return aiohttp_web.json_response({"error": exc.reason}, status=exc.status)


def group_id(cfg: ServeConfig) -> str:
    return cfg.group or f"gnaq-serve-{socket.gethostname()}-{cfg.port}"


def create_app(cfg: ServeConfig, replica: Replica, metrics: ServeMetrics) -> faust.App:
    app = faust.App(
        group_id(cfg),
        broker=[f"kafka://{server}" for server in cfg.bootstrap_servers.split(",")],
        web_host=cfg.host, web_port=cfg.port, web_bind=cfg.host,
        web_application_options={"middlewares": [json_errors], "handler_args": {"max_line_size": MAX_REQUEST_LINE}},
        datadir=str(Path(cfg.store).parent / f"{Path(cfg.store).name}.faust"),
        store="memory://", topic_disable_leader=True, autodiscover=False,
        broker_session_timeout=cfg.session_timeout_seconds, consumer_auto_offset_reset="earliest",
    )
    updates = app.topic(cfg.updates_topic, key_serializer="raw", value_serializer="raw")

    def refresh_gauges() -> None:
        metrics.model_version.set(replica.model_version)
        metrics.model_bytes.set(replica.model_bytes)
        for kind, table in (("user", replica.users), ("item", replica.items)):
            metrics.nodes.labels(kind).set(0 if table is None else table.n)

    refresh_gauges()

    @app.agent(updates)
    async def follow(stream):
        async for event in stream.events():
            message = event.message
            try:
                fresh = replica.apply(event.key or b"", event.value or b"")
            except (UpdateFormatError, KeyError, ValueError) as exc:
                metrics.updates_rejected.inc()
                log.warning("update %s:%d:%d not applied: %s", message.topic, message.partition, message.offset, exc)
            else:
                (metrics.updates_applied if fresh else metrics.updates_stale).inc()
            high = app.consumer.highwater(message.tp)
            if high is not None:
                metrics.updates_lag.labels(str(message.partition)).set(max(high - message.offset - 1, 0))
            refresh_gauges()

    def answer(web, endpoint: str, started: float, body: dict, status: int = 200):
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return web.json(body, status=status)

    @app.page("/recommend/{user}")
    async def recommend(web, request, user: str):
        started = time.perf_counter()
        raw_k = request.query.get("k", "20")
        try:
            k = int(raw_k)
        except ValueError:
            return answer(web, "recommend", started, {"error": f"k must be an integer, got {raw_k[:32]!r}"}, 400)
        if not 1 <= k <= cfg.max_k:
            return answer(web, "recommend", started, {"error": f"k must be in 1..{cfg.max_k}, got {k}"}, 400)
        if len(user.encode()) > MAX_USER_ID_BYTES:
            return answer(web, "recommend", started,
                          {"error": f"user id longer than {MAX_USER_ID_BYTES} bytes"}, 400)
        try:
            return answer(web, "recommend", started, replica.recommend(user, k))
        except UnknownUser as exc:
            return answer(web, "recommend", started, {"error": str(exc)}, 404)
        except NotReady as exc:
            return answer(web, "recommend", started, {"error": str(exc)}, 503)

    @app.page("/healthz")
    async def healthz(web, request):
        started = time.perf_counter()
        info = replica.info()
        return answer(web, "healthz", started, {"status": "ok" if info["model_version"] >= 0 else "waiting", **info})

    @app.page("/metrics")
    async def prometheus(web, request):
        return web.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app


def run(cfg: ServeConfig, log_level: str = "WARNING") -> None:
    """Run one replica until SIGTERM/SIGINT."""
    replica = Replica(cfg.store)
    app = create_app(cfg, replica, ServeMetrics())
    worker = faust.Worker(app, loglevel=log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        replica.close()
