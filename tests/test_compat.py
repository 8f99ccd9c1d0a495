"""The private Lightning/torch attributes we rely on, all in lightning_optim.compat.

Two kinds of checks:

- One per row of ``compat.ACCESSES``: the attribute is still where compat reaches for it, of
  the kind and with the parameters it calls, on the installed Lightning and torch. A failure
  names the compat function that breaks and the versions it was checked on, so an upgrade that
  moves a private attribute fails here, loudly, rather than somewhere inside a training run.
- A scan of the package's source: no private Lightning/torch attribute is touched outside
  compat.py, neither as ``obj._name`` / ``getattr(obj, "_name")`` nor by a class of ours that
  overrides or reads a private member of its Lightning/torch base class.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import textwrap
from pathlib import Path

import lightning
import pytest
import torch

import lightning_optim
from lightning_optim import compat

PACKAGE = Path(lightning_optim.__file__).parent
COMPAT = PACKAGE / "compat.py"
INSTALLED = f"installed: lightning {lightning.__version__}, torch {torch.__version__}"

# Private accesses allowed outside compat.py: (file relative to the package, attribute) -> why.
# Each still has a function in compat for its owner to switch to; the entries go when they do.
ALLOWED = {
}


def _resolve(owner: str):
    module, _, qualname = owner.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _instance(owner: str, tmp_path: Path):
    """A fresh instance of ``owner``'s class, built the way Lightning or torch builds it."""
    import lightning.pytorch as pl

    def trainer():
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)

    param = torch.nn.Parameter(torch.zeros(2))
    factories = {
        "lightning.pytorch.loops.fit_loop:_FitLoop": lambda: trainer().fit_loop,
        "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop": lambda: trainer().fit_loop.epoch_loop,
        "lightning.pytorch.callbacks.model_checkpoint:ModelCheckpoint":
            lambda: pl.callbacks.ModelCheckpoint(dirpath=tmp_path),
        "lightning.pytorch.loggers.csv_logs:CSVLogger": lambda: pl.loggers.CSVLogger(tmp_path),
        "lightning.pytorch.loggers.csv_logs:ExperimentWriter":
            lambda: pl.loggers.csv_logs.ExperimentWriter(log_dir=str(tmp_path)),
        "torch.amp.grad_scaler:GradScaler": lambda: torch.amp.GradScaler("cpu"),
        "torch.optim.lr_scheduler:LambdaLR":
            lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=0.1), lambda step: 1.0),
    }
    return factories[owner]()


# A DTensor needs a process group: made in a child process (one rank, gloo), so this one stays
# without torch.distributed initialized. Prints whether the attribute is the local shard's storage.
DTENSOR_CHECK = """
import os, sys, tempfile, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"), rank=0, world_size=1)
t = DTensor.from_local(torch.ones(4), init_device_mesh("cpu", (1,)), [Shard(0)])
local = getattr(t, sys.argv[1], None)
print(isinstance(local, torch.Tensor) and local.data_ptr() == t.to_local().data_ptr())
dist.destroy_process_group()
"""


@pytest.mark.parametrize("access", compat.ACCESSES, ids=lambda a: f"{a.function}-{a.attribute}")
def test_private_attribute_is_where_compat_expects_it(access, tmp_path):
    where = f"{access.owner}.{access.attribute}"
    if access.owner == "torch.distributed.tensor:DTensor":
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-c", DTENSOR_CHECK, access.attribute], capture_output=True, text=True)
        found = out.stdout.strip() == "True"
        detail = f"not the local shard's storage on a one-rank DTensor ({out.stdout.strip() or out.stderr[-300:]})"
    elif access.kind == "instance":
        found = hasattr(_instance(access.owner, tmp_path), access.attribute)
        detail = "no such attribute on a fresh instance"
    elif access.kind == "op":
        op = getattr(getattr(torch.ops.aten, access.attribute, None), "default", None)
        params = [a.name for a in op._schema.arguments] if op is not None else None
        found = params == list(access.params) and callable(getattr(torch, access.attribute, None))
        detail = f"its schema's arguments are now {params}, compat calls it with {list(access.params)}"
    elif access.kind == "source":
        found = access.attribute in inspect.getsource(_resolve(access.owner))
        detail = "the source no longer names it"
    else:
        owner = _resolve(access.owner)
        value = inspect.getattr_static(owner, access.attribute, None)
        if access.kind == "property":
            found, detail = isinstance(value, property), f"not a property (found {value!r})"
        elif value is None or not callable(getattr(owner, access.attribute)):
            found, detail = False, "gone, or not callable"
        else:
            params = _params(getattr(owner, access.attribute))
            if access.kind == "method":
                params = params[1:] if inspect.isfunction(value) else params  # drop self
            found = params == list(access.params)
            detail = f"its parameters are now {params}, compat calls it with {list(access.params)}"
    assert found, (
        f"{where} moved or changed ({detail}): lightning_optim.compat.{access.function} "
        f"relies on it; checked on {access.checked}; {INSTALLED}. Update that function (and its row "
        "in compat.ACCESSES) for this version."
    )


def test_every_compat_function_lists_what_it_touches():
    functions = {name for name in compat.__all__ if name not in ("ACCESSES", "Access")}
    listed = {a.function for a in compat.ACCESSES}
    assert functions - listed == set(), "compat functions without a row in ACCESSES"
    assert listed - functions == {"OptimizerCallback.log"}, "rows naming no compat function"


def test_callbacks_get_log_before_lightning_checks_configure_optimizers():
    """What OptimizerCallback's ``log`` setter relies on: in Trainer._run, Lightning assigns
    every callback's ``log`` before it checks that the module has a configure_optimizers, and
    that check comes before any callback hook (``setup``)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.connectors.callback_connector import _CallbackConnector

    run = inspect.getsource(Trainer._run)
    order = [run.find(s) for s in ("_attach_model_logging_functions()", "_verify_loop_configurations(self)",
                                   "_call_setup_hook(self)")]
    assert -1 not in order and order == sorted(order), (
        f"Trainer._run no longer attaches the callbacks' log, then checks configure_optimizers, then calls "
        f"setup (positions {order}): OptimizerCallback.log (the setter that installs configure_optimizers) "
        f"relies on that order; checked on {compat.LIGHTNING_CHECKED}; {INSTALLED}."
    )
    assert "callback.log = " in inspect.getsource(_CallbackConnector._attach_model_logging_functions)


# ----- the compat functions do what their names say -------------------------------------------


def test_torch_grouping_helpers():
    a, b, c = torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.ones(4)
    groups = compat.group_tensors_by_device_and_dtype([[a, b, c]], with_indices=True)
    cpu = torch.device("cpu")
    assert {k: v[1] for k, v in groups.items()} == {(cpu, torch.float32): [0, 2], (cpu, torch.float64): [1]}
    assert groups[(cpu, torch.float32)][0][0][1] is c
    assert compat.has_foreach_support([a, c], cpu) is True


def test_amp_scale_flag_and_scaler_stage():
    p = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.Adam([p], lr=0.1, fused=True)
    plain = torch.optim.SGD([p], lr=0.1)
    assert compat.takes_amp_scale(fused) is True and compat.takes_amp_scale(plain) is False
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * p).sum()).backward()
    assert compat.scaler_ready_to_unscale(scaler, plain) is True
    scaler.unscale_(plain)
    assert compat.scaler_ready_to_unscale(scaler, plain) is False
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_scheduler_last_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    compat.set_scheduler_last_lr(scheduler, [0.25])
    assert scheduler.get_last_lr() == [0.25]


def test_hooked_data_loader_wraps_the_index_sampler():
    class Halves(compat.hooked_data_loader()):
        def wrap_index_sampler(self, inner):
            return list(inner)[::2]

    loader = Halves(list(range(8)), batch_size=2)
    assert len(loader) == 2 and [b.tolist() for b in loader] == [[0, 1], [4, 5]]


def test_hooked_classes_are_built_once():
    assert compat.hooked_model_checkpoint() is compat.hooked_model_checkpoint()
    assert compat.hooked_experiment_writer() is compat.hooked_experiment_writer()


def test_import_of_compat_loads_no_lightning():
    import subprocess
    import sys

    code = ("import sys, lightning_optim.compat, lightning_optim.clipping; "
            "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----- no private access outside compat.py ----------------------------------------------------


def _sources() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text(), str(p))
            for p in sorted(PACKAGE.rglob("*.py")) if p != COMPAT}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Underscore names our own code defines: functions, classes, class and module attributes,
    attributes our classes set on ``self``, and the ``_lightning_optim_*`` markers we set on the
    functions we install. ``obj._name`` with one of these is ours."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                names.add(node.attr)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and node.attr.startswith("_lightning_optim_")):
                names.add(node.attr)
    return {n for n in names if _private(n)}


def _is_self(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id in ("self", "cls")) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super")


def _foreign_module(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in ("torch", "lightning", "pytorch_lightning", "lightning_fabric")


def _static_findings(trees: dict[str, ast.Module]) -> set[tuple[str, str, int]]:
    """``obj._name`` and ``getattr(obj, "_name")`` on objects other than self/cls/super() where
    no code of ours defines ``_name`` (``torch._foreach_*`` aside: see compat's docstring), and
    imports of private torch/Lightning names or modules."""
    # A name compat lists is foreign even where our code also defines it (our optimizers set
    # torch's _step_supports_amp_scaling flag, which we read from torch's optimizers too).
    ours = _own_names(trees) - {a.attribute for a in compat.ACCESSES}
    found = set()
    for path, tree in trees.items():
        for node in ast.walk(tree):
            attr = None
            if isinstance(node, ast.Attribute) and _private(node.attr) and not _is_self(node.value):
                if not (node.attr.startswith("_foreach_") and ast.unparse(node.value) == "torch"):
                    attr = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                  and _private(node.args[1].value)):
                attr = node.args[1].value
            elif isinstance(node, ast.ImportFrom) and _foreign_module(node.module):
                hidden = [a.name for a in node.names if _private(a.name)]
                hidden += [p for p in node.module.split(".") if _private(p)]
                if hidden:
                    found.add((path, hidden[0], node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if _foreign_module(alias.name) and any(_private(p) for p in alias.name.split(".")):
                        found.add((path, alias.name, node.lineno))
            if attr is not None and attr not in ours:
                found.add((path, attr, node.lineno))
    return found


def _self_assigned(cls: type) -> set[str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


@functools.cache
def _foreign_private(cls: type) -> frozenset[str]:
    """Private members a Lightning/torch class defines: class attributes and what it sets on self."""
    return frozenset(n for n in {*vars(cls), *_self_assigned(cls)} if _private(n))


def _modules() -> list:
    modules = []
    for info in pkgutil.walk_packages([str(PACKAGE)], "lightning_optim."):
        if info.name.rsplit(".", 1)[-1] == "__main__" or info.name.startswith("lightning_optim.conf"):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def _class_findings() -> set[tuple[str, str, int]]:
    """Classes of ours (compat's aside) with a Lightning/torch base: a body member or a
    ``self._x`` / ``super()._x`` use whose name is a private member of that base."""
    found = set()
    for module in _modules():
        if module.__name__ == compat.__name__:
            continue
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            foreign = set().union(*(_foreign_private(b) for b in cls.__mro__[1:]
                                    if b is not object and not b.__module__.startswith("lightning_optim")))
            foreign.discard("_abc_impl")  # ABCMeta's own cache, set on every ABC subclass
            if not foreign:
                continue
            path = str(Path(inspect.getsourcefile(cls)).relative_to(PACKAGE))
            _, first = inspect.getsourcelines(cls)
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            for node in ast.walk(tree):
                name = None
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node in tree.body[0].body:
                    name = node.name
                elif isinstance(node, ast.Attribute) and _is_self(node.value):
                    name = node.attr
                if name in foreign:
                    found.add((path, name, first + node.lineno - 1))
    return found


def test_private_attributes_are_touched_only_in_compat():
    findings = _static_findings(_sources()) | _class_findings()
    unexplained = sorted(f for f in findings if (f[0], f[1]) not in ALLOWED)
    assert unexplained == [], (
        "private Lightning/torch attributes touched outside lightning_optim/compat.py "
        "(file, attribute, line): put each behind a small function there, with the versions it was "
        f"checked on and a row in compat.ACCESSES: {unexplained}"
    )


@pytest.mark.parametrize("source, expected", [
    ("def f(loop):\n    loop._should_accumulate()\n", {("m.py", "_should_accumulate", 2)}),
    ("def f(o):\n    return getattr(o, '_per_optimizer_states', None)\n", {("m.py", "_per_optimizer_states", 2)}),
    ("from torch.utils._foreach_utils import _has_foreach_support\n", {("m.py", "_has_foreach_support", 1)}),
    ("import torch\ntorch._foreach_mul_([], 2.0)\n", set()),
    ("class A:\n    def f(self):\n        self._x = 1\n\ndef g(a):\n    return a._x\n", set()),
])
def test_the_scan_sees_what_it_should(source, expected):
    """The scan itself: a private read on a foreign object, by getattr, by import, is found;
    torch's foreach ops and our own underscore attributes are not."""
    assert _static_findings({"m.py": ast.parse(source)}) == expected
