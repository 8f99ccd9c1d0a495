"""``python -m lightning_optim.dashboard RUN_DIR -o OUT.html``."""

import sys

from .report import main

sys.exit(main())
