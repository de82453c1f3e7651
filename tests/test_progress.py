"""Progress output: bars only on a terminal, one line per epoch otherwise, a smoothed samples/s rate,
and ``--quiet`` silencing third-party bars too."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mmcore
from mmcore.progress import SmoothedRate, wants_third_party_silence


def run_piped(*args, env=None):
    """The real ``mmcore`` CLI with stdout and stderr piped, read as bytes (text mode would turn ``\r`` into ``\n``)."""
    done = subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], capture_output=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, stdout + stderr
    return stdout, stderr


def test_a_piped_run_draws_no_bars_and_says_one_line_per_epoch(tiny_recipe, tmp_path):
    stdout, stderr = run_piped("run", tiny_recipe(train={"epochs": 2}), "--out", tmp_path / "run")
    assert "\r" not in stderr and "\r" not in stdout
    assert "batch/s" not in stderr and "epoch 1/2" not in stderr  # no tqdm line, not even a final one
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1", "epoch 2"]
    for line in epoch_lines:  # the rate, labelled with its unit
        rate = float(line.split("samples/s=")[1].split()[0])
        assert rate > 0


def test_the_rate_is_smoothed_not_a_cumulative_mean():
    now = [0.0]
    rate = SmoothedRate(smoothing=0.5, clock=lambda: now[0])
    readings = []
    for seconds in (1.0, 1.0, 1.0, 10.0, 10.0):  # 100 samples per window; then the job slows down 10x
        now[0] += seconds
        readings.append(rate.update(100))
    windows = [r for r, _ in readings]
    smoothed = [s for _, s in readings]
    assert windows == [100.0, 100.0, 100.0, 10.0, 10.0]
    assert smoothed == [100.0, 100.0, 100.0, 55.0, 32.5]  # EMA, 0.5 weight on the newest window
    cumulative = 500 / 23
    assert smoothed[-1] != pytest.approx(cumulative)


def test_third_party_bars_go_when_quiet_or_when_nobody_watches():
    class Tty:
        def isatty(self):
            return True

    assert not wants_third_party_silence(False, Tty())
    assert wants_third_party_silence(True, Tty())
    assert wants_third_party_silence(False, open(os.devnull, "w"))


def test_quiet_silences_transformers_loading_weights_bar(tmp_path):
    """A real transformers model saved and loaded with stderr piped: after the CLI's setup (a piped
    run, before transformers is imported, as in ``mmcore run``; ``--quiet`` after it is) no bar
    text; with the bar switched back on, the same load draws it (so the check can fail)."""
    pytest.importorskip("transformers")
    script = textwrap.dedent(
        f"""
        import sys
        from mmcore.progress import progress_for
        assert progress_for(False) is True  # not quiet, but stderr is a pipe: no third-party bars either
        from transformers import AutoModel, BertConfig, BertModel
        from transformers.utils import logging
        config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, vocab_size=20)
        BertModel(config).save_pretrained({str(tmp_path / "tiny")!r})
        AutoModel.from_pretrained({str(tmp_path / "tiny")!r})
        print("@@on", file=sys.stderr, flush=True)
        logging.enable_progress_bar()
        AutoModel.from_pretrained({str(tmp_path / "tiny")!r})
        print("@@quiet-again", file=sys.stderr, flush=True)
        progress_for(True)
        AutoModel.from_pretrained({str(tmp_path / "tiny")!r})
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_DISABLE", "TRANSFORMERS_VERBOSITY"))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=300)
    stderr = done.stderr.decode()  # bytes: text mode would turn "\r" into "\n"
    assert done.returncode == 0, stderr
    quiet, rest = stderr.split("@@on")
    shown, quiet_again = rest.split("@@quiet-again")
    assert "Loading weights" in shown and "\r" in shown
    for text in (quiet, quiet_again):
        assert "Loading weights" not in text and "Writing model shards" not in text and "\r" not in text


def test_every_command_with_quiet_silences_third_party_bars_the_same_way():
    """``--quiet`` means no bars at all, the libraries' included: each command hands its flag to
    ``progress_for`` (a bare ``not quiet`` would leave transformers' bars on a terminal)."""
    cli = Path(mmcore.__file__).parent / "cli"
    bare = [f"{path.name}:{n}" for path in sorted(cli.glob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if "progress=not quiet" in line]
    assert bare == []
    quiet_commands = [path.name for path in cli.glob("*.py") if '"--quiet"' in path.read_text()]
    assert quiet_commands and all("progress_for(quiet)" in (cli / name).read_text() for name in quiet_commands)
