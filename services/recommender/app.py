"""The recommender replica as a faust-streaming app.

An agent applies the embedding-updates topic (partition 0 only: the topic must have one partition)
to the replica's own store (not a faust Table: state lives in gnaq_stream.serve.replica); a record
the replica cannot apply is counted and logged, never stops the agent. faust's web server answers
only these (faust's own pages, /router, /table, /, ..., are not served):

    GET /recommend/{user}?k=20   {"user", "k", "model_version", "user_version", "items": [{"item", "score"}]}
    GET /healthz                 200 {"status": "ok", ...} once the replica holds a complete model (a meta
                                 record of version >= 0 and a row for every user and item below its
                                 n_users and n_items), else 503 {"status": "waiting", ...}; both with
                                 "model_version", "users", "items", "model_bytes", "meta"
    GET /metrics                 Prometheus text format

Every error is JSON {"error": ...} with a 4xx (or 503 before a model has arrived). Agent and views
share one event loop, so a request never sees a record half applied.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from pathlib import Path

import faust
from aiohttp import web as aiohttp_web
from faust.web.base import BlueprintManager
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gnaq_stream.config import ServeConfig
from gnaq_stream.metrics import ServeMetrics
from gnaq_stream.serve.replica import REJECTION_REASONS, NotReady, RejectedUpdate, Replica, UnknownUser

log = logging.getLogger("gnaq_stream.serve")
MAX_USER_ID_CHARS = 256  # as events allow
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
    app.web.blueprints = BlueprintManager()  # none of faust's own pages: they expose internals
    updates = app.topic(cfg.updates_topic, key_serializer="raw", value_serializer="raw")
    rejected: Counter[str] = Counter()
    for reason in REJECTION_REASONS:
        metrics.updates_rejected.labels(reason)

    def refresh_gauges() -> None:
        metrics.model_version.set(replica.model_version)
        metrics.model_bytes.set(replica.model_bytes)
        metrics.memory_bytes.set(replica.memory_bytes)
        info = replica.info()
        for kind in ("user", "item"):
            metrics.nodes.labels(kind).set(info[f"{kind}s"])

    refresh_gauges()

    @app.agent(updates)
    async def follow(stream):
        # records in batches: faust's per-event path and a store write per record held a replica to
        # ~3k records/s; a batch is applied between requests like one record (one event loop)
        async for events in stream.take_events(4096, within=0.05):
            records, sources = [], []
            for event in events:
                message = event.message
                if message.partition != 0:  # "complete up to this meta record" holds within one partition only
                    reject(message, RejectedUpdate("partition", "the updates topic has more than one partition; "
                                                   "only partition 0 is read (the learner publishes to a "
                                                   "one-partition topic)"))
                    continue
                records.append((event.key or b"", event.value))
                sources.append(message)
            for message, outcome in zip(sources, replica.apply_many(records)):
                if isinstance(outcome, RejectedUpdate):
                    reject(message, outcome)
                else:
                    (metrics.updates_applied if outcome else metrics.updates_stale).inc()
            last = events[-1].message
            high = app.consumer.highwater(last.tp)
            if high is not None:
                metrics.updates_lag.labels(str(last.partition)).set(max(high - last.offset - 1, 0))
            refresh_gauges()

    def reject(message, exc: RejectedUpdate) -> None:
        metrics.updates_rejected.labels(exc.reason).inc()
        rejected[exc.reason] += 1
        count = rejected[exc.reason]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, ...: a bad publication cannot flood the log
            log.warning("update %s:%d:%d not applied (%s, %d so far): %s", message.topic, message.partition,
                        message.offset, exc.reason, count, exc)

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
        if len(user) > MAX_USER_ID_CHARS:
            return answer(web, "recommend", started,
                          {"error": f"user id longer than {MAX_USER_ID_CHARS} characters"}, 400)
        try:
            return answer(web, "recommend", started, replica.recommend(user, k))
        except UnknownUser as exc:
            return answer(web, "recommend", started, {"error": str(exc)}, 404)
        except NotReady as exc:
            return answer(web, "recommend", started, {"error": str(exc)}, 503)

    @app.page("/healthz")
    async def healthz(web, request):
        started = time.perf_counter()
        # a readiness probe: no traffic until a complete model is held (e.g. while replaying the topic)
        ready = replica.ready
        return answer(web, "healthz", started, {"status": "ok" if ready else "waiting", **replica.info()},
                      200 if ready else 503)

    @app.page("/metrics")
    async def prometheus(web, request):
        return web.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app


def run(cfg: ServeConfig, log_level: str = "WARNING") -> None:
    """Run one replica until SIGTERM/SIGINT."""
    replica = Replica(cfg.store, cfg.max_nodes)
    app = create_app(cfg, replica, ServeMetrics())
    worker = faust.Worker(app, loglevel=log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        replica.close()
