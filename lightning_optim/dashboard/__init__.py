"""The dashboard of a run: ``python -m lightning_optim.dashboard RUN_DIR -o OUT.html``.

:mod:`~lightning_optim.dashboard.report` reads a run's logged metrics (Lightning's
``metrics.csv`` or a W&B record file, through :mod:`~lightning_optim.dashboard.wandb_history`)
and writes one self-contained HTML page with PNG figures. Needs matplotlib (the ``dashboard``
extra).
"""

from .report import PARAM_STATS, MetricsFileWarning, NoMetricsError, find_metrics, load_run, main, render

__all__ = ["PARAM_STATS", "MetricsFileWarning", "NoMetricsError", "find_metrics", "load_run", "render", "main"]
