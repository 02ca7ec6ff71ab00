"""The scalar logic of torch.optim.LBFGS's step: :class:`LBFGSDriver` (the step loop, the
termination tests, the strong-Wolfe line search, the recursion on coefficients, the history's
Gram matrix) and the state in torch's layout (:data:`STATE_KEYS`, :func:`check_state`).

Kept apart from the vectors and the facade: the driver never touches a vector, so the same
code runs over a :class:`~shardstep.workers.optim.algorithms.lbfgs.vectors.VectorSpace` in
this process and in the coordinator of a sharded run.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.workers.optim.algorithms.lbfgs.hyperparameters import LINE_SEARCH_FNS
from shardstep.workers.optim.algorithms.lbfgs.kernels import combine_max, combine_sum, two_loop_coefficients
from shardstep.workers.optim.algorithms.lbfgs.vectors import VectorSpace

STATE_KEYS = ("func_evals", "n_iter", "al", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
              "prev_flat_grad", "prev_loss")


def _unchanged(value, *_):
    return value


def _as_array(value):
    """A dtype scalar (torch: a 0-d tensor) as a 0-d ndarray; Python numbers unchanged."""
    return np.array(value) if isinstance(value, np.generic) else value


def _as_scalar(value):
    """A 0-d ndarray (torch: a 0-d tensor) as a numpy scalar of its dtype."""
    return value[()] if isinstance(value, np.ndarray) else value


def _as_plain(value):
    """A dtype scalar as a Python float: the record holds plain values only."""
    return None if value is None else (float(value) if isinstance(value, (np.generic, float)) else value)


def _as_dtype(value, dt):
    return None if value is None else dt(value)


def _as_dtype_unless_int(value, dt):
    # torch's initial H_diag is the integer 1, kept as such until the first pair
    return value if isinstance(value, int) else _as_dtype(value, dt)


def _check_int(name, value):
    if not isinstance(value, numbers.Integral):
        raise ValueError(f"LBFGS state {name!r} must be an int; got {value!r}")


def _check_number(name, value):
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise ValueError(f"LBFGS state {name!r} must be a scalar; got shape {value.shape}")
    elif not isinstance(value, numbers.Real):
        raise ValueError(f"LBFGS state {name!r} must be a number; got {value!r}")


@dataclass(frozen=True)
class ScalarKind:
    """How one kind of scalar is written to each form and read back: torch's layout
    (``to_torch``, ``from_torch``, and ``check``, which refuses a value of that layout) and
    the record (``to_record``, ``from_record(value, dtype type)``)."""

    to_torch: Callable[[Any], Any]
    from_torch: Callable[[Any], Any]
    to_record: Callable[[Any], Any]
    from_record: Callable[[Any, Any], Any]
    check: Callable[[str, Any], None]


COUNT = ScalarKind(_unchanged, int, _unchanged, _unchanged, _check_int)
# the same Python value in every form (the loss, a flag)
PYTHON_NUMBER = ScalarKind(_unchanged, _unchanged, _unchanged, _unchanged, _check_number)
# torch holds a 0-d tensor of the parameters' dtype, or a Python number where it computed one
DTYPE_NUMBER = ScalarKind(_as_array, _as_scalar, _as_plain, _as_dtype, _check_number)
H_DIAG = ScalarKind(_as_array, _as_scalar, _as_plain, _as_dtype_unless_int, _check_number)

# when torch's layout holds a field
ALWAYS, ONCE_NOT_NONE, ONCE_STARTED = "always", "once not None", "once a step has iterated"


@dataclass(frozen=True)
class ScalarField:
    """One scalar of :class:`LBFGSDriver`'s state: its attribute, its keys in the record and
    in torch's layout (None: the record's only, as torch's layout implies it), its kind, its
    value in a new driver and when torch's layout holds it. A list field holds a list of
    values of its kind, or None in place of the list."""

    attr: str
    record_key: str
    torch_key: str | None
    kind: ScalarKind
    initial: Any
    in_torch: str = ALWAYS
    is_list: bool = False
    entries_may_be_none: bool = False

    def held_by_torch(self, value: Any, started: bool) -> bool:
        """Whether torch's layout holds the field at ``value``, in a driver that has
        (``started``) or has not iterated."""
        if self.torch_key is None:
            return False
        if self.in_torch == ONCE_STARTED:
            return started
        return value is not None or self.in_torch == ALWAYS

    def fresh(self) -> Any:
        return list(self.initial) if isinstance(self.initial, list) else self.initial

    def encode(self, value: Any, write: Callable[..., Any], *args: Any) -> Any:
        if not self.is_list:
            return write(value, *args)
        return None if value is None else [write(v, *args) for v in value]


# in the record's order (torch's is STATE_KEYS'); a new scalar is declared here only
STATE_FIELDS = (
    ScalarField("func_evals", "func_evals", "func_evals", COUNT, 0),
    ScalarField("n_iter", "n_iter", "n_iter", COUNT, 0),
    # torch writes d, t, history, ... once a step has iterated, so its layout says it by 'd'
    ScalarField("started", "started", None, PYTHON_NUMBER, False),
    ScalarField("t", "t", "t", DTYPE_NUMBER, None, in_torch=ONCE_STARTED),
    ScalarField("ro", "ro", "ro", DTYPE_NUMBER, [], in_torch=ONCE_STARTED, is_list=True),
    ScalarField("h_diag", "h_diag", "H_diag", H_DIAG, 1, in_torch=ONCE_STARTED),
    ScalarField("prev_loss", "prev_loss", "prev_loss", PYTHON_NUMBER, None, in_torch=ONCE_STARTED),
    # torch creates al as [None] * history_size on the second iteration
    ScalarField("al", "al", "al", DTYPE_NUMBER, None, in_torch=ONCE_NOT_NONE, is_list=True,
                entries_may_be_none=True),
)


def _to_scalar(value):
    if isinstance(value, np.ndarray):
        return value.item()
    return value


def _sqrt(x):
    return np.sqrt(x) if isinstance(x, np.generic) else math.sqrt(x)


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimizer of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to ``bounds``
    (torch's port of minFunc's polyinterp; the midpoint when the cubic has no minimum)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    # x1 == x2 (possible once tolerance_change is 0) gives inf/NaN here, as torch's tensor
    # arithmetic does silently; the NaN comparisons below then take the midpoint
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = _sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


class LBFGSDriver:
    """torch.optim.LBFGS's step on a :class:`VectorSpace`: counters, scalars and the Gram
    matrix of the history live here, every vector in the space.

    Persistent scalars mirror torch's state, one attribute per field of :data:`STATE_FIELDS`
    (``func_evals``, ``n_iter``, ``started``, ``t``, ``ro``, ``h_diag``, ``prev_loss``, ``al``),
    which both :meth:`export_state` (torch's layout) and :meth:`scalar_state` (the sharded
    checkpoint's record) write. ``hist_gram`` is the (2m, 2m) float64 Gram matrix of
    ``[s_0..s_{m-1}, y_0..y_{m-1}]``; it is not part of the state_dict and is rebuilt from the
    history vectors on load (one batched reduction).
    """

    def __init__(self, space: VectorSpace):
        self.space = space
        self.dt = space.dtype.type
        self._set_scalars({field.attr: field.fresh() for field in STATE_FIELDS})
        self.hist_gram = np.zeros((0, 0))

    # -- reductions -----------------------------------------------------------------------
    def _abs_max(self, name):
        return self.dt(combine_max(self.space.partial_abs_max(name)))

    def _abs_sum(self, name):
        return self.dt(combine_sum(self.space.partial_abs_sum(name)))

    def _dot(self, a, b):
        return self.dt(combine_sum(self.space.partial_gram([a], [b]))[0, 0])

    def history_names(self, m: int) -> list:
        return [("s", i) for i in range(m)] + [("y", i) for i in range(m)]

    # -- the direction --------------------------------------------------------------------
    def _update_memory_and_gram(self, history_size: int) -> np.ndarray:
        """Form the new pair, take the ONE batched reduction, update the history and its Gram
        matrix, and return the full Gram matrix over [s.., y.., g]."""
        space, m = self.space, self.space.history_len()
        space.sub("y", "g", "prev_g")
        space.scale("s", "d", self.t)
        hist = self.history_names(m)
        # rows s, y, g against columns s_0..s_{m-1}, y_0..y_{m-1}, s, y, g
        batch = combine_sum(space.partial_gram(["s", "y", "g"], [*hist, "s", "y", "g"]))
        ns, ny, ng = 2 * m, 2 * m + 1, 2 * m + 2
        ys = self.dt(batch[0, ny])
        if ys > 1e-10:
            keep = list(range(m))
            while len(keep) >= history_size:
                keep.pop(0)
                space.pop_history()
                self.ro.pop(0)
            space.push_history("s", "y")
            self.ro.append(1.0 / ys)
            self.h_diag = ys / self.dt(batch[1, ny])
            k = len(keep)
            m2 = k + 1
            old = np.array(keep + [m + i for i in keep], dtype=np.int64)  # kept, old positions
            new_pos = np.concatenate([np.arange(k), m2 + np.arange(k)])   # their new positions
            hg = np.empty((2 * m2, 2 * m2))
            hg[np.ix_(new_pos, new_pos)] = self.hist_gram[np.ix_(old, old)]
            for r, pos in ((0, k), (1, m2 + k)):  # the new s (row 0) and y (row 1)
                hg[pos, new_pos] = batch[r, old]
                hg[new_pos, pos] = batch[r, old]
                hg[pos, k] = batch[r, ns]
                hg[pos, m2 + k] = batch[r, ny]
            self.hist_gram = hg
            g_row = np.empty(2 * m2)
            g_row[new_pos] = batch[2, old]
            g_row[k], g_row[m2 + k] = batch[2, ns], batch[2, ny]
        else:
            # the pair is not kept (its vectors are overwritten by the next iteration's)
            g_row = batch[2, :2 * m].copy()
        m = space.history_len()
        gram = np.empty((2 * m + 1, 2 * m + 1))
        gram[:2 * m, :2 * m] = self.hist_gram
        gram[2 * m, :2 * m] = g_row
        gram[:2 * m, 2 * m] = g_row
        gram[2 * m, 2 * m] = batch[2, ng]
        return gram

    def _direction(self, history_size: int):
        """d = -H g into the space; returns g.d (dtype scalar)."""
        space = self.space
        if self.n_iter == 1:
            space.clear_history()
            self.ro = []
            self.h_diag = 1
            self.hist_gram = np.zeros((0, 0))
            gram = combine_sum(space.partial_gram(["g"], ["g"]))
            c, _, gtd = two_loop_coefficients(gram, [], 1.0)
            space.combine("d", ["g"], c)
            return self.dt(gtd)
        gram = self._update_memory_and_gram(history_size)
        m = space.history_len()
        c, al, gtd = two_loop_coefficients(gram, self.ro, float(self.h_diag))
        if self.al is None:
            self.al = [None] * history_size
        while len(self.al) < m:
            self.al.append(None)
        for i in range(m):
            self.al[i] = self.dt(al[i])
        space.combine("d", [*self.history_names(m), "g"], c)
        return self.dt(gtd)

    # -- evaluation -----------------------------------------------------------------------
    def _directional_evaluate(self, closure, t, keep):
        """f and g at x0 + t d (parameters restored to x0 afterwards); returns
        (loss, name of the gradient, g.d)."""
        space = self.space
        space.release_temps(keep)
        space.set_params_from("x0", t, "d")
        loss = float(closure())
        name = space.new_temp()
        space.gather_grad(name)
        space.write_params("x0")
        return loss, name, self._dot(name, "d")

    def _strong_wolfe(self, closure, t, f, gtd, tolerance_change, max_ls, c1=1e-4, c2=0.9):
        """torch's _strong_wolfe (minFunc's lswolfe) with gradients held by name; returns
        (f, name of the gradient, t, evaluations)."""
        d_norm = self._abs_max("d")
        g = "g"
        f_new, g_new, gtd_new = self._directional_evaluate(closure, t, ())
        ls_func_evals = 1
        t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
        done = False
        ls_iter = 0
        while ls_iter < max_ls:
            if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
                bracket, bracket_f = [t_prev, t], [f_prev, f_new]
                bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
                break
            if abs(gtd_new) <= -c2 * gtd:
                bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
                done = True
                break
            if gtd_new >= 0:
                bracket, bracket_f = [t_prev, t], [f_prev, f_new]
                bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
                break
            # extrapolate
            min_step = t + 0.01 * (t - t_prev)
            max_step = t * 10
            tmp = t
            t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                   bounds=(min_step, max_step))
            t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
            f_new, g_new, gtd_new = self._directional_evaluate(closure, t, (g_prev,))
            ls_func_evals += 1
            ls_iter += 1

        if ls_iter == max_ls:
            bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

        # zoom: refine the bracket until a point satisfies the strong Wolfe conditions
        insuf_progress = False
        low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
        while not done and ls_iter < max_ls:
            if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
                break
            t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                                   bracket[1], bracket_f[1], bracket_gtd[1])
            # too close to an end of the bracket: move 0.1 of its length inside
            eps = 0.1 * (max(bracket) - min(bracket))
            if min(max(bracket) - t, t - min(bracket)) < eps:
                if insuf_progress or t >= max(bracket) or t <= min(bracket):
                    if abs(t - max(bracket)) < abs(t - min(bracket)):
                        t = max(bracket) - eps
                    else:
                        t = min(bracket) + eps
                    insuf_progress = False
                else:
                    insuf_progress = True
            else:
                insuf_progress = False

            f_new, g_new, gtd_new = self._directional_evaluate(closure, t, tuple(bracket_g))
            ls_func_evals += 1
            ls_iter += 1

            if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
                # Armijo fails or no lower than the low end: the new point is the high end
                bracket[high_pos], bracket_f[high_pos] = t, f_new
                bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
                low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
            else:
                if abs(gtd_new) <= -c2 * gtd:
                    done = True
                elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                    # the old high end becomes the low end
                    bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                    bracket_g[high_pos] = bracket_g[low_pos]
                    bracket_gtd[high_pos] = bracket_gtd[low_pos]
                bracket[low_pos], bracket_f[low_pos] = t, f_new
                bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

        return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals

    # -- the step -------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any], group) -> Any:
        """One torch.optim.LBFGS.step(closure); returns the closure's first loss."""
        space = self.space
        lr = _to_scalar(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]
        if line_search_fn not in LINE_SEARCH_FNS:
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe'; got {line_search_fn!r}")

        orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        self.func_evals += 1
        space.gather_grad("g")
        opt_cond = self._abs_max("g") <= tolerance_grad
        if opt_cond:
            return orig_loss

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            self.n_iter += 1
            self.started = True

            gtd = self._direction(history_size)
            space.copy("prev_g", "g")
            self.prev_loss = loss

            if self.n_iter == 1:
                self.t = min(1.0, 1.0 / self._abs_sum("g")) * lr
            else:
                self.t = lr

            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                space.snapshot_params("x0")
                loss, g_name, self.t, ls_func_evals = self._strong_wolfe(
                    closure, self.t, loss, gtd, tolerance_change, max_eval - current_evals)
                space.move("g", g_name)
                space.release_temps()
                space.add_to_params(self.t, "d")
                opt_cond = self._abs_max("g") <= tolerance_grad
            else:
                space.add_to_params(self.t, "d")
                if n_iter != max_iter:
                    loss = float(closure())
                    space.gather_grad("g")
                    opt_cond = self._abs_max("g") <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            self.func_evals += ls_func_evals

            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            # lack of progress: max |t d| (= max|d| |t|, rounding is monotonic)
            if self._abs_max("d") * abs(self.dt(self.t)) <= tolerance_change:
                break
            if abs(loss - self.prev_loss) < tolerance_change:
                break
        return orig_loss

    # -- state in torch's layout ----------------------------------------------------------
    def _set_scalars(self, values: Mapping[str, Any]) -> None:
        for attr, value in values.items():
            setattr(self, attr, value)

    def export_state(self) -> dict:
        """torch's state for parameter 0: tensors as ndarrays, numbers as numbers."""
        state: dict[str, Any] = {}
        for field in STATE_FIELDS:
            value = getattr(self, field.attr)
            if field.held_by_torch(value, self.started):
                state[field.torch_key] = field.encode(value, field.kind.to_torch)
        if self.started:
            space, m = self.space, self.space.history_len()
            state["d"] = space.export("d")
            state["old_dirs"] = [space.export(("y", i)) for i in range(m)]
            state["old_stps"] = [space.export(("s", i)) for i in range(m)]
            state["prev_flat_grad"] = space.export("prev_g")
        return {key: state[key] for key in STATE_KEYS if key in state}

    def import_state(self, state) -> None:
        """Load a state from :meth:`export_state` or torch (checked by :func:`check_state`)."""
        space = self.space
        started = state.get("d") is not None
        values: dict[str, Any] = {"started": started}
        for field in STATE_FIELDS:
            if field.torch_key is None:
                continue
            if field.in_torch != ONCE_STARTED:
                values[field.attr] = field.encode(state.get(field.torch_key, field.initial), field.kind.from_torch)
            elif started:
                values[field.attr] = field.encode(state[field.torch_key], field.kind.from_torch)
            else:
                values[field.attr] = field.fresh()
        self._set_scalars(values)
        space.clear_history()
        space.release_temps()
        self.hist_gram = np.zeros((0, 0))
        if not started:
            return
        space.load("d", state["d"])
        space.load("prev_g", state["prev_flat_grad"])
        for s, y in zip(state["old_stps"], state["old_dirs"]):
            space.load("s", s)
            space.load("y", y)
            space.push_history("s", "y")
        self.rebuild_gram()

    def rebuild_gram(self) -> None:
        """The history's Gram matrix from the history vectors in the space: one batched
        reduction (the matrix is never saved)."""
        hist = self.history_names(self.space.history_len())
        self.hist_gram = combine_sum(self.space.partial_gram(hist, hist)) if hist else np.zeros((0, 0))

    def scalar_state(self) -> dict[str, Any]:
        """Every scalar of the driver as plain values (the sharded checkpoint keeps them in
        its coordinator record; the vectors are in the shards' files), with the history's
        length, which a space whose vectors live elsewhere needs back on load."""
        record = {field.record_key: field.encode(getattr(self, field.attr), field.kind.to_record)
                  for field in STATE_FIELDS}
        record["history"] = self.space.history_len()
        return record

    def load_scalar_state(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`scalar_state`'s values, cast back to the space's dtype (the space must
        already hold the vectors and ``state["history"]`` history pairs)."""
        self._set_scalars({field.attr: field.encode(state[field.record_key], field.kind.from_record, self.dt)
                           for field in STATE_FIELDS})


def torch_scalars(record: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """The scalars of torch's layout, keys and types as :meth:`LBFGSDriver.export_state`
    writes them, from a record of :meth:`LBFGSDriver.scalar_state` (a sharded checkpoint's
    export has the record and the vectors, but no driver)."""
    dt = np.dtype(dtype).type
    values = {field.attr: field.encode(record[field.record_key], field.kind.from_record, dt) for field in STATE_FIELDS}
    return {field.torch_key: field.encode(values[field.attr], field.kind.to_torch) for field in STATE_FIELDS
            if field.held_by_torch(values[field.attr], values["started"])}


def _check_field(field: ScalarField, value: Any) -> None:
    if not field.is_list:
        field.kind.check(field.torch_key, value)
    elif value is not None:
        for i, entry in enumerate(value):
            if entry is not None or not field.entries_may_be_none:
                field.kind.check(f"{field.torch_key}[{i}]", entry)


def check_state(state, numel: int) -> None:
    """Refuse an LBFGS state that is not torch's layout (see :meth:`LBFGSDriver.export_state`)."""
    unknown = set(state) - set(STATE_KEYS)
    if unknown:
        raise ValueError(f"LBFGS state has unknown keys {sorted(unknown)}; allowed: {list(STATE_KEYS)}")
    torch_fields = [field for field in STATE_FIELDS if field.torch_key is not None]
    for field in torch_fields:
        if field.in_torch != ONCE_STARTED and field.torch_key in state:
            _check_field(field, state[field.torch_key])

    def vector(name, value):
        if not isinstance(value, np.ndarray) or value.shape != (numel,):
            shape = getattr(value, "shape", type(value).__name__)
            raise ValueError(f"LBFGS state {name!r} must be a flat array of shape ({numel},); got {shape}")

    if state.get("d") is None:
        if state.get("n_iter", 0):
            raise ValueError("LBFGS state has n_iter > 0 but no direction 'd'")
        return
    missing = [k for k in STATE_KEYS[3:] if state.get(k) is None]
    if missing:
        raise ValueError(f"LBFGS state with a direction 'd' also needs {missing}")
    vector("d", state["d"])
    vector("prev_flat_grad", state["prev_flat_grad"])
    lengths = {k: len(state[k]) for k in ("old_dirs", "old_stps", "ro")}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"LBFGS state old_dirs, old_stps and ro must have one length; got {lengths}")
    for key in ("old_dirs", "old_stps"):
        for i, v in enumerate(state[key]):
            vector(f"{key}[{i}]", v)
    # the history's scalars (one per pair, as its vectors just checked) before the single ones
    started_fields = [field for field in torch_fields if field.in_torch == ONCE_STARTED]
    for field in sorted(started_fields, key=lambda field: not field.is_list):
        _check_field(field, state[field.torch_key])
