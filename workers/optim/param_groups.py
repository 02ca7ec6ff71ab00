"""Param groups from parameter names: glob rules with hyperparameter overrides, and the
pure function that splits a model's parameter names into groups by them (what a task's
``param_group_rules`` and a job's ``[[param_groups]]`` mean)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParamGroupRule:
    """Hyperparameter overrides for the parameters whose names match a glob pattern.

    ``pattern`` follows :func:`fnmatch.fnmatchcase` (``"*.bias"``, ``"embedding.*"``);
    ``options`` are optimizer hyperparameters (``{"weight_decay": 0.0}``) that replace the
    optimizer's arguments for those parameters. A parameter takes the first rule it matches;
    parameters matching none form the default group.
    """

    pattern: str
    options: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"ParamGroupRule pattern must be a non-empty string; got {self.pattern!r}")
        if not isinstance(self.options, Mapping):
            raise TypeError(f"ParamGroupRule options must be a dict; got {type(self.options).__name__}")
        for key in self.options:
            if not isinstance(key, str):
                raise TypeError(f"ParamGroupRule {self.pattern!r}: option names must be strings; got {key!r}")
            if key in ("params", "param_names"):
                raise ValueError(
                    f"ParamGroupRule {self.pattern!r}: {key!r} is chosen by the pattern, not an option"
                )
        object.__setattr__(self, "options", dict(self.options))

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


def assign_groups(names: Sequence[str], rules: Sequence[ParamGroupRule]) -> list[tuple[ParamGroupRule | None, list[str]]]:
    """Split parameter names into groups: the default group (rule None) first, then one group
    per rule in rule order; names keep their order; empty groups are left out. A rule that
    matches no parameter is an error (a misspelt pattern would otherwise do nothing)."""
    members: list[list[str]] = [[] for _ in range(len(rules) + 1)]
    for name in names:
        slot = next((i + 1 for i, rule in enumerate(rules) if rule.matches(name)), 0)
        members[slot].append(name)
    for rule, matched in zip(rules, members[1:]):
        if not matched:
            raise ValueError(
                f"param group rule {rule.pattern!r} matches no parameter (or only parameters an "
                f"earlier rule took); parameters: {', '.join(names)}"
            )
    groups: list[tuple[ParamGroupRule | None, list[str]]] = []
    if members[0]:
        groups.append((None, members[0]))
    groups.extend((rule, matched) for rule, matched in zip(rules, members[1:]))
    return groups
