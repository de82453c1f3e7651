"""`mmcore serve`: the real server in a subprocess on a free localhost port, called over HTTP."""

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import threading
import time

import httpx
import pytest
from serving import Server, demo_test_rows, metric, metric_samples, png, predicted_by_path

from mmcore.evaluation.metrics import SCORE_BUCKETS

TEXT_LIMIT = 200
BODY_LIMIT_MB = 0.05  # 52 KB: the demo images are ~2 KB
PIXEL_LIMIT = 10_000  # the demo images are 48x48 = 2304 pixels
VERSION_RE = re.compile(r"sha256:[0-9a-f]{16}")


@pytest.fixture(scope="module")
def server(exported_bundle, tmp_path_factory):
    """The exported bundle served with small limits (so each limit can be hit cheaply); rows
    without text are scored with empty text and marked (--text optional)."""
    running = Server(exported_bundle, "--text", "optional", "--max-batch", "16", "--max-wait-ms", "20",
                     "--max-text-chars", TEXT_LIMIT, "--max-body-mb", BODY_LIMIT_MB, "--max-image-pixels", PIXEL_LIMIT,
                     log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield running
    assert running.stop() == 0, running.output()


@pytest.fixture(scope="module")
def test_rows(demo_data):
    return demo_test_rows(demo_data)


@pytest.fixture(scope="module")
def predicted(exported_bundle, demo_data, tmp_path_factory):
    """`mmcore predict BUNDLE test.csv`'s scores, by image path."""
    return predicted_by_path(exported_bundle, demo_data, tmp_path_factory.mktemp("predicted") / "scored.csv")


def _post_multipart(client, url, row, **kwargs):
    return client.post(f"{url}/predict", files={"image": ("ad.jpg", row["bytes"], "image/jpeg")},
                       data={"text": row["text_info"]}, **kwargs)


def _assert_same(answer, want, threshold):
    assert answer["score"] == pytest.approx(float(want["score"]), abs=1e-6)
    assert answer["calibrated_score"] == pytest.approx(float(want["calibrated_score"]), abs=1e-6)
    assert str(answer["prediction"]) == want["prediction"]
    assert answer["threshold"] == threshold


def test_scores_equal_mmcore_predict(server, test_rows, predicted, exported_bundle):
    """Every demo test image, as multipart and as JSON base64, one by one and as a batch; rows
    without text are scored with empty text, as predict scores them, and say so."""
    threshold = json.loads((exported_bundle / "decision.json").read_text())["threshold"]
    with httpx.Client(timeout=60) as client:
        for row in test_rows:
            response = _post_multipart(client, server.url, row)
            assert response.status_code == 200, response.text
            answer = response.json()
            _assert_same(answer, predicted[row["local_image_path"]], threshold)
            assert answer["text"] == (row["text_info"] if row["text_info"].strip() else "")
            assert answer["text_source"] == ("client" if row["text_info"].strip() else "none-optional")
        assert {r["text_info"].strip() == "" for r in test_rows} == {True, False}  # both kinds were sent
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


def test_model_version_and_request_id_in_every_answer(server, test_rows, exported_bundle):
    """The bundle's manifest digest and the request's id, in the body and the headers; a
    malformed X-Request-ID is replaced, an error answer carries them too."""
    import hashlib

    version = "sha256:" + hashlib.sha256((exported_bundle / "manifest.json").read_bytes()).hexdigest()[:16]
    with httpx.Client(timeout=60) as client:
        response = _post_multipart(client, server.url, test_rows[0], headers={"X-Request-ID": "order-42.a:b"})
        assert response.status_code == 200
        assert response.json()["model_version"] == response.headers["X-Model-Version"] == version
        assert response.json()["request_id"] == response.headers["X-Request-ID"] == "order-42.a:b"

        response = _post_multipart(client, server.url, test_rows[0], headers={"X-Request-ID": "bad id\t" + "x" * 300})
        made = response.headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", made) and response.json()["request_id"] == made

        items = [{"image": base64.b64encode(test_rows[0]["bytes"]).decode(), "text": "SALE"}]
        response = client.post(f"{server.url}/predict/batch", json={"items": items}, headers={"X-Request-ID": "b-1"})
        assert (response.json()["model_version"], response.json()["request_id"]) == (version, "b-1")

        response = client.post(f"{server.url}/predict", json={"image": "%%%"}, headers={"X-Request-ID": "e-1"})
        assert response.status_code == 422
        assert response.json()["request_id"] == response.headers["X-Request-ID"] == "e-1"
        assert response.headers["X-Model-Version"] == version
        assert client.get(f"{server.url}/metadata").json()["model_version"] == version


def test_64_concurrent_requests_are_batched_and_all_correct(server, test_rows, predicted):
    rows = [test_rows[i % len(test_rows)] for i in range(64)]

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(
                client.post(f"{server.url}/predict", files={"image": ("ad.jpg", r["bytes"], "image/jpeg")},
                            data={"text": r["text_info"]}) for r in rows))

    before = metric(server.url, "mmcore_batch_size_count")
    started = time.monotonic()
    responses = asyncio.run(run_all())
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"64 concurrent requests took {elapsed:.1f} s"
    assert [r.status_code for r in responses] == [200] * 64
    for response, row in zip(responses, rows):
        assert response.json()["score"] == pytest.approx(float(predicted[row["local_image_path"]]["score"]), abs=1e-6)
    batches = metric(server.url, "mmcore_batch_size_count") - before
    assert 4 <= batches < 64  # scored together: at most 16 a batch, fewer passes than requests


def test_one_bad_text_among_concurrent_good_requests_fails_only_itself(server, test_rows, predicted):
    """An unpaired surrogate (valid JSON "\\ud800", not UTF-8) sent among good requests: refused
    before it joins a batch (422 naming text); every good request in the same moment: 200, right score."""
    good = [r for r in test_rows if r["text_info"].strip()][:12]
    image = base64.b64encode(good[0]["bytes"]).decode()
    bad = b'{"image": "' + image.encode() + b'", "text": "50% OFF \\ud800"}'

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=48)) as client:
            calls = []
            for row in good * 3:
                calls.append(client.post(f"{server.url}/predict", files={"image": ("a.jpg", row["bytes"], "image/jpeg")},
                                         data={"text": row["text_info"]}))
                calls.append(client.post(f"{server.url}/predict", content=bad,
                                         headers={"content-type": "application/json"}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(run_all())
    for k, response in enumerate(responses):
        if k % 2:
            assert response.status_code == 422, response.text
            assert response.json()["error"] == {
                "field": "text", "reason": "not valid Unicode (an unpaired surrogate at character 8); send UTF-8 text"}
        else:
            row = good[(k // 2) % len(good)]
            assert response.status_code == 200, response.text
            assert response.json()["score"] == pytest.approx(float(predicted[row["local_image_path"]]["score"]), abs=1e-6)


def test_each_bad_input_is_a_4xx_naming_the_field(server, test_rows, predicted):
    good = test_rows[0]
    jpeg = good["bytes"]
    bad = [
        ("a non-image upload", dict(files={"image": ("a.txt", b"just some text, not pixels", "text/plain")}),
         422, "image", "not an image Pillow can read"),
        ("a truncated image", dict(files={"image": ("t.jpg", jpeg[: len(jpeg) // 3], "image/jpeg")}),
         422, "image", "corrupt or truncated image"),
        ("an image over the pixel limit", dict(files={"image": ("big.png", png(200, 100), "image/png")}),
         413, "image", f"image too large (200x100 = 20000 pixels > data.max_image_pixels = {PIXEL_LIMIT})"),
        ("a body over the size limit", dict(files={"image": ("huge.jpg", jpeg + b"\0" * 100_000, "image/jpeg")}),
         413, "body", "over the limit of 52428 bytes"),
        ("a missing image field", dict(data={"text": "SALE"}), 422, "image", "missing"),
        ("a wrong content type", dict(content=b"hello", headers={"content-type": "text/plain"}),
         415, "content-type", "expected multipart/form-data or application/json (got 'text/plain')"),
        ("text over the length limit", dict(files={"image": ("a.jpg", jpeg, "image/jpeg")}, data={"text": "x" * 500}),
         422, "text", f"500 characters is over the limit of {TEXT_LIMIT}"),
        ("invalid JSON", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "body", "not valid JSON"),
        ("JSON nested 20000 deep", dict(content=b'{"image": ' + b"[" * 20000 + b"]" * 20000 + b"}",
                                        headers={"content-type": "application/json"}),
         400, "body", "JSON nested 20001 levels deep, over the limit of 8"),
        ("bad base64", dict(json={"image": "%%%", "text": "x"}), 422, "image", "not valid base64"),
        ("a text that is not a string", dict(json={"image": base64.b64encode(jpeg).decode(), "text": 5}),
         422, "text", "must be a string"),
        ("an unpaired surrogate", dict(content=b'{"image": "' + base64.b64encode(jpeg) + b'", "text": "\\ud800"}',
                                       headers={"content-type": "application/json"}),
         422, "text", "not valid Unicode (an unpaired surrogate at character 0)"),
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
    assert metric(server.url, "mmcore_request_errors_total", route="/predict", field="content-type") == 1
    assert metric(server.url, "mmcore_request_errors_total", route="/predict/batch", field="items[].image") == 1
    assert metric(server.url, "mmcore_requests_total", route="/predict", status="5xx") == 0


def test_metrics_series_stay_bounded_by_route_template_and_status_class(server):
    """300 distinct junk paths (404s, most under /predict) add no series to /metrics."""
    with httpx.Client(timeout=30) as client:
        client.get(f"{server.url}/predict-warm")  # the one 'unmatched' series may appear once
        before = client.get(f"{server.url}/metrics").text
        for k in range(300):
            assert client.post(f"{server.url}/predict{k}/x?y={k}").status_code in (404, 405)
        after = client.get(f"{server.url}/metrics").text
    series = lambda text: {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}  # noqa: E731
    assert series(after) == series(before)
    assert metric(server.url, "mmcore_requests_total", route="unmatched", status="4xx") >= 300
    assert {labels["status"] for labels, _ in metric_samples(server.url, "mmcore_requests_total")} <= {
        "1xx", "2xx", "3xx", "4xx", "5xx"}


def test_score_histogram_has_the_fixed_edges_and_counts_every_answer(server, test_rows, exported_bundle):
    import hashlib

    version = "sha256:" + hashlib.sha256((exported_bundle / "manifest.json").read_bytes()).hexdigest()[:16]

    def buckets():
        return {labels["le"]: value for labels, value in metric_samples(server.url, "mmcore_calibrated_score_bucket")
                if labels["model_version"] == version}

    before, positives_before = buckets(), metric(server.url, "mmcore_positive_predictions_total", model_version=version)
    assert list(before) == [*(repr(float(edge)) for edge in SCORE_BUCKETS), "+Inf"]
    with httpx.Client(timeout=60) as client:
        answers = [_post_multipart(client, server.url, row).json() for row in test_rows[:10]]
    after = buckets()
    scores = [a["calibrated_score"] for a in answers]
    for edge in SCORE_BUCKETS:
        assert after[repr(float(edge))] - before[repr(float(edge))] == sum(s <= edge for s in scores)
    assert after["+Inf"] - before["+Inf"] == 10
    positives = metric(server.url, "mmcore_positive_predictions_total", model_version=version) - positives_before
    assert positives == sum(a["prediction"] for a in answers)


def test_health_ready_metadata_openapi(server, exported_bundle):
    with httpx.Client(timeout=30) as client:
        assert client.get(f"{server.url}/health").json() == {"status": "ok"}
        assert client.get(f"{server.url}/ready").json() == {"ready": True, "state": "ready", "error": None}
        metadata = client.get(f"{server.url}/metadata").json()
        decision = json.loads((exported_bundle / "decision.json").read_text())
        assert metadata["threshold"] == decision["threshold"]
        assert metadata["kind"] == "bundle" and metadata["modality"] == "multimodal"
        assert (metadata["vision"], metadata["text"]) == ("fake_cnn", "minilm")
        assert "onnxruntime" in metadata["versions"]
        assert (metadata["device"], metadata["providers"][0]) == ("cpu", "CPUExecutionProvider")
        assert metadata["serving"]["device"] == "cpu"
        assert metadata["serving"]["max_batch"] == 16
        assert metadata["text_source"] == "client, else empty text (marked none-optional)"
        openapi = client.get(f"{server.url}/openapi.json").json()
        metrics = client.get(f"{server.url}/metrics").text
        for page in ("/docs", "/redoc"):
            html = client.get(f"{server.url}{page}").text
            assert "/static-offline-docs/" in html and "cdn" not in html.lower(), page
    paths = openapi["paths"]
    assert {"/predict", "/predict/batch", "/health", "/ready", "/metadata", "/metrics"} <= set(paths)
    schemas = openapi["components"]["schemas"]
    ok = paths["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Prediction"}
    assert {"calibrated_score", "text_source", "model_version", "request_id"} <= set(schemas["Prediction"]["properties"])
    assert schemas["Prediction"]["properties"]["text_source"]["enum"] == ["client", "ocr", "none-optional", "unused"]
    refused = paths["/predict"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert refused == {"$ref": "#/components/schemas/ErrorAnswer"}
    for path, methods in paths.items():  # no answer is documented as {}
        for method, spec in methods.items():
            for status, response in spec["responses"].items():
                schema = next(iter(response.get("content", {}).values()), {}).get("schema")
                assert schema, (path, method, status)
    for name in ("mmcore_requests_total", "mmcore_request_errors_total", "mmcore_request_latency_seconds_bucket",
                 "mmcore_batch_size_bucket", "mmcore_calibrated_score_bucket", "mmcore_positive_predictions_total"):
        assert name in metrics


def test_a_busy_port_is_one_line_and_exit_1(server, exported_bundle, cli):
    result = cli("serve", exported_bundle, "--text", "required", "--port", server.port, check=False, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"mmcore serve: 127.0.0.1:{server.port}: address already in use; "
                                     "stop what listens there or choose another --port")
    assert "Traceback" not in result.stdout + result.stderr


def test_docs_load_offline_in_headless_chromium(server):
    """/docs renders Swagger UI from the server's own files, with every other host unreachable."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install 'mmcore[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("headless Chromium not installed (bash scripts/install-test-deps.sh)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # no other host resolves
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"{server.url}/docs")
        # Swagger UI draws one block per operation once it has fetched and read /openapi.json
        WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located(
            ("css selector", "#operations-default-predict_predict_post")))
        assert driver.find_element("css selector", ".swagger-ui .info .title").text.startswith("mmcore serve")
        urls = [json.loads(entry["message"])["message"].get("params", {}).get("request", {}).get("url")
                for entry in driver.get_log("performance")]
    finally:
        driver.quit()
    urls = [u for u in urls if u]
    assert urls and all(u.startswith((server.url, "data:")) for u in urls), urls


def test_a_run_dir_served_with_ocr_json_access_log_and_sigterm_during_a_request(exportable_run, test_rows, tmp_path):
    """RUN_DIR (PyTorch) gives the run's own test scores; no text + --ocr reads it; one JSON
    access line per request; no progress bar in the log; SIGTERM lets a request finish."""
    expected = {p["path"]: p for p in json.loads((exportable_run / "test_predictions.json").read_text())}
    running = Server(exportable_run, "--max-wait-ms", "1500", "--max-batch", "64", "--ocr", "fake_ocr",
                     "--access-log", "json", log=tmp_path / "serve.log")
    try:
        with httpx.Client(timeout=60) as client:
            row = test_rows[0]
            answer = _post_multipart(client, running.url, row, headers={"X-Request-ID": "run-1"}).json()
            assert answer["score"] == pytest.approx(expected[row["local_image_path"]]["score"], abs=1e-6)
            assert answer["text_source"] == "client"
            answer = client.post(f"{running.url}/predict",
                                 files={"image": ("a.jpg", row["bytes"], "image/jpeg")}).json()
            assert answer["text_source"] == "ocr" and answer["text"].startswith("tone ")
            assert answer["model_version"] == _sha256_16(exportable_run / "checkpoint_best.ckpt")
            assert client.get(f"{running.url}/metadata").json()["providers"] == ["torch"]

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
    log = running.output()
    access = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    first = next(entry for entry in access if entry["request_id"] == "run-1")
    assert set(first) == {"time", "method", "path", "status", "duration_ms", "request_id", "model_version"}
    assert (first["method"], first["path"], first["status"]) == ("POST", "/predict", 200)
    assert first["model_version"] == answer["model_version"]
    assert [e["path"] for e in access if e["method"] == "POST"] == ["/predict"] * 3
    assert "\r" not in log and "Loading weights" not in log


def _sha256_16(path):
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_two_workers_answer_alike_and_die_with_their_supervisor(exported_bundle, test_rows, predicted):
    """--workers 2: two processes behind one socket (stateless: either answers any request the
    same). The supervisor killed by SIGKILL: both workers end within seconds and the port is free."""
    threshold = json.loads((exported_bundle / "decision.json").read_text())["threshold"]
    running = Server(exported_bundle, "--workers", "2", "--text", "optional")
    answers = {}  # pid -> (row, answer)
    try:
        deadline = time.monotonic() + 120
        for attempt in range(200):  # new connections until both processes have answered (bounded)
            if len(answers) == 2 or time.monotonic() > deadline:
                break
            row = test_rows[attempt % len(test_rows)]
            with httpx.Client(timeout=60) as client:  # a fresh connection each time
                metadata = client.get(f"{running.url}/metadata")
                if metadata.status_code == 503:  # the other worker still warming up (a loaded machine): ask again
                    time.sleep(0.2)
                    continue
                pid = metadata.json()["serving"]["pid"]
                if pid not in answers:
                    answers[pid] = (row, _post_multipart(client, running.url, row).json())
        assert len(answers) == 2, "only one worker process answered"
        assert running.process.pid not in answers  # the supervisor serves nothing itself
        for row, answer in answers.values():
            _assert_same(answer, predicted[row["local_image_path"]], threshold)

        running.process.kill()  # SIGKILL: no chance to stop its workers
        running.process.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in answers):
            time.sleep(0.2)
        assert not [pid for pid in answers if _alive(pid)], "workers outlived their supervisor"
        with socket.socket() as sock:  # the port is free again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", running.port))
    finally:
        running.stop()
        for pid in answers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid):
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

