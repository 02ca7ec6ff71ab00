"""Parameters and gradients: numpy arrays with torch's ``.data`` / ``.grad`` contract."""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class RowSparseGrad:
    """A gradient that is non-zero only in some rows of a parameter (an embedding's gradient).

    ``indices`` (1-D int64, may repeat and be unordered, like an uncoalesced torch sparse
    tensor) names rows of a parameter of ``shape``; ``values[k]`` is the gradient of row
    ``indices[k]``. Repeated rows add up.
    """

    __slots__ = ("indices", "values", "shape")

    def __init__(self, indices, values, shape):
        indices = np.asarray(indices)
        values = np.ascontiguousarray(values)
        shape = tuple(int(s) for s in shape)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                f"RowSparseGrad indices must be a 1-D integer array; got dtype {indices.dtype} "
                f"with shape {indices.shape}"
            )
        if len(shape) < 1:
            raise ValueError(f"RowSparseGrad shape must have at least one dimension; got {shape}")
        if values.shape != (indices.shape[0], *shape[1:]):
            raise ValueError(
                f"RowSparseGrad values must have shape (len(indices), *shape[1:]) = "
                f"{(indices.shape[0], *shape[1:])}; got {values.shape}"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= shape[0]):
            raise ValueError(
                f"RowSparseGrad indices must lie in [0, {shape[0]}); got values from "
                f"{indices.min()} to {indices.max()}"
            )
        self.indices = indices.astype(np.int64, copy=False)
        self.values = values
        self.shape = shape

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    def coalesce(self) -> "RowSparseGrad":
        """Sorted, unique rows with repeated rows summed (torch's ``Tensor.coalesce``)."""
        rows, inverse = np.unique(self.indices, return_inverse=True)
        if rows.size == self.indices.size and np.all(self.indices[:-1] < self.indices[1:]):
            return self
        summed = np.zeros((rows.size, *self.shape[1:]), dtype=self.values.dtype)
        np.add.at(summed, inverse, self.values)
        return RowSparseGrad(rows, summed, self.shape)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros(self.shape, dtype=self.values.dtype)
        np.add.at(dense, self.indices, self.values)
        return dense

    def __repr__(self) -> str:
        return f"RowSparseGrad(rows={self.indices.size}, shape={self.shape}, dtype={self.dtype})"


class Parameter:
    """A trainable array: ``.data`` (C-contiguous float32/float64 ndarray) and ``.grad``.

    ``.grad`` is None, a dense ndarray of ``data``'s shape and dtype, or a
    :class:`RowSparseGrad`. Optimizers update ``.data`` in place, so views of it stay valid.
    Identity (not value) decides equality and hashing, as for torch tensors in an optimizer.
    """

    __slots__ = ("_data", "_grad", "name", "requires_grad", "__weakref__")

    def __init__(self, data, name: str | None = None, requires_grad: bool = True):
        self.name = name
        self.requires_grad = requires_grad
        self._grad = None
        self.data = data

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value) -> None:
        array = np.asarray(value)
        if array.dtype not in FLOAT_DTYPES:
            if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
                array = array.astype(np.float32)
            else:
                raise TypeError(
                    f"Parameter data must be float32 or float64; got dtype {array.dtype}"
                )
        self._data = np.ascontiguousarray(array)

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, value) -> None:
        if value is None or isinstance(value, RowSparseGrad):
            if value is not None and (value.shape != self.shape or value.dtype != self.dtype):
                raise ValueError(
                    f"sparse grad for parameter {self.name or ''!s} must have shape {self.shape} and "
                    f"dtype {self.dtype}; got shape {value.shape} and dtype {value.dtype}"
                )
            self._grad = value
            return
        grad = np.asarray(value)
        if grad.shape != self.shape:
            raise ValueError(
                f"grad for parameter {self.name or ''!s} must have shape {self.shape}; got {grad.shape}"
            )
        if grad.dtype != self.dtype:
            raise ValueError(
                f"grad for parameter {self.name or ''!s} must have dtype {self.dtype}; got {grad.dtype}"
            )
        self._grad = np.ascontiguousarray(grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._data.shape

    @property
    def dtype(self) -> np.dtype:
        return self._data.dtype

    @property
    def size(self) -> int:
        return self._data.size

    @property
    def is_sparse_grad(self) -> bool:
        return isinstance(self._grad, RowSparseGrad)

    def numel(self) -> int:
        return self._data.size

    def __repr__(self) -> str:
        label = f"{self.name!r}, " if self.name else ""
        return f"Parameter({label}shape={self.shape}, dtype={self.dtype})"
