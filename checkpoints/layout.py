"""How N shards split the parameters: each shard owns one contiguous range of whole rows of
every parameter, balanced to within one row.

A parameter of shape ``(R, ...)`` has ``R`` rows of ``row_size = prod(shape[1:])`` elements (a
1-D parameter has rows of one element, a 0-d one a single row of one element). With ``N``
shards, shard ``s`` owns rows ``[s * R // N, (s + 1) * R // N)``, i.e. the flat (C-order)
elements ``[s * R // N * row_size, (s + 1) * R // N * row_size)``. The ranges tile the
parameter in shard order, row counts differ by at most one, and the split depends only on
``(shape, N)``, so the shard actors, the checkpoint writer and every reader compute the same
layout from the parameter table alone. Whole rows keep a row-sparse gradient (an embedding
table's) deliverable to the shards by owned rows. A parameter with fewer rows than shards
leaves some shards an empty range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shardstep.checkpoints.format import ALLOWED_DTYPES, DTYPES


def partition(rows: int, num_shards: int) -> list[int]:
    """The N + 1 boundaries of the shards' row ranges: shard s owns rows
    ``[bounds[s], bounds[s + 1])`` with ``bounds[s] = s * rows // N``."""
    if type(rows) is not int or rows < 0:
        raise ValueError(f"rows must be a non-negative int; got {rows!r}")
    if type(num_shards) is not int or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1; got {num_shards!r}")
    return [s * rows // num_shards for s in range(num_shards + 1)]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the table: a unique name, its full shape and its dtype name
    (one of the format's dtypes, e.g. ``"float32"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if type(self.name) is not str or not self.name:
            raise ValueError(f"parameter name must be a non-empty str; got {self.name!r}")
        shape = self.shape
        if not isinstance(shape, (tuple, list)) or any(type(d) is not int or d < 0 for d in shape):
            raise ValueError(f"parameter {self.name!r}: shape must be a tuple of non-negative ints; got {shape!r}")
        object.__setattr__(self, "shape", tuple(shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"parameter {self.name!r}: dtype {self.dtype!r} is not allowed; allowed: {ALLOWED_DTYPES}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """The leading dimension (1 for a 0-d parameter): the unit shards split by."""
        return self.shape[0] if self.shape else 1

    @property
    def row_size(self) -> int:
        """Elements per row: ``prod(shape[1:])``."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True)
class ShardLayout:
    """The parameter table and the shard count; ``slice(name, shard)`` is that shard's
    ``(start, stop)`` of the flattened parameter, ``row_range(name, shard)`` its rows (see the
    module docstring for the rule)."""

    params: tuple[ParamSpec, ...]
    num_shards: int

    def __post_init__(self) -> None:
        params = tuple(self.params)
        for index, spec in enumerate(params):
            if not isinstance(spec, ParamSpec):
                raise TypeError(f"params[{index}] must be a ParamSpec; got {type(spec).__name__}")
        names = [spec.name for spec in params]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"parameter names must be unique; repeated: {', '.join(duplicates)}")
        if type(self.num_shards) is not int or self.num_shards < 1:
            raise ValueError(f"num_shards must be an int >= 1; got {self.num_shards!r}")
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "_by_name", {spec.name: spec for spec in params})

    @classmethod
    def from_arrays(cls, arrays: dict, num_shards: int) -> ShardLayout:
        """The layout of named full arrays (name -> ndarray), in the dict's order."""
        return cls(tuple(ParamSpec(name, tuple(a.shape), a.dtype.name) for name, a in arrays.items()), num_shards)

    def __contains__(self, name: object) -> bool:
        """Whether the layout has a parameter ``name``."""
        return name in self._by_name

    def spec(self, name: str) -> ParamSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown parameter {name!r}; the layout has {len(self.params)} parameters") from None

    def row_range(self, name: str, shard: int) -> tuple[int, int]:
        """The rows ``[first, stop)`` of parameter ``name`` that ``shard`` owns."""
        self.check_shard(shard)
        rows, n = self.spec(name).rows, self.num_shards
        return shard * rows // n, (shard + 1) * rows // n

    def slice(self, name: str, shard: int) -> tuple[int, int]:
        """The flat elements ``[start, stop)`` of parameter ``name`` that ``shard`` owns."""
        first, stop = self.row_range(name, shard)
        row_size = self.spec(name).row_size
        return first * row_size, stop * row_size

    def slices(self, shard: int) -> dict[str, tuple[int, int]]:
        """Every parameter's range for one shard, in table order."""
        return {spec.name: self.slice(spec.name, shard) for spec in self.params}

    def check_shard(self, shard: int) -> None:
        """Refuse a shard index this layout does not have."""
        if type(shard) is not int or not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be an int in [0, {self.num_shards}); got {shard!r}")
