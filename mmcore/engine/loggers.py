"""Where scalars go: TensorBoard (default) and, optionally, Weights & Biases and MLflow.

Both get the same calls (``add_scalar(tag, value, step)``), every scalar on the global
(optimizer) step as Lightning does, so per-step training curves and per-epoch validation
ones overlay; the epoch is a scalar of its own (``epoch``).
W&B is optional (``pip install 'mmcore[wandb]'``, ``logging.wandb = true``) and works with
``WANDB_MODE=offline``: its files land in the run directory. MLflow is optional too
(``pip install 'mmcore[mlflow]'``, ``logging.mlflow = { tracking_uri = "..." }``): see
:mod:`mmcore.engine.mlflow_logger`; a local folder works offline.
"""

from __future__ import annotations

from pathlib import Path


#: what needs wandb, in its missing-package line
WANDB_NEEDS = "logging.wandb = true (set WANDB_MODE=offline to log without an account)"


def require_logger_packages(recipe):
    """Import the packages of the recipe's optional loggers: a missing one is one line naming its extra
    (exit 1), said at the run's start, before any data is read."""
    from mmcore.kit.deps import require, require_extra

    if recipe.logging.wandb:
        require("wandb", WANDB_NEEDS)
    if recipe.logging.mlflow is not None:
        require_extra("mlflow", "logging.mlflow")


class Loggers:
    """Fan-out of scalar logging to the enabled backends."""

    def __init__(self, recipe, run_dir, recipe_dict):
        self.run_dir = Path(run_dir)
        self.tensorboard = None
        self.wandb = None
        self.mlflow = None
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if recipe.logging.wandb:
            from mmcore.kit.deps import require

            wandb = require("wandb", WANDB_NEEDS)
            self.wandb = wandb.init(
                project=recipe.logging.wandb_project,
                name=f"{recipe.experiment}/{Path(run_dir).name}",
                dir=str(run_dir),
                config=recipe_dict,
                reinit="finish_previous",
            )
            self.wandb.define_metric("global_step")
            self.wandb.define_metric("*", step_metric="global_step")
        if recipe.logging.mlflow is not None:
            from mmcore.engine.mlflow_logger import MlflowLogger

            self.mlflow = MlflowLogger.start(recipe.logging.mlflow, self.run_dir, recipe_dict, experiment=recipe.experiment)

    def add_scalar(self, tag, value, step):
        """``tag`` = ``value`` at global step ``step``."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value, "global_step": step})
        if self.mlflow is not None:
            self.mlflow.add_scalar(tag, value, step)

    def add_hparams(self, hparams, metrics):
        """The run's hparams (flat) with its final metrics (TensorBoard's hparams view; W&B's summary)."""
        if self.tensorboard is not None:
            self.tensorboard.add_hparams(hparams, metrics, run_name=".")
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def log_results(self, results):
        """The final test metrics with their intervals and the run directory's results, reports and plots
        (MLflow; TensorBoard and W&B get the final metrics through :meth:`add_hparams`)."""
        if self.mlflow is not None:
            self.mlflow.log_results(results, self.run_dir)

    def add_pr_curve(self, tag, labels, scores, step):
        """A precision-recall curve (TensorBoard only)."""
        if self.tensorboard is not None:
            self.tensorboard.add_pr_curve(tag, labels, scores, step)

    def flush(self):
        """Write what is buffered (at each epoch's end)."""
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if self.mlflow is not None:
            self.mlflow.flush()

    def close(self):
        """Flush and close every backend."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            self.mlflow.close()
