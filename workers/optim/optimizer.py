"""The torch.optim-style facade: param_groups, state, step(closure), state_dict.

An :class:`Optimizer` subclass names its :class:`~shardstep.workers.optim.rule.Rule`; the facade only
keeps the books (groups, per-parameter state, step count) and hands each parameter with a
gradient to the rule. The state_dict has torch's layout and key names::

    {"state": {index: {"step": ..., "exp_avg": ...}},
     "param_groups": [{"lr": ..., ..., "params": [index, ...]}]}

with ndarrays where torch has tensors, so state moves between torch and shardstep both ways.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from shardstep.workers.optim.parameter import Parameter, RowSparseGrad
from shardstep.workers.optim.rule import DEFAULT_DTYPES, Rule


def hyperparameters(constructor_locals: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters a torch-style constructor was called with, from the ``locals()`` it
    takes first thing: every argument but ``self`` and ``params`` (``__class__`` is the cell
    zero-argument ``super()`` adds). With ``Rule.stored_defaults`` this is the constructor's
    whole body: torch's defaults are spelt once in its signature, checked against the rule's
    by the optimizer tests."""
    return {key: value for key, value in constructor_locals.items() if key not in ("self", "params", "__class__")}


class Optimizer:
    """Base class with torch.optim.Optimizer's attributes and methods.

    ``defaults``: hyperparameters a group gets when it does not set them;
    ``state``: per-Parameter dict of named state; ``param_groups``: list of dicts with a
    ``params`` list; ``_step_count``: how many times :meth:`step` has run.
    """

    rule: ClassVar[Rule | None] = None

    def __init__(self, params: Iterable[Any], defaults: Mapping[str, Any]):
        self.defaults = dict(defaults)
        # betas from a job file arrive as a TOML array; the Adam family keeps the pair as
        # torch's defaults spell it, a tuple, so state_dicts compare equal whichever way it came
        if isinstance(self.defaults.get("betas"), list):
            self.defaults["betas"] = tuple(self.defaults["betas"])
        self.state: defaultdict[Parameter, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []
        self._step_count = 0
        if isinstance(params, (Parameter, np.ndarray)):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Parameters or "
                f"dicts, but got {type(params).__name__}"
            )
        if isinstance(params, (set, frozenset)):
            raise TypeError(_SET_MESSAGE)
        param_groups = list(params)
        if not param_groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for group in param_groups:
            self.add_param_group(group)

    # -- groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters with its own hyperparameters (the rest from defaults)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
        group = dict(param_group)
        params = group.get("params")
        if params is None:
            raise ValueError("param_group must have a 'params' entry")
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError(_SET_MESSAGE)
        else:
            params = list(params)
        if not params:
            raise ValueError("param_group 'params' is empty; give it at least one Parameter")

        names = None
        if all(isinstance(p, tuple) for p in params):
            if not all(len(p) == 2 and isinstance(p[0], str) for p in params):
                raise TypeError("named parameters must be (name: str, Parameter) pairs")
            names = [name for name, _ in params]
            params = [p for _, p in params]
        for index, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"optimizer can only optimize Parameters; params[{index}] is a "
                    f"{type(p).__name__}"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("param_group contains the same Parameter more than once")
        group["params"] = params
        if names is not None:
            if "param_names" in group and list(group["param_names"]) != names:
                raise ValueError("param_group has both named parameters and a different 'param_names'")
            group["param_names"] = names

        for key, value in self.defaults.items():
            group.setdefault(key, value)
        if self.param_groups:
            named_before = "param_names" in self.param_groups[0]
            if named_before != ("param_names" in group):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        if self.rule is not None:
            self.rule.validate(group)

        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    # -- gradients and steps --------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset every gradient: to None (default), or to zeros in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                elif isinstance(p.grad, RowSparseGrad):
                    p.grad = RowSparseGrad(
                        np.zeros(0, np.int64), np.zeros((0, *p.shape[1:]), p.dtype), p.shape
                    )
                else:
                    p.grad.fill(0)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (if given; it recomputes the loss and sets ``.grad``), then update
        every parameter that has a gradient. Returns the closure's loss."""
        loss = closure() if closure is not None else None
        owner = type(self).__name__
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    apply_rule(self.rule, owner, _label(p), p.data, p.grad, self.state[p], group,
                               rows=p.shape[0] if p.shape else 1)
        self._step_count += 1
        return loss

    # -- state_dict -----------------------------------------------------------------------

    def _index_map(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        return index

    def state_dict(self) -> dict[str, Any]:
        """torch's layout; arrays are references to the live state, as in torch."""
        index = self._index_map()
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {index[id(p)]: s for p, s in self.state.items() if s}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state_dict from :meth:`state_dict` or from torch (tensors as ndarrays).

        Arrays are copied; floating array state takes the dtype of its parameter, as torch
        casts it, and scalar state (step counters, NAdam's mu_product, ASGD's eta and mu) keeps
        the dtype it was saved with (torch casts all but the step counter: keeping them is what
        lets a resumed run round as the uninterrupted one did, under either default dtype).
        Nothing changes unless the whole dict is valid.
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "param_groups"}:
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"optimizer state_dict must have exactly the keys 'param_groups' and 'state'; got {keys}")
        saved_groups = copy.deepcopy(list(state_dict["param_groups"]))
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups: "
                f"{len(saved_groups)}, this optimizer has {len(self.param_groups)}"
            )
        id_map: dict[int, Parameter] = {}
        for number, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size of "
                    f"optimizer's group: group {number} has {len(saved['params'])} params in the "
                    f"state dict and {len(group['params'])} here"
                )
            for key, p in zip(saved["params"], group["params"]):
                id_map[key] = p

        new_state: defaultdict[Parameter, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for parameter index {key!r}, which no group lists")
            p = id_map[key]
            new_state[p] = self._load_param_state(p, key, value)

        new_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            saved["params"] = group["params"]
            if "param_names" not in saved and "param_names" in group:
                saved["param_names"] = group["param_names"]
            if self.rule is not None:
                self.rule.validate(saved)
            new_groups.append(saved)
        self.state = new_state
        self.param_groups = new_groups

    def _load_param_state(self, p: Parameter, index: Any, value: Mapping[str, Any]) -> dict[str, Any]:
        loaded = {}
        scalar_state = self.rule.scalar_state if self.rule is not None else ("step",)
        for name, item in value.items():
            keep = name in scalar_state
            if keep and isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating) \
                    and item.dtype.name not in DEFAULT_DTYPES:
                raise ValueError(f"state {name!r} of parameter {index} is {item.dtype.name}; scalar state "
                                 f"is {' or '.join(DEFAULT_DTYPES)}, as torch keeps it")
            loaded[name] = _cast_state(p, item, keep_dtype=keep)
            array = loaded[name]
            if isinstance(array, np.ndarray) and array.ndim > 0 and array.shape != p.shape:
                raise ValueError(
                    f"state {name!r} of parameter {index} has shape {array.shape}; "
                    f"the parameter has shape {p.shape}"
                )
        return loaded

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for number, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {number}")
            for key in sorted(group):
                if key not in ("params", "param_names"):
                    lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


_SET_MESSAGE = (
    "optimizer parameters need to be organized in ordered collections, but the ordering of "
    "parameters in sets will change between runs. Please use a list instead."
)


def apply_rule(rule: Rule, owner: str, label: str, data: np.ndarray, grad: Any, state: dict[str, Any],
               group: Mapping[str, Any], *, rows: int, scale: float | None = None) -> None:
    """One update of a parameter, or of a shard's slice of one: the one place the facade
    and the shard actors hand a gradient to a rule.

    data: the parameter (or slice), updated in place; grad: a dense array of its shape or a
    :class:`RowSparseGrad` over its ``rows`` rows; state: its state dict, filled by
    ``rule.init_state`` on the first update; scale: multiplies the gradient first (global-
    norm clipping), without writing into ``grad`` (it may be a worker's shared region).
    owner and label name the optimizer and the parameter in the errors."""
    if isinstance(grad, RowSparseGrad):
        if not rule.accepts_sparse:
            raise RuntimeError(f"{owner} does not support sparse gradients (parameter {label}); use SparseAdam, "
                               f"Adagrad or SGD for them")
        if not state:
            state.update(rule.init_state(data, group))
        grad = grad.coalesce()
        values = grad.values if scale is None else grad.values * grad.values.dtype.type(scale)
        row_size = data.size // rows if rows else 0
        rule.update_rows(data.reshape(rows, row_size), grad.indices, values.reshape(grad.indices.size, row_size),
                         state, group)
    else:
        if not rule.accepts_dense:
            raise RuntimeError(f"{owner} does not support dense gradients (parameter {label}), please consider "
                               f"Adam instead")
        if scale is not None:
            grad = grad * grad.dtype.type(scale)
        if not state:
            state.update(rule.init_state(data, group))
        rule.update(data, grad, state, group)


def _label(p: Parameter) -> str:
    return repr(p.name) if p.name else f"of shape {p.shape}"


def _cast_state(p: Parameter, value: Any, keep_dtype: bool = False) -> Any:
    """Copy one state value; floating arrays take the parameter's dtype unless ``keep_dtype``
    (torch's ``_process_value_according_to_param_policy``, which keeps only ``step``)."""
    if isinstance(value, np.ndarray):
        if not keep_dtype and np.issubdtype(value.dtype, np.floating):
            return np.array(value, dtype=p.dtype, copy=True, order="C")
        return np.array(value, copy=True, order="C")
    if isinstance(value, dict):
        return {k: _cast_state(p, v, keep_dtype=k == "step") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_state(p, v) for v in value)
    return value
