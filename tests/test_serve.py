"""`mmcore serve`: the real server in a subprocess on a free localhost port, called over HTTP."""

import asyncio
import base64
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

TEXT_LIMIT = 200
BODY_LIMIT_MB = 0.05  # 52 KB: the demo images are ~2 KB
PIXEL_LIMIT = 10_000  # the demo images are 48x48 = 2304 pixels


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``mmcore serve ...`` in a subprocess; ``url`` once /ready answers 200."""

    def __init__(self, source, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mmcore", "serve", str(source), "--port", str(self.port), "--log-level", "warning",
             *map(str, flags)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"mmcore serve exited {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError("mmcore serve did not become ready in 240 s")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(exported_bundle):
    """The exported bundle served with small limits (so each limit can be hit cheaply)."""
    running = Server(exported_bundle, "--max-batch", "16", "--max-wait-ms", "20", "--max-text-chars", TEXT_LIMIT,
                     "--max-body-mb", BODY_LIMIT_MB, "--max-image-pixels", PIXEL_LIMIT)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def test_rows(demo_data):
    with open(Path(demo_data) / "test.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["bytes"] = (Path(demo_data) / row["local_image_path"]).read_bytes()
    return rows


@pytest.fixture(scope="module")
def predicted(exported_bundle, demo_data, tmp_path_factory):
    """`mmcore predict BUNDLE test.csv`'s scores, by image path."""
    from mmcore.export.predict import predict_bundle

    out = tmp_path_factory.mktemp("predicted") / "scored.csv"
    predict_bundle(exported_bundle, Path(demo_data) / "test.csv", out, progress=False, echo=lambda line: None)
    with open(out, newline="", encoding="utf-8") as handle:
        return {row["local_image_path"]: row for row in csv.DictReader(handle)}


def _post_multipart(client, url, row):
    return client.post(f"{url}/predict", files={"image": ("ad.jpg", row["bytes"], "image/jpeg")},
                       data={"text": row["text_info"]})


def _assert_same(answer, want, threshold):
    assert answer["score"] == pytest.approx(float(want["score"]), abs=1e-6)
    assert answer["calibrated_score"] == pytest.approx(float(want["calibrated_score"]), abs=1e-6)
    assert str(answer["prediction"]) == want["prediction"]
    assert answer["threshold"] == threshold


def test_scores_equal_mmcore_predict(server, test_rows, predicted, exported_bundle):
    """Every demo test image, as multipart and as JSON base64, one by one and as a batch."""
    threshold = json.loads((exported_bundle / "decision.json").read_text())["threshold"]
    with httpx.Client(timeout=60) as client:
        for row in test_rows:
            response = _post_multipart(client, server.url, row)
            assert response.status_code == 200, response.text
            answer = response.json()
            _assert_same(answer, predicted[row["local_image_path"]], threshold)
            assert answer["text"] == row["text_info"]
            assert answer["text_source"] == ("request" if row["text_info"].strip() else "none")
        for row in test_rows[:4]:
            body = {"image": base64.b64encode(row["bytes"]).decode(), "text": row["text_info"]}
            response = client.post(f"{server.url}/predict", json=body)
            assert response.status_code == 200, response.text
            _assert_same(response.json(), predicted[row["local_image_path"]], threshold)
        items = [{"image": base64.b64encode(r["bytes"]).decode(), "text": r["text_info"]} for r in test_rows[:5]]
        response = client.post(f"{server.url}/predict/batch", json={"items": items})
        assert response.status_code == 200, response.text
        for answer, row in zip(response.json()["predictions"], test_rows[:5], strict=True):
            _assert_same(answer, predicted[row["local_image_path"]], threshold)
        files = [("image", (f"{i}.jpg", r["bytes"], "image/jpeg")) for i, r in enumerate(test_rows[5:8])]
        response = client.post(f"{server.url}/predict/batch", files=files,
                               data={"text": [r["text_info"] for r in test_rows[5:8]]})
        assert response.status_code == 200, response.text
        for answer, row in zip(response.json()["predictions"], test_rows[5:8], strict=True):
            _assert_same(answer, predicted[row["local_image_path"]], threshold)


def test_64_concurrent_requests_are_batched_and_all_correct(server, test_rows, predicted):
    rows = [test_rows[i % len(test_rows)] for i in range(64)]

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(
                client.post(f"{server.url}/predict", files={"image": ("ad.jpg", r["bytes"], "image/jpeg")},
                            data={"text": r["text_info"]}) for r in rows))

    before = _metric(server, "mmcore_batch_size_count")
    started = time.monotonic()
    responses = asyncio.run(run_all())
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"64 concurrent requests took {elapsed:.1f} s"
    assert [r.status_code for r in responses] == [200] * 64
    for response, row in zip(responses, rows):
        assert response.json()["score"] == pytest.approx(float(predicted[row["local_image_path"]]["score"]), abs=1e-6)
    batches = _metric(server, "mmcore_batch_size_count") - before
    assert 4 <= batches < 64  # scored together: at most 16 a batch, fewer passes than requests


def _metric(server, name, **labels):
    """One sample's value from /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def _png(width, height):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_bad_input_is_a_4xx_naming_the_field(server, test_rows, predicted):
    good = test_rows[0]
    jpeg = good["bytes"]
    bad = [
        ("a non-image upload", dict(files={"image": ("a.txt", b"just some text, not pixels", "text/plain")}),
         422, "image", "not an image Pillow can read"),
        ("a truncated image", dict(files={"image": ("t.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")}),
         422, "image", "corrupt or truncated image"),
        ("an image over the pixel limit", dict(files={"image": ("big.png", _png(200, 100), "image/png")}),
         413, "image", f"image too large (200x100 = 20000 pixels > data.max_image_pixels = {PIXEL_LIMIT})"),
        ("a body over the size limit", dict(files={"image": ("huge.jpg", jpeg + b"\0" * 100_000, "image/jpeg")}),
         413, "body", "over the limit of 52428 bytes"),
        ("a missing image field", dict(data={"text": "SALE"}), 422, "image", "missing"),
        ("a wrong content type", dict(content=b"hello", headers={"content-type": "text/plain"}),
         415, "content-type", "expected multipart/form-data or application/json (got 'text/plain')"),
        ("text over the length limit", dict(files={"image": ("a.jpg", jpeg, "image/jpeg")}, data={"text": "x" * 500}),
         422, "text", f"500 characters is over the limit of {TEXT_LIMIT}"),
        ("invalid JSON", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "body", "not valid JSON"),
        ("bad base64", dict(json={"image": "%%%", "text": "x"}), 422, "image", "not valid base64"),
        ("a text that is not a string", dict(json={"image": base64.b64encode(jpeg).decode(), "text": 5}),
         422, "text", "must be a string"),
    ]
    with httpx.Client(timeout=60) as client:
        for what, request, status, field, reason in bad:
            response = client.post(f"{server.url}/predict", **request)
            assert response.status_code == status, (what, response.text)
            error = response.json()["error"]
            assert error["field"] == field, what
            assert reason in error["reason"], (what, error)
            # the server keeps serving
            after = _post_multipart(client, server.url, good)
            assert after.status_code == 200, what
            assert after.json()["score"] == pytest.approx(float(predicted[good["local_image_path"]]["score"]), abs=1e-6)
        response = client.post(f"{server.url}/predict/batch", json={"items": [{"image": "!!"}]})
        assert response.status_code == 422 and response.json()["error"]["field"] == "items[0].image"
    assert _metric(server, "mmcore_request_errors_total", endpoint="/predict", field="content-type") == 1
    assert _metric(server, "mmcore_requests_total", endpoint="/predict", status="500") == 0


def test_health_ready_metadata_docs(server, exported_bundle):
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{server.url}/health").json() == {"status": "ok"}
        assert client.get(f"{server.url}/ready").json() == {"ready": True}
        metadata = client.get(f"{server.url}/metadata").json()
        decision = json.loads((exported_bundle / "decision.json").read_text())
        assert metadata["threshold"] == decision["threshold"]
        assert metadata["kind"] == "bundle" and metadata["modality"] == "multimodal"
        assert (metadata["vision"], metadata["text"]) == ("fake_cnn", "minilm")
        assert "onnxruntime" in metadata["versions"]
        assert metadata["serving"]["max_batch"] == 16
        assert "swagger" in client.get(f"{server.url}/docs").text.lower()
        paths = client.get(f"{server.url}/openapi.json").json()["paths"]
        assert {"/predict", "/predict/batch", "/health", "/ready", "/metadata", "/metrics"} <= set(paths)
        metrics = client.get(f"{server.url}/metrics").text
    for name in ("mmcore_requests_total", "mmcore_request_errors_total", "mmcore_request_latency_seconds_bucket",
                 "mmcore_batch_size_bucket"):
        assert name in metrics


def test_a_run_dir_served_with_ocr_and_sigterm_during_a_request(exportable_run, test_rows):
    """RUN_DIR (PyTorch) gives the run's own test scores; no text + --ocr reads it; SIGTERM lets a request finish."""
    expected = {p["path"]: p for p in json.loads((exportable_run / "test_predictions.json").read_text())}
    running = Server(exportable_run, "--max-wait-ms", "1500", "--max-batch", "64", "--ocr", "fake_ocr")
    try:
        with httpx.Client(timeout=60) as client:
            row = test_rows[0]
            answer = _post_multipart(client, running.url, row).json()
            assert answer["score"] == pytest.approx(expected[row["local_image_path"]]["score"], abs=1e-6)
            answer = client.post(f"{running.url}/predict",
                                 files={"image": ("a.jpg", row["bytes"], "image/jpeg")}).json()
            assert answer["text_source"] == "ocr" and answer["text"].startswith("tone ")

        # the batcher holds this request ~1.5 s; SIGTERM arrives meanwhile
        result = {}

        def call():
            result["response"] = httpx.post(f"{running.url}/predict", files={"image": ("a.jpg", row["bytes"], "image/jpeg")},
                                            data={"text": row["text_info"]}, timeout=60)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.7)
        running.process.send_signal(signal.SIGTERM)
        thread.join(60)
        response = result["response"]
        assert response.status_code == 200
        assert response.json()["score"] == pytest.approx(expected[row["local_image_path"]]["score"], abs=1e-6)
        assert running.process.wait(timeout=60) == 0
    finally:
        running.stop()


def test_two_workers_share_the_port_and_answer_alike(exported_bundle, test_rows, predicted):
    """--workers 2: two processes behind one socket (stateless: either answers any request the
    same), and SIGTERM stops both with exit 0."""
    threshold = json.loads((exported_bundle / "decision.json").read_text())["threshold"]
    running = Server(exported_bundle, "--workers", "2")
    try:
        answers = {}  # pid -> (row, answer)
        deadline = time.monotonic() + 120
        for attempt in range(200):  # new connections until both processes have answered (bounded)
            if len(answers) == 2 or time.monotonic() > deadline:
                break
            row = test_rows[attempt % len(test_rows)]
            with httpx.Client(timeout=60) as client:  # a fresh connection each time
                pid = client.get(f"{running.url}/metadata").json()["serving"]["pid"]
                if pid not in answers:
                    answers[pid] = (row, _post_multipart(client, running.url, row).json())
        assert len(answers) == 2, "only one worker process answered"
        assert running.process.pid not in answers  # the supervisor serves nothing itself
        for row, answer in answers.values():
            _assert_same(answer, predicted[row["local_image_path"]], threshold)
    finally:
        assert running.stop() == 0
