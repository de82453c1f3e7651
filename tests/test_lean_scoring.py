"""A bundle scores without what it does not use: a fresh process opens a bundle, scores rows and has
imported neither transformers, torchvision, onnx, timm, peft nor the engine, nor any plugin (a bundle of
core classes names none), and its scores are predict's; ``mmcore serve BUNDLE`` gets to /ready and
answers without them."""

import csv
import json
import subprocess
import sys
from pathlib import Path

SCORE_ROWS = r"""
import csv, importlib.metadata, json, sys
from pathlib import Path

from mmcore.scoring.scorers import open_scorer

bundle, table = sys.argv[1], Path(sys.argv[2])
scorer = open_scorer(bundle, device="cpu")
with open(table, newline="", encoding="utf-8") as handle:
    rows = list(csv.DictReader(handle))[:4]
scores = []
for row in rows:  # one row at a time, as serve's warm-up and a single request score
    item = scorer.preprocess(scorer.load_image(table.parent / row["local_image_path"]))
    scores.append(float(scorer.decide(scorer.logits([item], [row["text_info"]]))[1][0]))
plugins = {ep.value.split(":")[0].split(".")[0] for ep in importlib.metadata.entry_points(group="mmcore")}
heavy = ["transformers", "torchvision", "onnx", "timm", "peft", "mmcore.engine", "torch._dynamo", *sorted(plugins)]
print(json.dumps({"scores": scores, "imported": [name for name in heavy if name in sys.modules],
                  "plugins": sorted(plugins)}))
"""


def test_a_bundle_opens_and_scores_without_transformers_torchvision_onnx_or_the_engine(exported_bundle, demo_data, tmp_path):
    from mmcore.commands.predict import predict_csv
    from mmcore.export.bundle import read_manifest

    read_manifest(exported_bundle)  # this machine has checked it (the exporter records it so too)
    table = Path(demo_data) / "test.csv"
    result = subprocess.run([sys.executable, "-c", SCORE_ROWS, str(exported_bundle), str(table)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["imported"] == []
    assert "mmcore_fake_encoders" in report["plugins"]  # there was a plugin not to load

    predict_csv(exported_bundle, table, tmp_path / "scored.csv", progress=False, echo=lambda line: None)
    with open(tmp_path / "scored.csv", newline="", encoding="utf-8") as handle:
        predicted = [float(row["calibrated_score"]) for row in csv.DictReader(handle)][:4]
    assert max(abs(a - b) for a, b in zip(report["scores"], predicted, strict=True)) <= 1e-6


def test_serve_of_a_bundle_is_ready_without_them(exported_bundle, tmp_path, monkeypatch):
    """``mmcore serve BUNDLE`` to /ready (its warm-up row scored) and a request answered: Python's own import log
    (``PYTHONPROFILEIMPORTTIME``) names no module of them. A package is many modules: the log is read by prefix
    (it may drop a package's own line, as it does ``tokenizers``' in a server, but not all its modules')."""
    import httpx
    from serving import Server

    from mmcore.export.bundle import read_manifest

    read_manifest(exported_bundle)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    server = Server(exported_bundle, "--text", "required", "--device", "cpu", log=tmp_path / "serve.log")
    try:
        files = {"image": ("ad.png", _png(), "image/png")}
        answer = httpx.post(f"{server.url}/predict", files=files, data={"text": "50% OFF"}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    imported = {line.split("|")[-1].strip() for line in server.output().splitlines() if line.startswith("import time:")}
    assert {"onnxruntime.capi", "tokenizers.tokenizers", "mmcore.kit.pixels"} <= imported  # what a bundle uses is there
    # not mmcore.engine: the CLI registers every command, and export's imports a few small engine modules (ms)
    heavy = ("transformers", "torchvision", "onnx", "timm", "peft", "torch._dynamo")
    assert sorted(name for name in imported if name.startswith(tuple(f"{h}." for h in heavy)) or name in heavy) == []


def _png():
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()
