"""The Python API: train, load, predict, evaluate and export from a notebook or a service.

::

    import mmcore

    run = mmcore.train("recipes/demo.toml", overrides={"train.epochs": 5}, train=train_df, val=val_df, test=test_df)
    run.results["test"]["at_threshold"]["auroc"]; run.dir; run.report_path

    model = mmcore.load(run.dir)                 # a run directory or an export bundle: the same object
    scores = model.predict(df)                   # the rows + score, calibrated_score, prediction, text, text_source
    model.predict_one(PIL.Image.open(p), text="50% off today")
    metrics = model.evaluate(df).metrics         # what `mmcore eval` computes, intervals included
    model.export("bundles/x")                    # the parity-gated bundle

Every verb is the CLI's own code path (:mod:`mmcore.commands`): ``mmcore.train`` is ``mmcore run``,
``Model.predict`` scores through :func:`mmcore.commands.predict.predict_rows` as ``mmcore predict``
does (so the scores are the same numbers), ``Model.evaluate`` writes what ``mmcore eval`` writes,
``Model.export`` is ``mmcore export``. A model is any :class:`~mmcore.scoring.base.Scorer` that
:func:`~mmcore.scoring.scorers.open_scorer` opens. Mistakes raise :mod:`mmcore.errors` kinds
(:class:`~mmcore.errors.RecipeError`, :class:`~mmcore.errors.DataError`,
:class:`~mmcore.errors.RunError`, all :class:`~mmcore.errors.MmcoreError`) whose message is the
CLI's line(s). docs/python-api.md has the whole tour.

Threads: a :class:`Model` may be shared by the threads of a service. Images are decoded and
preprocessed in the calling threads at once; the model itself is called by one thread at a time
(a lock per model: a tokenizer, for one, may not be called from two threads at once), and
PyTorch and onnxruntime use every core for each call anyway.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import attrs

from mmcore.commands.evaluate import Evaluation, evaluate, evaluate_rows
from mmcore.commands.export import export_run
from mmcore.commands.predict import predict_rows
from mmcore.commands.run import train_recipe
from mmcore.data.csvs import read_split
from mmcore.data.frames import split_from_frame
from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.devices import parse_device
from mmcore.errors import DataError
from mmcore.export.int8 import Int8Options
from mmcore.progress import progress_for
from mmcore.rundir import RESULTS_FILE, RunDir
from mmcore.scoring.scorers import open_scorer
from mmcore.scoring.tables import OUTPUT_COLUMNS, read_input
from mmcore.textsource import TEXT_MODES, MissingTextError, has_text

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from mmcore.commands.export import ExportSummary

#: a recipe: a path, TOML text (a ``str`` holding a newline) or a dict
RecipeSource = Union[str, os.PathLike, Mapping[str, Any]]
#: rows: a DataFrame or a CSV path
Rows = Union["pd.DataFrame", str, os.PathLike]
#: one image: a path, the image file's bytes or a PIL image
ImageInput = Union[str, os.PathLike, bytes, "Image.Image"]

__all__ = ["Evaluation", "Model", "Prediction", "Run", "load", "make_demo_data", "train"]

#: columns ``Model.predict`` adds besides :data:`~mmcore.scoring.tables.OUTPUT_COLUMNS`: the text each
#: row was scored with and where it came from (``client``, ``ocr``, ``none-optional``, ``unused``)
TEXT_COLUMNS = ("text", "text_source")


def _quiet(*args, **kwargs):
    return None


@attrs.frozen
class Run:
    """A finished training run: its directory and what it wrote."""

    #: the run directory
    dir: Path

    @property
    def results(self) -> dict:
        """``results.json`` as a dict: ``results["test"]["at_threshold"]["auroc"]``, intervals, the decision."""
        return RunDir(self.dir).results()

    @property
    def report_path(self) -> Path:
        """The run's ``report.html``."""
        return self.dir / "report.html"

    @property
    def recipe(self) -> dict:
        """The resolved recipe the run trained, as plain data."""
        return RunDir(self.dir).recipe_data()

    def load(self, **options) -> Model:
        """:func:`load` of this run (``options`` as there)."""
        return load(self.dir, **options)


@attrs.frozen
class Prediction:
    """One item scored by :meth:`Model.predict_one`."""

    #: the raw sigmoid of the logit, and after the run's temperature
    score: float
    calibrated_score: float
    #: ``calibrated_score >= threshold`` (the threshold the run tuned on validation)
    prediction: bool
    #: the text the model read, and where it came from (``client``, ``ocr``, ``none-optional``, ``unused``)
    text: str
    text_source: str


def train(recipe: RecipeSource, *, overrides: Mapping[str, Any] | Sequence[str] | None = None,
          train: Rows | None = None, val: Rows | None = None, test: Rows | None = None,
          out: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None, registry=None,
          quiet: bool = False) -> Run:
    """Train ``recipe`` as ``mmcore run`` does -> :class:`Run`.

    ``recipe``: a path, TOML text (a ``str`` holding a newline) or a dict, checked by the same strict
    converter with the same one-line problems (raised as :class:`~mmcore.errors.RecipeError`).
    ``overrides``: ``{"train.epochs": 5}`` (or ``["train.epochs=5"]``, as ``--set``).
    ``train``/``val``/``test``: a CSV path or a pandas DataFrame (image column: paths, bytes or PIL
    images; :mod:`mmcore.data.frames`) instead of the split the recipe names; relative image paths
    in a DataFrame start from ``base_dir`` (default: the current directory). ``out``: the run
    directory (default ``runs/<experiment>/<timestamp>``). ``quiet``: no progress bars or lines;
    without it, the libraries' own bars (weights loading) still go when stderr is no terminal, as
    the CLI's do (a script's log, a scheduler's).
    """
    data = {name: value for name, value in (("train", train), ("val", val), ("test", test)) if value is not None}
    items = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or ())
    run_dir = train_recipe(recipe, items, out=out, data=data, base_dir=base_dir, registry=registry,
                           progress=progress_for(quiet), echo=_quiet if quiet else print)
    return Run(dir=Path(run_dir))


def make_demo_data(folder: str | os.PathLike = "demo_data", *, n_train: int = 240, n_val: int = 80, n_test: int = 80,
                   size: tuple[int, int] = (96, 96), seed: int = 0) -> Path:
    """Write the small generated ad-vs-not dataset ``mmcore demo`` trains on (``images/``, ``train.csv``,
    ``val.csv``, ``test.csv``, balanced) into ``folder`` -> its Path."""
    from mmcore.commands.demo import make_demo_dataset

    return Path(make_demo_dataset(folder, n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed))


def load(path: str | os.PathLike, *, device: str = "auto", text: Literal["required", "optional"] = "required",
         verify: bool | None = None, registry=None, quiet: bool = False) -> Model:
    """The model at ``path`` -> :class:`Model`: a run directory (finished, or live: its last completed
    checkpoint), an export bundle, or anything else :func:`~mmcore.scoring.scorers.open_scorer` opens.

    ``device``: ``auto``/``cpu``/``cuda[:N]`` as ``--device``. ``text``: what :meth:`Model.predict_one`
    does with an item sent without text when the run names no OCR engine: ``"required"`` refuses it,
    ``"optional"`` scores it with empty text (``text_source`` says ``none-optional``). ``verify``
    (bundles): hash every file now.
    """
    if text not in TEXT_MODES:
        raise DataError(f"text={text!r}: expected one of {', '.join(map(repr, TEXT_MODES))}")
    device = parse_device(device)
    scorer = open_scorer(path, registry=registry, device=device, verify=verify, progress=progress_for(quiet))
    return Model(scorer, device=device, text=text, registry=registry, quiet=quiet)


class Model:
    """A loaded model: :meth:`predict`, :meth:`predict_one`, :meth:`evaluate`, :meth:`export`.

    Safe to share between threads (see the module docstring). ``scorer`` is the
    :class:`~mmcore.scoring.base.Scorer` underneath, for what this class does not say.
    """

    def __init__(self, scorer, *, device="auto", text="required", registry=None, quiet=False):
        self.scorer = scorer
        self.device = device
        self.text = text
        self.registry = registry
        self.quiet = quiet
        self._model_lock = threading.Lock()

    def __repr__(self):
        return f"<mmcore.Model {self.kind} {self.source} on {self.scorer.device_name}>"

    # -- what it is ------------------------------------------------------------------------

    @property
    def source(self) -> Path:
        """Where the model was read from."""
        return Path(self.scorer.source)

    @property
    def kind(self) -> str:
        """``run``, ``bundle``, ... (the scorer's kind)."""
        return self.scorer.kind

    @property
    def modality(self) -> str:
        return self.scorer.modality

    @property
    def threshold(self) -> float:
        """The decision threshold on the calibrated score, tuned on validation."""
        return float(self.scorer.decision["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.scorer.decision["temperature"])

    def metadata(self) -> dict:
        """Model, recipe summary, decision, device and versions (what ``GET /metadata`` answers)."""
        return self.scorer.metadata()

    # -- scoring -----------------------------------------------------------------------------

    def predict(self, data: Rows, *, base_dir: str | os.PathLike | None = None, columns: Mapping[str, str] | None = None,
                batch_size: int | None = None, cache: bool = False) -> pd.DataFrame:
        """Score a DataFrame or a CSV path -> a DataFrame: the input's rows and columns with ``score``,
        ``calibrated_score``, ``prediction``, ``text`` and ``text_source`` added (a row left out,
        its image unreadable under ``data.on_bad_image = "skip"``, has them empty: NaN / NA).

        The same rows give the same scores as ``mmcore predict`` (the same code path). A DataFrame's
        image column holds paths, bytes or PIL images (:mod:`mmcore.data.frames`; ``columns`` renames
        ``{"image", "label", "text"}``); rows stream through in batches, so memory stays flat.
        ``cache`` (runs): through the feature cache, as ``--cache``.
        """
        frame, split = self._rows(data, base_dir=base_dir, columns=columns, require_label=False)
        scored = predict_rows(self.scorer, split, batch_size=batch_size, cache=cache, registry=self.registry,
                              progress=not self.quiet, desc="predict", model_lock=self._model_lock)
        return _with_scores(frame, scored)

    def predict_one(self, image: ImageInput | None = None, text: str | None = None) -> Prediction:
        """Score one item -> :class:`Prediction`: ``image`` a path, the image file's bytes or a PIL
        image (None for a text_only model), ``text`` its text.

        Without text, the run's OCR engine reads it from the image when the run names one; else
        ``load(..., text="optional")`` scores empty text and the default refuses the item
        (:class:`~mmcore.textsource.MissingTextError`). Scored as :meth:`predict` scores a row.
        """
        import pandas as pd

        scorer = self.scorer
        rule = scorer.text_rule(mode=self.text)
        if rule.reads_text and not has_text(text) and not (rule.ocr and image is not None):
            try:
                rule.settle(text)
            except MissingTextError as exc:
                raise MissingTextError(f"text: {exc}") from None
        if image is None and scorer.uses_vision:
            raise DataError(f"image: missing (this {scorer.modality} model reads the image)")
        row = pd.DataFrame({"local_image_path": [image if image is not None else "-"], "text_info": [text or ""]})
        split = split_from_frame(row, name="item", require_label=False, require_text=False,
                                 check_images=scorer.uses_vision, **self._bounds())
        scored = predict_rows(scorer, split, batch_size=1, registry=self.registry, progress=False,
                              model_lock=self._model_lock)
        if not len(scored.positions):  # the run skips unreadable images; one item has nothing else to say
            raise DataError(f"image: {split.paths[0]}: unreadable (data.on_bad_image = \"skip\" left it out)")
        return Prediction(score=float(scored.raw[0]), calibrated_score=float(scored.calibrated[0]),
                          prediction=bool(scored.predicted[0]), text=scored.texts[0], text_source=scored.text_sources[0])

    def evaluate(self, data: Rows | None = None, *, out: str | os.PathLike | None = None,
                 base_dir: str | os.PathLike | None = None, columns: Mapping[str, str] | None = None,
                 cache: bool = False) -> Evaluation:
        """Score labelled rows and write what ``mmcore eval`` writes -> :class:`~mmcore.commands.evaluate.Evaluation`
        (``.results``: results.json as a dict, ``.metrics``: the test metrics at the threshold, ``.out``).

        ``data``: a DataFrame or a CSV path (default: the run's test split, as ``mmcore eval`` reads it).
        ``out``: the evaluation folder (default ``RUN/eval/<csv>-<time>``, beside a bundle ``BUNDLE-eval/...``).
        """
        echo = _quiet if self.quiet else print
        if data is None:
            folder = evaluate(self.source, out=out, device=self.device, cache=cache, registry=self.registry,
                              progress=not self.quiet, echo=echo)
            return Evaluation(out=Path(folder), results=json.loads((Path(folder) / RESULTS_FILE).read_text("utf-8")))
        _, split = self._rows(data, base_dir=base_dir, columns=columns, require_label=True)
        return evaluate_rows(self.scorer, split, split.csv, out=out, cache=cache, registry=self.registry,
                             progress=not self.quiet, echo=echo)

    def export(self, out: str | os.PathLike, *, format: str = "onnx", data: Rows | None = None, rows: int = 64,
               base_dir: str | os.PathLike | None = None, score_tol: float | None = None, min_agreement: float = 1.0,
               safetensors: bool = False, quantize: Literal["int8"] | Int8Options | None = None) -> ExportSummary:
        """Export the run (or ensemble) to the bundle folder ``out`` through the parity gate, as ``mmcore export``
        does -> :class:`~mmcore.commands.export.ExportSummary` (``out``, ``format``, ``parity``).

        ``data``: a DataFrame or CSV path of parity rows (default: the run's validation split).
        ``quantize``: ``"int8"`` (``--quantize int8``'s defaults) or an :class:`~mmcore.export.int8.Int8Options`;
        the int8 graph is kept only if its quality gate passes, else :class:`~mmcore.export.int8.Int8Refused`.
        """
        if quantize == "int8":
            quantize = Int8Options()
        elif quantize is not None and not isinstance(quantize, Int8Options):
            raise ValueError(f"quantize: {quantize!r}; give 'int8' or an Int8Options")
        return export_run(self.source, out, fmt=format, data=data, rows=rows, base_dir=base_dir, score_tol=score_tol,
                          min_agreement=min_agreement, safetensors=safetensors, quantize=quantize,
                          registry=self.registry, progress=not self.quiet, echo=_quiet if self.quiet else print)

    # -- rows --------------------------------------------------------------------------------

    def _bounds(self):
        scorer = self.scorer
        return {"max_image_bytes": int(scorer.data_config.get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES),
                "max_image_pixels": scorer.max_image_pixels, "image_formats": scorer.image_formats}

    def _rows(self, data, *, base_dir, columns, require_label):
        """``(frame, split)``: a DataFrame as given, or a CSV read as ``mmcore predict`` (``require_label``:
        ``mmcore eval --data``) reads it."""
        scorer = self.scorer
        if isinstance(data, (str, os.PathLike)):
            if columns:
                raise DataError(f"{data}: columns= renames a DataFrame's columns; a CSV has the split's own")
            max_image_bytes = self._bounds()["max_image_bytes"]
            if require_label:
                return None, read_split(data, base_dir, max_image_bytes=max_image_bytes)
            return read_input(data, base_dir, require_text=scorer.uses_text, check_images=scorer.uses_vision,
                              max_image_bytes=max_image_bytes)
        split = split_from_frame(data, base_dir=base_dir, columns=columns, require_label=require_label,
                                 require_text=scorer.uses_text, check_images=scorer.uses_vision, **self._bounds())
        return data, split


def _with_scores(frame, scored):
    """``frame`` with the scored columns; rows left out keep them empty."""
    import numpy as np
    import pandas as pd

    n = len(frame)
    positions = np.asarray(scored.positions, dtype=np.int64)

    def column(values, empty, dtype):
        filled = pd.array([empty] * n, dtype=dtype) if dtype == "boolean" else np.full(n, empty, dtype=dtype)
        filled[positions] = values
        return filled

    score, calibrated, prediction = OUTPUT_COLUMNS
    text, text_source = TEXT_COLUMNS
    return frame.assign(**{
        score: column(scored.raw, np.nan, np.float64),
        calibrated: column(scored.calibrated, np.nan, np.float64),
        prediction: column(np.asarray(scored.predicted, dtype=bool), pd.NA, "boolean"),
        text: column(list(scored.texts), None, object),
        text_source: column(list(scored.text_sources), None, object),
    })
