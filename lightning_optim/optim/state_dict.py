"""Loading, copying and pickling an optimizer: the state-dict half of :class:`.base.Optimizer`.

:class:`StateDictMixin` makes torch's loader strict about shapes and partitions, keeps fp32
state for low-precision params and this optimizer's own settings (``master_weights``, a
tensor ``lr``, where step counts live), and lets ``copy.deepcopy``/pickle carry everything
but the process-bound backend function, which a copy resolves again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import backends
from .tensors import SCALAR_KEYS, scalar, state_dtype


class StateDictMixin:
    """``load_state_dict``, ``__getstate__``/``__setstate__`` of :class:`.base.Optimizer`
    (which provides ``_validate``, ``_check_params``, ``_init_state``, ``_sync_master``,
    ``_param_name``, ``_warn_once``, ``_scalar_device`` and the backend helpers used here)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, made strict about shapes and kind to low-precision state.

        Round trip: after loading a state dict saved by this library (by an optimizer of the
        same class and options), :meth:`state_dict` equals it exactly: the same keys, the same
        values, tensors of the same dtype and values. A state dict saved by ``torch.optim``
        comes back with every key and value it had, plus what it lacks and this library adds:
        options torch has no counterpart for, filled from this optimizer's defaults (e.g.
        ``bias_correction``, ``master_weights``), ``param_names`` from this optimizer's groups
        when the dict has none, and ``step`` for torch.optim.SGD's buffers (torch keeps none).
        Numbers are validated to floats of the same value (torch keeps ``weight_decay=0`` as an
        int, it comes back as ``0.0``) and a list ``betas`` as a tuple.

        What this optimizer decides rather than the dict (so it can differ after a load from a
        dict saved with other settings): ``master_weights`` and the masters that follow it
        (see below); a tensor ``lr`` stays this optimizer's tensor, the saved value copied into
        it; state of bf16/fp16 params is fp32 (torch keeps it in the param's dtype; the values
        are the same); ``step``/``mu_product`` are on this backend's device.

        torch's loader puts ``differentiable=False`` into the defaults; it is taken out again
        (see :meth:`__setstate__`), so it does not reach the groups."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{self._owner}.load_state_dict: the state dict has {len(saved_groups)} param groups "
                f"({self._group_names(saved_groups)}), this optimizer has {len(self.param_groups)} "
                f"({self._group_names(self.param_groups)}): was it saved with another partition?"
            )
        for i, (mine, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError(
                    f"{self._owner}.load_state_dict: param group {i} ({mine.get('name', 'unnamed')!r}) has "
                    f"{len(mine['params'])} params here but {len(saved['params'])} in the state dict "
                    f"(saved group {saved.get('name', 'unnamed')!r}): was it saved with another partition?"
                )
        # Match saved ids to our params in order, as torch does, and check every tensor's shape.
        located = {}
        for mine, saved in zip(self.param_groups, saved_groups):
            for key in self.structural:
                if saved.get(key, self.defaults[key]) != mine[key]:
                    raise ValueError(
                        f"{self._owner}.load_state_dict: param group {mine.get('name', 'unnamed')!r} has "
                        f"{key}={mine[key]!r} here but {key}={saved.get(key, self.defaults[key])!r} in the "
                        "state dict: was it saved with another partition?"
                    )
            for j, (pid, p) in enumerate(zip(saved["params"], mine["params"])):
                located[pid] = (p, {**self.defaults, **saved}, mine, j)
        for pid, entry in state_dict["state"].items():
            if pid in located:
                self._check_loaded(entry, *located[pid])
        # master_weights is this optimizer's choice, as its backend is: torch lets saved options win.
        masters = [g.get("master_weights") for g in self.param_groups]
        # A tensor lr keeps its identity (a scheduler or a captured graph holds it): the saved
        # value is copied into it.
        lr_tensors = [g["lr"] if isinstance(g["lr"], Tensor) else None for g in self.param_groups]
        super().load_state_dict(state_dict)
        for pid, entry in state_dict["state"].items():
            if pid not in located:
                continue
            p = located[pid][0]
            state = self.state[p]
            for key, value in entry.items():
                if not isinstance(value, Tensor):
                    continue
                if key in SCALAR_KEYS:
                    state[key] = value.detach().to(device=self._scalar_device(p), dtype=torch.float32, copy=True)
                elif value.is_floating_point():
                    state[key] = value.detach().to(device=p.device, dtype=state_dtype(p), copy=True)
            if "step" not in state:
                # torch.optim.SGD keeps no step; a loaded buffer means the first step is behind us.
                state["step"] = scalar(1.0).to(self._scalar_device(p))
        for group, master, lr in zip(self.param_groups, masters, lr_tensors):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if master is not None:
                group["master_weights"] = master
            if lr is not None and group["lr"] is not lr:
                saved = group["lr"]
                if isinstance(saved, Tensor):
                    lr.copy_(saved)
                else:
                    lr.fill_(saved)
                group["lr"] = lr
            owner = f"{self._owner} group {group.get('name', 'unnamed')!r}"
            group.update(self._validate({k: v for k, v in group.items() if k not in ("params", "param_names")}, owner))
            self._check_params(group)
        self._sync_loaded_masters()

    def _check_loaded(self, entry: dict, p: Tensor, group: dict, mine: dict, j: int) -> None:
        if not entry:
            return
        expected = self._init_state(torch.empty_like(p, device="meta"), group)
        for key, shape in ((k, v.shape) for k, v in expected.items()):
            if key not in entry:
                raise ValueError(
                    f"{self._owner}.load_state_dict: {self._param_name(mine, j)} has no {key!r} in the "
                    f"state dict (it has {sorted(entry)}): was it saved by another optimizer?"
                )
            got = entry[key]
            if isinstance(got, Tensor) and got.shape != shape:
                raise ValueError(
                    f"{self._owner}.load_state_dict: {self._param_name(mine, j)} has {key} of shape "
                    f"{list(got.shape)} in the state dict, expected {list(shape)}: was it saved with "
                    "another model, partition or optimizer?"
                )
        got = entry.get("master_param")
        if isinstance(got, Tensor) and got.shape != p.shape:
            raise ValueError(
                f"{self._owner}.load_state_dict: {self._param_name(mine, j)} has master_param of shape "
                f"{list(got.shape)} in the state dict, expected {list(p.shape)}: was it saved with "
                "another model or partition?"
            )

    def _sync_loaded_masters(self) -> None:
        """After a load, the masters this optimizer's ``master_weights`` asks for: a missing one
        is made from the loaded param, an unwanted one dropped; each warned about once."""
        created, dropped = [], []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state:
                    continue  # no state yet: the first step makes it, master included
                had = "master_param" in state
                has = self._sync_master(p, state, group)
                if has != had:
                    (created if has else dropped).append(self._param_name(group, i))

        def few(names: list[str]) -> str:
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        if created:
            self._warn_once(
                "master_created",
                f"{self._owner}.load_state_dict: the state dict has no fp32 master weights for {few(created)} "
                "(bf16/fp16 in a group with master_weights=True): made them from the loaded parameters. "
                "Training goes on from the parameters' rounded values; the low bits a master would have "
                "kept before this checkpoint are not in it.",
            )
        if dropped:
            self._warn_once(
                "master_dropped",
                f"{self._owner}.load_state_dict: the state dict has fp32 master weights for {few(dropped)}, "
                "which this optimizer does not keep (master_weights=False here, or not a bf16/fp16 "
                "parameter): dropped them; the parameters keep their own values (the masters' rounding).",
            )

    @staticmethod
    def _group_names(groups: Any) -> str:
        return ", ".join(str(g.get("name", "unnamed")) for g in groups)

    # ----- copy.deepcopy and pickle ------------------------------------------------------------
    # Both go through __getstate__/__setstate__. Everything but these attributes travels:
    # ``_backend`` holds a function of this process's backend modules (re-bound from the
    # backend's name on the way in); torch's hook dicts (often closures) and profiler name are left
    # out as torch's own __getstate__ leaves them out. So is every other callable attribute:
    # those are wrappers bound to this instance, such as the ``step`` an LR scheduler or
    # OptimizerCallback puts on it, whose closure calls the original's step: a copy that kept
    # one would step the original, not itself (torch's copies lose them too).
    _NOT_PICKLED = frozenset({
        "_backend", "_zero_grad_profile_name",
        "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
    })

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or pickle holds: the params with their state and groups (a copy of a
        ``(model, optimizer)`` pair keeps the mapping between them), the resolved ``backend``
        by name, pending :meth:`scale_next_step` transforms and the warnings already given;
        see :meth:`__setstate__`. Hooks and methods wrapped on the instance (an LR scheduler's
        ``step``) are not copied, as in torch: the copy has the class's ``step``."""
        return {k: v for k, v in self.__dict__.items() if k not in self._NOT_PICKLED and not callable(v)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copied or unpickled optimizer so that it steps exactly as the original
        would, and (called by torch's ``load_state_dict`` with only ``state`` and
        ``param_groups``) take loaded state.

        A copy re-binds its backend from the backend's name, as the constructor resolves it:
        an explicit backend is checked to be available here (else ``ValueError``, as the
        constructor raises); one that ``backend="auto"`` chose and that must prove itself
        (triton's kernels) is trusted only after its self-check passes in this process (cached
        per process, so a deep copy costs nothing), else the copy falls back with the
        constructor's warning. An optimizer pickled before the backend was pickled resolves
        ``"auto"``."""
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        torch_adds_differentiable = "differentiable" not in defaults
        super().__setstate__(state)
        if torch_adds_differentiable:
            # torch's __setstate__ puts differentiable=False into the defaults for its own step
            # decorator, which ours do not use; from there load_state_dict and add_param_group
            # would copy it into every group, and a saved -> loaded -> saved dict would differ.
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_owner", type(self).__name__)
        self.__dict__.setdefault("_warned", set())
        self.__dict__.setdefault("_next_transforms", {})
        # (``_auto_triton``: the name this flag had in pickles of earlier versions.)
        self.__dict__.setdefault("_auto_chosen", self.__dict__.pop("_auto_triton", "backend" not in self.__dict__))
        if "_backend" not in self.__dict__:  # a copy or an unpickled optimizer, not a load
            self._restore_backend()

    def _restore_backend(self) -> None:
        """Resolve the backend of a copy on its params (see :meth:`__setstate__`) and bind its
        function; step counts go where that backend keeps them."""
        params = [p for g in self.param_groups for p in g["params"]]
        requested = "auto" if self._auto_chosen else self.__dict__.get("backend", "auto")
        reason = self.__dict__.get("backend_reason")
        self._resolve_backend(requested, params)
        if reason is not None and requested != "auto":  # auto's choice, kept: keep its reason too
            self.backend_reason = reason
        if not self._device_steps:
            for state in self.state.values():
                self._scalars_to(state, torch.device("cpu"))
        self._confirm_auto(self.param_groups)
