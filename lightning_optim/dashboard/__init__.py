"""The dashboard of a run: ``python -m lightning_optim.dashboard RUN_DIR -o OUT.html``.

Three modules, one job each: :mod:`~lightning_optim.dashboard.metrics` reads a run's logged
metrics (Lightning's ``metrics.csv``, or a W&B record file through
:mod:`~lightning_optim.dashboard.wandb_history`) and sorts the keys into families;
:mod:`~lightning_optim.dashboard.figures` draws them with matplotlib;
:mod:`~lightning_optim.dashboard.report` writes the self-contained HTML page with its PNG
figures and is the command line. Drawing needs matplotlib (the ``dashboard`` extra); reading
the series does not.
"""

from .metrics import PARAM_STATS, MetricsFileWarning, NoMetricsError, find_metrics, load_run
from .report import main, render

__all__ = ["PARAM_STATS", "MetricsFileWarning", "NoMetricsError", "find_metrics", "load_run", "render", "main"]
