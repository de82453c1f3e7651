"""What the serve tests share: ``mmcore serve`` in a subprocess on a free localhost port, and reading it."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``mmcore serve SOURCE FLAGS`` in a subprocess; ``url`` once /ready answers 200.

    Its stdout and stderr go to one file (``log``): a pipe nobody reads would block the server.
    """

    def __init__(self, source, *flags, log=None, port=None, ready_timeout=240):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w+") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mmcore", "serve", str(source), "--port", str(self.port), "--log-level", "warning",
             *map(str, flags)], env=env, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"mmcore serve exited {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"mmcore serve did not become ready in {ready_timeout} s:\n{self.output()}")

    def output(self):
        """What the server printed so far ("" without a log file)."""
        if not self.log_path:
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self):
        """SIGTERM, wait for the graceful exit; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path:
            self._log.close()
        return self.process.returncode


def metric_samples(url, name):
    """``[(labels, value)]`` of every sample called ``name`` in ``url``'s /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def metric(url, name, **labels):
    """One sample's value from /metrics (0 when absent)."""
    for found, value in metric_samples(url, name):
        if all(found.get(k) == v for k, v in labels.items()):
            return value
    return 0.0


def status_kib(pid, field):
    """A ``/proc/<pid>/status`` memory field in KiB (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise KeyError(field)


def demo_test_rows(demo_data):
    """The demo test split's rows, each with its image's bytes under ``bytes``."""
    import csv
    from pathlib import Path

    with open(Path(demo_data) / "test.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["bytes"] = (Path(demo_data) / row["local_image_path"]).read_bytes()
    return rows


def predicted_by_path(bundle, demo_data, out):
    """`mmcore predict BUNDLE test.csv`'s rows (scores as strings), by image path."""
    import csv
    from pathlib import Path

    from mmcore.commands.predict import predict_csv

    predict_csv(bundle, Path(demo_data) / "test.csv", out, progress=False, echo=lambda line: None)
    with open(out, newline="", encoding="utf-8") as handle:
        return {row["local_image_path"]: row for row in csv.DictReader(handle)}


def png(width, height, mode="RGB"):
    """A one-colour PNG: a few KB that decode to ``width x height`` pixels."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), (200, 30, 30, 255)[: len(mode)]).save(buffer, format="PNG")
    return buffer.getvalue()
