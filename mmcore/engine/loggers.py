"""Where scalars go: TensorBoard (default) and, optionally, Weights & Biases.

Both get the same calls (``add_scalar(tag, value, step)``), every scalar on the global
(optimizer) step as Lightning does, so per-step training curves and per-epoch validation
ones overlay; the epoch is a scalar of its own (``epoch``).
W&B is optional (``pip install 'mmcore[wandb]'``, ``logging.wandb = true``) and works with
``WANDB_MODE=offline``: its files land in the run directory.
"""

from __future__ import annotations

from pathlib import Path


class Loggers:
    """Fan-out of scalar logging to the enabled backends."""

    def __init__(self, recipe, run_dir, recipe_dict):
        self.tensorboard = None
        self.wandb = None
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if recipe.logging.wandb:
            from mmcore.kit.deps import require

            wandb = require("wandb", "logging.wandb = true (set WANDB_MODE=offline to log without an account)")
            self.wandb = wandb.init(
                project=recipe.logging.wandb_project,
                name=f"{recipe.experiment}/{Path(run_dir).name}",
                dir=str(run_dir),
                config=recipe_dict,
                reinit="finish_previous",
            )
            self.wandb.define_metric("global_step")
            self.wandb.define_metric("*", step_metric="global_step")

    def add_scalar(self, tag, value, step):
        """``tag`` = ``value`` at global step ``step``."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value, "global_step": step})

    def add_hparams(self, hparams, metrics):
        """The run's hparams (flat) with its final metrics (TensorBoard's hparams view; W&B's summary)."""
        if self.tensorboard is not None:
            self.tensorboard.add_hparams(hparams, metrics, run_name=".")
        if self.wandb is not None:
            self.wandb.summary.update(metrics)

    def add_pr_curve(self, tag, labels, scores, step):
        """A precision-recall curve (TensorBoard only)."""
        if self.tensorboard is not None:
            self.tensorboard.add_pr_curve(tag, labels, scores, step)

    def flush(self):
        """Write what is buffered (at each epoch's end)."""
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self):
        """Flush and close every backend."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
