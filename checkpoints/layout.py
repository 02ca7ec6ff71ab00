"""How N shards split the parameters: each shard owns one contiguous flat range of every
parameter, balanced to within one element.

For a parameter of ``numel`` elements (C order, flattened) and ``N`` shards, shard ``s``
owns elements ``[s * numel // N, (s + 1) * numel // N)``. The ranges tile the parameter in
shard order, sizes differ by at most one, and the split depends only on ``(numel, N)``, so
the shard actors, the checkpoint writer and every reader compute the same layout from the
parameter table alone. A parameter with fewer elements than shards leaves some shards an
empty range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from checkpoints.format import ALLOWED_DTYPES, DTYPES


def partition(numel: int, num_shards: int) -> list[int]:
    """The N + 1 boundaries of a parameter's shard ranges: shard s owns
    ``[bounds[s], bounds[s + 1])`` with ``bounds[s] = s * numel // N``."""
    if type(numel) is not int or numel < 0:
        raise ValueError(f"numel must be a non-negative int; got {numel!r}")
    if type(num_shards) is not int or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1; got {num_shards!r}")
    return [s * numel // num_shards for s in range(num_shards + 1)]


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


@dataclass(frozen=True)
class ShardLayout:
    """The parameter table and the shard count; ``slice(name, shard)`` is that shard's
    ``(start, stop)`` of the flattened parameter (see the module docstring for the rule)."""

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

    def spec(self, name: str) -> ParamSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"unknown parameter {name!r}; the layout has {len(self.params)} parameters") from None

    def slice(self, name: str, shard: int) -> tuple[int, int]:
        self._check_shard(shard)
        numel = self.spec(name).numel
        n = self.num_shards
        return shard * numel // n, (shard + 1) * numel // n

    def slices(self, shard: int) -> dict[str, tuple[int, int]]:
        """Every parameter's range for one shard, in table order."""
        return {spec.name: self.slice(spec.name, shard) for spec in self.params}

    def _check_shard(self, shard: int) -> None:
        if type(shard) is not int or not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be an int in [0, {self.num_shards}); got {shard!r}")
