"""The recommender replica: a Kafka consumer of the embedding-updates topic and an HTTP server, sharing
one asyncio event loop.

The consumer (aiokafka, no stream framework: faust's per-message path held a replica to ~4-6k
records/s) reads the updates topic in large fetches and applies each fetch with one
`Replica.apply_many` (partition 0 only: the topic must have one partition); a record the replica
cannot apply is counted and logged, never stops it. Offsets are committed to the replica's own
consumer group, but the replica's store is what it serves from; replaying records is harmless.

    GET /recommend/{user}?k=20   {"user", "k", "model_version", "user_version", "items": [{"item", "score"}]}
    GET /healthz                 200 {"status": "ok", ...} once the replica holds a complete model (a meta
                                 record of version >= 0 and a row for every user and item below its
                                 n_users and n_items), else 503 {"status": "waiting", ...}; both with
                                 "model_version", "users", "items", "model_bytes", "meta"
    GET /metrics                 Prometheus text format

Every error is JSON {"error": ...} with a 4xx (or 503 before a model has arrived). A fetch is
applied between requests (the loop runs one at a time), so a request never sees a record half applied.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections import Counter

from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gnaq_stream.config import ServeConfig
from gnaq_stream.errors import GnaqError
from gnaq_stream.metrics import ServeMetrics
from gnaq_stream.serve.replica import REJECTION_REASONS, NotReady, RejectedUpdate, Replica, UnknownUser

log = logging.getLogger("gnaq_stream.serve")
MAX_USER_ID_CHARS = 256  # as events allow
MAX_REQUEST_LINE = 64 * 1024  # longer request lines are refused by the HTTP parser itself
# a fetch is applied as one apply_many: large enough to amortise a batch's fixed costs, small enough
# that a request waits at most ~0.2 s behind one while a replica catches up. Bounded in records and
# in bytes per partition (1 MiB: ~15k row records, or ~130 block records of ~256 rows each)
MAX_BATCH_RECORDS = 20_000
FETCH_BYTES = 1 << 20
RETRY_SECONDS = 2.0


@web.middleware
async def json_errors(request: web.Request, handler):
    """aiohttp's own errors (no such route, wrong method) as JSON like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


def group_id(cfg: ServeConfig) -> str:
    return cfg.group or f"gnaq-serve-{socket.gethostname()}-{cfg.port}"


class Follower:
    """Applies the updates topic to the replica, fetch by fetch, and keeps the replica's metrics."""

    def __init__(self, cfg: ServeConfig, replica: Replica, metrics: ServeMetrics):
        self.cfg, self.replica, self.metrics = cfg, replica, metrics
        self.rejected: Counter[str] = Counter()
        for reason in REJECTION_REASONS:
            metrics.updates_rejected.labels(reason)
        self.refresh_gauges()

    def refresh_gauges(self) -> None:
        m, replica = self.metrics, self.replica
        m.model_version.set(replica.model_version)
        m.model_bytes.set(replica.model_bytes)
        m.memory_bytes.set(replica.memory_bytes)
        info = replica.info()
        for kind in ("user", "item"):
            m.nodes.labels(kind).set(info[f"{kind}s"])

    async def run(self) -> None:
        """Follow the topic until cancelled; Kafka errors are retried (the replica serves meanwhile)."""
        timeout_ms = int(self.cfg.session_timeout_seconds * 1000)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.cfg.bootstrap_servers.split(","), group_id=group_id(self.cfg),
            auto_offset_reset="earliest",
            # safe: a fetch is applied and stored before the loop yields, so no commit runs in between
            enable_auto_commit=True, session_timeout_ms=timeout_ms, heartbeat_interval_ms=max(timeout_ms // 3, 100),
            max_partition_fetch_bytes=FETCH_BYTES, fetch_max_bytes=4 * FETCH_BYTES)
        try:
            await self.subscribe(consumer)
            while True:
                try:
                    fetched = await consumer.getmany(timeout_ms=1000, max_records=MAX_BATCH_RECORDS)
                except KafkaError as exc:
                    log.warning("reading %s failed (%s); retrying", self.cfg.updates_topic, exc)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                for tp, messages in fetched.items():
                    self.apply(messages)
                    high = consumer.highwater(tp)
                    if high is not None:
                        self.metrics.updates_lag.labels(str(tp.partition)).set(max(high - messages[-1].offset - 1, 0))
                if fetched:
                    self.refresh_gauges()
        finally:
            await consumer.stop()

    async def subscribe(self, consumer: AIOKafkaConsumer) -> None:
        """Connect, wait for the topic to exist, subscribe. Subscribing to a missing topic would make the
        broker create it with its default partitions, and the learner refuses more than one."""
        topic, started, logged = self.cfg.updates_topic, False, False
        while True:
            try:
                if not started:
                    await consumer.start()
                    started = True
                if topic in await consumer.topics():
                    break
                if not logged:
                    log.info("waiting for topic %s to be created (by the learner)", topic)
                    logged = True
            except KafkaError as exc:
                log.warning("cannot reach Kafka at %s (%s); retrying in %.0f s", self.cfg.bootstrap_servers, exc,
                            RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
        consumer.subscribe([topic])

    def apply(self, messages: list[ConsumerRecord]) -> None:
        """One partition's fetched records, applied as one batch."""
        if messages[0].partition != 0:  # "complete up to this meta record" holds within one partition only
            error = RejectedUpdate("partition", "the updates topic has more than one partition; only partition 0 "
                                   "is read (the learner publishes to a one-partition topic)")
            outcomes: list[bool | RejectedUpdate] = [error] * len(messages)
        else:
            outcomes = self.replica.apply_many([(m.key or b"", m.value) for m in messages])
        applied = sum(outcome is True for outcome in outcomes)
        stale = sum(outcome is False for outcome in outcomes)
        self.metrics.updates_applied.inc(applied)
        self.metrics.updates_stale.inc(stale)
        if applied + stale < len(outcomes):
            for message, outcome in zip(messages, outcomes):
                if isinstance(outcome, RejectedUpdate):
                    self.reject(message, outcome)

    def reject(self, message: ConsumerRecord, exc: RejectedUpdate) -> None:
        self.metrics.updates_rejected.labels(exc.reason).inc()
        self.rejected[exc.reason] += 1
        count = self.rejected[exc.reason]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, ...: a bad publication cannot flood the log
            log.warning("update %s:%d:%d not applied (%s, %d so far): %s", message.topic, message.partition,
                        message.offset, exc.reason, count, exc)


def create_app(cfg: ServeConfig, replica: Replica, metrics: ServeMetrics) -> web.Application:
    """The HTTP side: /recommend, /healthz and /metrics, every error as JSON."""

    def answer(endpoint: str, started: float, body: dict, status: int = 200) -> web.Response:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return web.json_response(body, status=status)

    async def recommend(request: web.Request) -> web.Response:
        started = time.perf_counter()
        user = request.match_info["user"]
        raw_k = request.query.get("k", "20")
        try:
            k = int(raw_k)
        except ValueError:
            return answer("recommend", started, {"error": f"k must be an integer, got {raw_k[:32]!r}"}, 400)
        if not 1 <= k <= cfg.max_k:
            return answer("recommend", started, {"error": f"k must be in 1..{cfg.max_k}, got {k}"}, 400)
        if len(user) > MAX_USER_ID_CHARS:
            return answer("recommend", started, {"error": f"user id longer than {MAX_USER_ID_CHARS} characters"}, 400)
        try:
            return answer("recommend", started, replica.recommend(user, k))
        except UnknownUser as exc:
            return answer("recommend", started, {"error": str(exc)}, 404)
        except NotReady as exc:
            return answer("recommend", started, {"error": str(exc)}, 503)

    async def healthz(request: web.Request) -> web.Response:
        started = time.perf_counter()
        # a readiness probe: no traffic until a complete model is held (e.g. while replaying the topic)
        ready = replica.ready
        return answer("healthz", started, {"status": "ok" if ready else "waiting", **replica.info()},
                      200 if ready else 503)

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    app = web.Application(middlewares=[json_errors], handler_args={"max_line_size": MAX_REQUEST_LINE})
    app.router.add_get("/recommend/{user}", recommend)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", prometheus)
    return app


async def serve(cfg: ServeConfig, replica: Replica, metrics: ServeMetrics) -> None:
    """Serve HTTP and follow the updates topic until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(cfg, replica, metrics), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, cfg.host, cfg.port).start()
        except OSError as exc:
            raise GnaqError(f"cannot listen on {cfg.host}:{cfg.port} ({exc})") from None
        follower = asyncio.create_task(Follower(cfg, replica, metrics).run())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([follower, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        follower.cancel()
        try:
            await follower
        except asyncio.CancelledError:
            pass
    finally:
        await runner.cleanup()


def run(cfg: ServeConfig, log_level: str = "WARNING") -> None:
    """Run one replica until SIGTERM/SIGINT."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    replica = Replica(cfg.store, cfg.max_nodes)
    try:
        asyncio.run(serve(cfg, replica, ServeMetrics()))
    finally:
        replica.close()
