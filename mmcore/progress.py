"""Progress: bars only on a terminal, a smoothed samples/s rate, and silence for third-party bars.

Every bar of mmcore goes through :func:`progress_bar`: with ``progress`` on, tqdm decides
(``disable=None``: a bar when stderr is a terminal, nothing when it is a pipe or a file, so a
log never fills with ``\\r`` updates); with it off, no bar at all. Where no bar is drawn the
training loop says one summary line per epoch instead (:class:`~mmcore.engine.training.TrainingRun`).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

#: weight of the newest window in the smoothed rate (as tqdm's own ``smoothing`` default, 0.3)
RATE_SMOOTHING = 0.3


def progress_bar(progress=True, **kwargs):
    """A tqdm bar shown only on a terminal (``progress``), never otherwise; ``leave=False`` by default."""
    kwargs.setdefault("leave", False)
    return tqdm(disable=None if progress else True, **kwargs)


class SmoothedRate:
    """Samples per second, an exponential moving average over the windows between two reads.

    A cumulative mean (samples / time since the start) hides a slowdown behind the start's
    history; the EMA follows it within a few windows. ``update(samples)`` closes a window and
    returns ``(window rate, smoothed rate)``; the first window is taken as it is.
    """

    def __init__(self, smoothing=RATE_SMOOTHING, clock=time.perf_counter):
        self.smoothing = smoothing
        self.clock = clock
        self.last = clock()
        self.value = None

    def restart(self):
        """Start a new window now (after a pause the loop does not count, e.g. validation)."""
        self.last = self.clock()

    def update(self, samples):
        """Close the window with ``samples`` done in it -> ``(window rate, smoothed rate)`` in samples/s."""
        now = self.clock()
        rate = samples / max(now - self.last, 1e-9)
        self.last = now
        self.value = rate if self.value is None else self.smoothing * rate + (1 - self.smoothing) * self.value
        return rate, self.value


def wants_third_party_silence(quiet, stream=None):
    """Third-party bars go when ``--quiet`` or when nobody watches (``stream``, stderr, is no terminal)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(quiet) or not (isatty and isatty())


def silence_third_party_progress(chatter=True):
    """Turn off the bars of the libraries plugins load weights with (HF hub downloads,
    transformers' "Loading weights"), and with ``chatter`` their info and warning lines too
    (``--quiet``; a piped run keeps the warnings in its log); mmcore's own bars are unaffected.

    The environment variables reach libraries imported later (and child processes); the
    libraries already imported are told directly, as they read them only at import time.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' bars follow the hub's flag at import
    if chatter:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # only what is imported already is told directly: importing transformers here would cost seconds
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        if chatter:
            transformers_logging.set_verbosity_error()


def progress_for(quiet):
    """``progress`` for a command: off with ``--quiet``; third-party bars (weights downloads and
    loading) off too when quiet or when stderr is no terminal, where they would fill a log."""
    if wants_third_party_silence(quiet):
        silence_third_party_progress(chatter=quiet)
    return not quiet
