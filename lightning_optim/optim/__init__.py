"""The optimizers: one file per rule family; ``base`` holds what they share."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .base import Optimizer
from .coupled_adam import CoupledAdam
from .lion import Lion
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .sgd import SGD
from .yogi import Yogi

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "NAdam", "RAdam", "Lion", "Yogi", "CoupledAdam", "Optimizer"]
