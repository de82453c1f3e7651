"""The parts of `mmcore serve` that need no server process: the batcher, the text rule, the
decode budget, the warm-up before /ready, and the refusals that come before the port is bound."""

import asyncio
import shutil
import subprocess
import sys
import threading
import time

import pytest
from serving import free_port

from mmcore.serve.batching import Batcher, Item
from mmcore.serve.memory import DecodeBudget
from mmcore.textsource import MissingTextError, TextSourceError, text_rule

NO_TEXT_SOURCE = (
    "this multimodal model reads text, and nothing gives it text: choose --text required (each request "
    "sends its text), --ocr ENGINE (read the text from the image) or --text optional (score empty text; "
    'each answer says text_source "none-optional")'
)


# -- the batcher ----------------------------------------------------------------------------


def test_a_row_that_fails_scoring_fails_only_itself():
    """A batch holding one row the scorer cannot take is scored again row by row: the others
    get their logits, only that row its error."""
    calls = []

    def score(items):
        calls.append([item.text for item in items])
        if any(item.text == "poison" for item in items):
            raise ValueError("cannot tokenize")
        return [float(len(item.text)) for item in items]

    async def run():
        batcher = Batcher(score, max_batch=8, max_wait=0.05)
        batcher.start()
        texts = ["a", "bb", "poison", "dddd"]
        results = await asyncio.gather(*(batcher.submit([Item(vision=None, text=t)]) for t in texts),
                                       return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(run())
    assert results[0] == [1.0] and results[1] == [2.0] and results[3] == [4.0]
    assert isinstance(results[2], ValueError) and str(results[2]) == "cannot tokenize"
    assert calls[0] == ["a", "bb", "poison", "dddd"]  # first together, then one by one
    assert sorted(map(tuple, calls[1:])) == [("a",), ("bb",), ("dddd",), ("poison",)]


# -- the text rule --------------------------------------------------------------------------


def test_the_text_rule_gives_each_row_its_text_and_source():
    with pytest.raises(TextSourceError) as refused:
        text_rule("multimodal")
    assert str(refused.value) == NO_TEXT_SOURCE and refused.value.exit_code == 2
    with pytest.raises(TextSourceError, match="^this text_only model reads text"):
        text_rule("text_only")

    required = text_rule("multimodal", mode="required")
    assert required.settle("50% OFF") == ("50% OFF", "client")
    for blank in (None, "", "  \n"):
        with pytest.raises(MissingTextError, match=r"^missing \(this model reads text: send it with each image\)$"):
            required.settle(blank, read_ocr=lambda: "never read")

    ocr = text_rule("multimodal", ocr=True)
    assert ocr.wants_ocr("") and not ocr.wants_ocr("SALE")
    assert ocr.settle("", read_ocr=lambda: "read from the image") == ("read from the image", "ocr")
    assert ocr.settle("  ", read_ocr=lambda: "") == ("", "ocr")  # an image without text: OCR says so
    with pytest.raises(MissingTextError, match="send an image for OCR"):
        ocr.settle(None, read_ocr=None)

    optional = text_rule("multimodal", mode="optional")
    assert optional.settle(None) == ("", "none-optional")
    assert optional.settle("hi") == ("hi", "client")
    assert text_rule("vision_only").settle("ignored") == ("ignored", "unused")


# -- the decode budget ----------------------------------------------------------------------


def test_the_decode_budget_admits_what_fits_and_an_oversized_image_alone():
    released = []
    budget = DecodeBudget(100 * 12, on_idle=lambda: released.append(True))  # 100 pixels' worth
    order = []
    first_in = threading.Event()

    def decode(name, pixels, hold):
        with budget.reserve(pixels):
            order.append(f"{name} in")
            first_in.set()
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=decode, args=("a", 60, 0.3))
    first.start()
    first_in.wait(5)
    second = threading.Thread(target=decode, args=("b", 60, 0))  # 60 + 60 > 100: waits for a
    huge = threading.Thread(target=decode, args=("c", 10**9, 0))  # larger than the budget: alone
    second.start()
    huge.start()
    first.join(5), second.join(5), huge.join(5)
    assert order[:2] == ["a in", "a out"]
    assert order[2:] in (["b in", "b out", "c in", "c out"], ["c in", "c out", "b in", "b out"])
    assert budget.in_flight == 0
    assert budget.cost(10**9) == budget.limit


# -- /ready waits for the warm-up -----------------------------------------------------------


def test_ready_answers_503_until_the_warm_up_row_is_scored(exported_bundle, monkeypatch):
    from fastapi.testclient import TestClient

    from mmcore.serve.app import create_app
    from mmcore.serve.config import ServeConfig
    from mmcore.serve.service import Service

    release = threading.Event()
    warm_up = Service.warm_up
    scored = []

    def slow_warm_up(self):
        release.wait(60)
        warm_up(self)
        scored.append(True)

    monkeypatch.setattr(Service, "warm_up", slow_warm_up)
    app = create_app(ServeConfig(source=str(exported_bundle), text="required"))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while app.state.service.state == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.get("/ready")
        assert answer.status_code == 503
        assert answer.json() == {"ready": False, "state": "warming up", "error": None}
        assert client.post("/predict", json={"image": "", "text": "x"}).json()["error"]["reason"] == \
            "model is warming up"
        release.set()
        while app.state.service.state == "warming up" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scored == [True]
        assert client.get("/ready").json() == {"ready": True, "state": "ready", "error": None}


# -- refusals before the port is bound ------------------------------------------------------


def _serve(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mmcore", "serve", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_multimodal_model_without_a_text_source_is_refused_in_one_line(exported_bundle):
    result = _serve(exported_bundle, "--port", free_port())
    assert result.returncode == 2
    assert result.stderr.strip() == f"mmcore serve {exported_bundle}: {NO_TEXT_SOURCE}"


def test_device_cuda_without_cuda_is_one_line_before_the_port_is_bound(exported_bundle, exportable_run):
    import socket

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with socket.socket() as busy:  # were the port bound first, the line would be about the port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        bundle = _serve(exported_bundle, "--text", "required", "--device", "cuda", "--port", port)
        run = _serve(exportable_run, "--text", "required", "--device", "cuda:1", "--port", port)
    assert bundle.returncode == run.returncode == 1
    import onnxruntime

    providers = ", ".join(onnxruntime.get_available_providers())
    assert bundle.stderr.strip() == (f"mmcore serve: --device cuda: onnxruntime has no CUDAExecutionProvider "
                                     f"(available: {providers}); install onnxruntime-gpu in place of onnxruntime")
    assert run.stderr.strip() == (f"mmcore serve: --device cuda:1: PyTorch sees no CUDA device (torch "
                                  f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'})")


def test_a_run_still_training_is_refused_unless_served_while_training(exportable_run, tmp_path):
    """The run's lock held by a live process: no --resume advice (it would be refused); the line
    says it trains, and --while-training serves its best checkpoint so far."""
    from mmcore.rundir import RunDir
    from mmcore.serve.launch import source_recipe

    run = tmp_path / "live"
    shutil.copytree(exportable_run, run)
    RunDir(run).write_status("running")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mmcore.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(120)"), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _serve(run, "--text", "required", "--port", free_port())
        assert result.returncode == 4
        import socket

        assert result.stderr.strip() == (
            f"{run}: still training (pid {holder.pid} on {socket.gethostname()}); serve its best checkpoint "
            "so far with --while-training, or wait until it completes")
        said = []
        kind, recipe = source_recipe(run, while_training=True, echo=said.append)
        assert kind == "run" and recipe["experiment"] == "exportable"
        assert said == [f"{run}: run in progress (pid {holder.pid} on {socket.gethostname()}); "
                        f"using its last completed checkpoint, {run / 'checkpoint_best.ckpt'}"]
    finally:
        holder.kill()
        holder.wait()
