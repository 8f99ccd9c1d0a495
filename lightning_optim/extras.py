"""Optional dependencies: which extra of ``pyproject.toml`` brings what, and the one error
raised when a feature's extra is missing.

``pip install lightning_optim`` brings the optimizers, the Lightning callbacks and the Hydra
config groups (torch, lightning, torchmetrics, hydra-core). The rest is opt-in:

=============  ==========================  ==============================================
extra          packages                    what needs it
=============  ==========================  ==============================================
triton         triton                      ``backend="triton"`` (fused GPU kernels)
wandb          wandb                       ``logger=wandb``
tensorboard    tensorboardX                ``logger=tensorboard``
dashboard      matplotlib                  ``python -m lightning_optim.dashboard``
app            tokenizers, matplotlib      ``python -m lightning_optim.train`` (the main job)
all            every extra above
=============  ==========================  ==============================================

A feature whose extra is missing raises :class:`MissingExtraError` before it starts, naming
the install to run::

    logger=wandb needs wandb: pip install "lightning_optim[wandb]"

It is a ``ModuleNotFoundError`` (an ``ImportError``), not a ``ValueError``: nothing in the
configuration is wrong, an install is missing, and code that already guards an optional
import with ``except ImportError`` keeps working. The main job's config check turns it into
its one-line config error (exit 2) before the run directory exists, like a bad value.

Standard library only: importing this module loads nothing optional.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["MissingExtraError", "available", "require", "import_extra", "require_logger", "LOGGER_EXTRAS"]

#: The modules a logger needs, any one of them (Lightning's TensorBoardLogger writes with
#: ``tensorboard`` or ``tensorboardX``), and the extra that installs them.
LOGGER_EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboardX", "tensorboard"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
}


class MissingExtraError(ModuleNotFoundError):
    """A feature needs a package of an extra that is not installed; ``.name`` is the package
    (as for any ``ModuleNotFoundError``), ``.extra`` the extra that installs it."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        super().__init__(f'{feature} needs {module}: pip install "lightning_optim[{extra}]"', name=module)
        self.extra = extra
        self.feature = feature


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a module set to None in
    ``sys.modules``, as blocked imports are, counts as missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def require(module: str | tuple[str, ...], *, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` (or one of several alternatives) is
    installed. Cheap: finds the module, does not import it, so a config check can call it."""
    names = (module,) if isinstance(module, str) else module
    if not any(available(name) for name in names):
        raise MissingExtraError(names[0], extra, feature)


def import_extra(module: str, *, extra: str, feature: str) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` naming the pip install to run."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name != module and not module.startswith(f"{err.name}."):
            raise  # the module is there but one of its own imports failed: that is another error
        raise MissingExtraError(module, extra, feature) from err


def require_logger(name: str) -> None:
    """The extra of the logger ``name`` (``"csv"`` needs none), checked before it is built."""
    if name in LOGGER_EXTRAS:
        modules, extra = LOGGER_EXTRAS[name]
        require(modules, extra=extra, feature=f"logger={name}")
