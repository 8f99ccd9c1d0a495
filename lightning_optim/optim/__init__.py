"""The optimizers: one file per rule family; ``base`` holds what they share.

Importing this package imports every module in it, so a rule file dropped here registers its
class and registry names (:func:`lightning_optim.rules.register_optimizer`) without an edit
elsewhere. The named imports below come first, in the registry's order (the order of the
public names: ``sgd, momentum, nesterov, adagrad, rmsprop, adam, amsgrad, adamw, nadam,
radam, lion, yogi, coupled_adam``); any other rule file joins after them.
"""

import importlib
import pkgutil

from .base import Optimizer
from .sgd import SGD
from .adagrad import Adagrad
from .rmsprop import RMSprop
from .adam import Adam, AdamW
from .nadam import NAdam
from .radam import RAdam
from .lion import Lion
from .yogi import Yogi
from .coupled_adam import CoupledAdam

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Lion", "Yogi", "CoupledAdam", "Optimizer"]
