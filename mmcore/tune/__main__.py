"""Processes ``mmcore tune`` starts (not meant to be typed): ``python -m mmcore.tune worker INDEX``
runs trials as one of ``--jobs`` workers; ``python -m mmcore.tune trial TRIAL_ID DIR [--resume]``
is one trial under torchrun (``--nproc``). Both read the study from ``$MMCORE_TUNE_CONFIG``.

An entry point like the CLI, above ``commands/``: it hands the study the trial trainer,
:func:`mmcore.commands.tune.train_trial`.
"""

from __future__ import annotations

import json
import os
import sys

from mmcore.commands.tune import train_trial
from mmcore.errors import MmcoreError
from mmcore.tune.study import ENV_CONFIG, ENV_OVERRIDES, TuneConfig, load_study, work


def _worker(index):
    """One of ``--jobs`` workers: its lines carry its number."""
    config = TuneConfig.from_json(os.environ[ENV_CONFIG])

    def echo(text="", **_):
        print("\n".join(f"[job {index}] {line}" for line in str(text).splitlines() or [""]), flush=True)

    work(config, train_trial=train_trial, index=index, echo=echo)


def _trial(trial_id, trial_dir, resume):
    """One trial on every torchrun rank; rank 0 talks to the study."""
    from pathlib import Path

    import optuna

    config = TuneConfig.from_json(os.environ[ENV_CONFIG])
    trial = None
    if os.environ.get("RANK", "0") == "0":
        study, _ = load_study(config, heartbeat=False)  # the parent keeps the trial's heartbeat
        trial = optuna.trial.Trial(study, trial_id)
    overrides = json.loads(os.environ.get(ENV_OVERRIDES, "[]"))  # the same --set list on every rank
    train_trial(config, trial, Path(trial_dir), overrides, resume=resume, echo=print)


def main(argv):
    """Dispatch ``worker`` / ``trial``; MmcoreErrors become their lines and exit code."""
    try:
        if argv[:1] == ["worker"] and len(argv) == 2:
            _worker(int(argv[1]))
        elif argv[:1] == ["trial"] and len(argv) in (3, 4):
            _trial(int(argv[1]), argv[2], resume=argv[3:] == ["--resume"])
        else:
            print("usage: python -m mmcore.tune worker INDEX | trial TRIAL_ID DIR [--resume] (started by mmcore tune)",
                  file=sys.stderr)
            return 2
    except MmcoreError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(line, file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
