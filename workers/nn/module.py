"""Module: torch.nn.Module's bookkeeping (parameters, buffers, children, names, state_dict,
train/eval) with an explicit backward.

``forward(x)`` computes the output and caches what the gradient needs; ``backward(grad)``
returns the gradient with respect to the input and adds each parameter's gradient to its
``.grad`` (set if None, added if present: gradients accumulate across calls until
``zero_grad()``, as in torch). ``backward(grad, need_input_grad=False)`` skips the input's
gradient and returns None, as torch skips it for inputs that do not require a gradient.

Buffers (``register_buffer``) are arrays a module keeps that are not trained: BatchNorm's
running statistics. They are in ``state_dict()`` after each module's parameters, as torch
orders them, and never in ``parameters()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from shardstep.workers.nn.checks import float_dtype_or_none
from shardstep.workers.optim.parameter import Parameter, RowSparseGrad


def as_generator(rng, owner: str) -> np.random.Generator:
    """A numpy Generator from a Generator, an int seed, or None (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0):
        return np.random.default_rng(rng)
    raise TypeError(f"{owner}: rng must be a numpy Generator, a non-negative int seed or None; got {rng!r}")


def float_dtype(dtype, owner: str) -> np.dtype:
    resolved = float_dtype_or_none(dtype)
    if resolved is None:
        raise TypeError(f"{owner}: dtype must be float32 or float64; got {dtype!r}")
    return resolved


def accumulate_grad(param: Parameter, grad) -> None:
    """Add ``grad`` (dense ndarray or RowSparseGrad) to ``param.grad``, as torch's AccumulateGrad:
    sparse + sparse stays sparse (rows concatenated, repeats not summed), anything + dense is dense."""
    if not param.requires_grad:
        return
    current = param.grad
    if current is None:
        param.grad = grad
    elif isinstance(current, RowSparseGrad):
        if isinstance(grad, RowSparseGrad):
            param.grad = RowSparseGrad(np.concatenate([current.indices, grad.indices]),
                                       np.concatenate([current.values, grad.values]), param.shape)
        else:
            param.grad = current.to_dense() + grad
    else:
        if not current.flags.writeable:  # a gradient someone handed in read-only: add into a copy
            current = param.grad = current.copy()
        if isinstance(grad, RowSparseGrad):
            np.add.at(current, grad.indices, grad.values)
        else:
            current += grad


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class: assign Parameters and Modules as attributes and they are registered by name;
    ``register_buffer`` registers an array that is state but not a parameter."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent_buffers", set())
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    # -- registration ------------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"call Module.__init__() in {type(self).__name__}.__init__ before "
                                 f"assigning attribute {name!r}")
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._drop_buffer(name)
            self.__dict__.pop(name, None)
            if value.name is None:
                value.name = name
            self._parameters[name] = value      # replacing keeps the name's place in the order
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._drop_buffer(name)
            self.__dict__.pop(name, None)
            self._modules[name] = value
        elif name in self._parameters and value is not None:
            raise TypeError(f"cannot assign {type(value).__name__} to parameter {name!r} of "
                            f"{type(self).__name__}: a Parameter or None is expected")
        elif name in self._buffers:
            if value is not None and not isinstance(value, np.ndarray):
                raise TypeError(f"cannot assign {type(value).__name__} to buffer {name!r} of "
                                f"{type(self).__name__}: an ndarray or None is expected")
            self._buffers[name] = value         # as torch: the name keeps its place and persistence
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
            object.__setattr__(self, name, value)

    def _drop_buffer(self, name: str) -> None:
        self._buffers.pop(name, None)
        self._non_persistent_buffers.discard(name)

    def register_buffer(self, name: str, array: np.ndarray | None, persistent: bool = True) -> None:
        """Keep ``array`` (or None: a buffer slot left empty, not in ``state_dict``) as the
        module's state under ``name``: ``module.<name>`` reads it, assigning an ndarray or None
        replaces it. ``persistent=False`` leaves it out of ``state_dict``, as in torch."""
        owner = type(self).__name__
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{owner}.register_buffer: name must be a non-empty string without '.'; got {name!r}")
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"{owner}.register_buffer: buffer {name!r} must be an ndarray or None; "
                            f"got {type(array).__name__}")
        if not isinstance(persistent, bool):
            raise TypeError(f"{owner}.register_buffer: persistent must be a bool; got {persistent!r}")
        if name not in self._buffers and (name in self._parameters or name in self._modules
                                          or name in self.__dict__ or hasattr(type(self), name)):
            raise KeyError(f"{owner}.register_buffer: attribute {name!r} already exists")
        self._buffers[name] = array
        if persistent:
            self._non_persistent_buffers.discard(name)
        else:
            self._non_persistent_buffers.add(name)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: parameters and children live in the registries
        registries = self.__dict__
        if "_parameters" in registries and name in registries["_parameters"]:
            return registries["_parameters"][name]
        if "_buffers" in registries and name in registries["_buffers"]:
            return registries["_buffers"][name]
        if "_modules" in registries and name in registries["_modules"]:
            return registries["_modules"][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if name in self._parameters:
            del self._parameters[name]
        elif name in self._buffers:
            self._drop_buffer(name)
        elif name in self._modules:
            del self._modules[name]
        else:
            object.__delattr__(self, name)

    # -- traversal -----------------------------------------------------------------------------

    def children(self) -> list[Module]:
        return list(self._modules.values())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module (named ``prefix``) and every descendant, depth first, by dotted name."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def _named_members(self, registry: str, prefix: str, remove_duplicate: bool) -> Iterator[tuple[str, Any]]:
        """(dotted name, value) of every entry of each module's ``registry`` (``"_parameters"`` or
        ``"_buffers"``) that is not None, modules depth first; with ``remove_duplicate`` a value
        held by several modules comes once, under its first name."""
        seen: set[int] = set()
        for module_name, module in self.named_modules(prefix):
            for name, value in getattr(module, registry).items():
                if value is None:
                    continue
                if remove_duplicate:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                yield f"{module_name}.{name}" if module_name else name, value

    def named_parameters(self, prefix: str = "", remove_duplicate: bool = True) -> list[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs in registration order: ``"weight"`` in a Linear,
        ``"0.weight"`` for the first layer of a Sequential. A Parameter shared by two modules
        is listed once, under its first name (as torch)."""
        return list(self._named_members("_parameters", prefix, remove_duplicate))

    def parameters(self) -> list[Parameter]:
        return [param for _, param in self.named_parameters()]

    def named_buffers(self, prefix: str = "", remove_duplicate: bool = True) -> list[tuple[str, np.ndarray]]:
        """(dotted name, array) of every buffer that is not None, in registration order, modules
        depth first (``"1.running_mean"``); an array shared by two modules is listed once."""
        return list(self._named_members("_buffers", prefix, remove_duplicate))

    def buffers(self) -> list[np.ndarray]:
        return [array for _, array in self.named_buffers()]

    def _state_entries(self) -> list[tuple[str, Parameter | np.ndarray]]:
        """torch's state_dict order: for each module depth first, its parameters, then its
        persistent buffers; every name of a shared array, None left out."""
        entries: list[tuple[str, Parameter | np.ndarray]] = []
        for module_name, module in self.named_modules():
            dotted = f"{module_name}." if module_name else ""
            entries.extend((dotted + name, param) for name, param in module._parameters.items() if param is not None)
            entries.extend((dotted + name, array) for name, array in module._buffers.items()
                           if array is not None and name not in module._non_persistent_buffers)
        return entries

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """{dotted name: copy of the array}: each module's parameters, then its persistent
        buffers, modules depth first; torch's names and order, so
        ``{k: v.numpy() for k, v in torch_model.state_dict().items()}`` loads here and back."""
        return {name: (entry.data if isinstance(entry, Parameter) else entry).copy()
                for name, entry in self._state_entries()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into the parameters and buffers in place (optimizers holding them stay
        valid), casting to each one's dtype (an integer buffer, as BatchNorm's
        num_batches_tracked, takes integral values only). Every name and shape is checked
        before anything is copied; with ``strict``, missing and unexpected names are errors too."""
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}.load_state_dict expects a mapping of name -> array; "
                            f"got {type(state_dict).__name__}")
        entries = dict(self._state_entries())
        missing = [name for name in entries if name not in state_dict]
        unexpected = [name for name in state_dict if name not in entries]
        problems = []
        missing_params = [name for name in missing if isinstance(entries[name], Parameter)]
        missing_buffers = [name for name in missing if not isinstance(entries[name], Parameter)]
        if strict and missing_params:
            problems.append(f"missing parameters: {', '.join(missing_params)}")
        if strict and missing_buffers:
            problems.append(f"missing buffers: {', '.join(missing_buffers)}")
        if strict and unexpected:
            problems.append(f"unexpected parameters: {', '.join(map(str, unexpected))} "
                            f"(this model has: {', '.join(entries)})")
        arrays = {}
        for name, entry in entries.items():
            if name not in state_dict:
                continue
            kind = "parameter" if isinstance(entry, Parameter) else "buffer"
            value = np.asarray(state_dict[name])
            if value.dtype == np.bool_ or not (np.issubdtype(value.dtype, np.floating)
                                              or np.issubdtype(value.dtype, np.integer)):
                problems.append(f"{kind} {name!r} must be a real-valued array; got dtype {value.dtype}")
            elif value.shape != entry.shape:
                problems.append(f"size mismatch for {kind} {name!r}: the model has shape "
                                f"{entry.shape}, the state_dict has shape {value.shape}")
            elif (np.issubdtype(entry.dtype, np.integer) and np.issubdtype(value.dtype, np.floating)
                  and not np.all(value == np.round(value))):
                problems.append(f"{kind} {name!r} holds integers ({entry.dtype}); got non-integer values")
            else:
                arrays[name] = value
        if problems:
            raise ValueError(f"{owner}.load_state_dict: " + "; ".join(problems))
        for name, value in arrays.items():
            entry = entries[name]
            (entry.data if isinstance(entry, Parameter) else entry)[...] = value
        return IncompatibleKeys(missing, unexpected)

    # -- modes and gradients ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> Module:
        if not isinstance(mode, bool):
            raise TypeError(f"train(mode) expects a bool; got {mode!r}")
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (``set_to_none``, the default as in torch) or zero it
        in place (a row-sparse gradient becomes one with no rows)."""
        for param in self.parameters():
            grad = param.grad
            if set_to_none or grad is None:
                param.grad = None
            elif isinstance(grad, RowSparseGrad):
                param.grad = RowSparseGrad(np.zeros(0, np.int64),
                                           np.zeros((0, *param.shape[1:]), param.dtype), param.shape)
            else:
                grad[...] = 0

    # -- computation -------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        object.__setattr__(self, "_cache", None)  # a call that fails leaves nothing for backward
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, grad_output, need_input_grad: bool = True):
        """Accumulate parameter gradients; return d loss / d input (None if not
        ``need_input_grad``, which spares the work when the input is data)."""
        raise NotImplementedError(f"{type(self).__name__} does not define backward")

    def _cached(self):
        """What forward saved for backward, or a clear error when forward has not run."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return cache

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._modules.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"
