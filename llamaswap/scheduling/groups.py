"""The group swap planner (llama-swap §6.2 in docs/design.md).

Models are partitioned into named groups.  Loading a target from group G
evicts, among the other running models:

=====================  ==============================================
other model's group    evicted when
=====================  ==============================================
G itself               ``G.swap``
another group H        ``G.exclusive`` and not ``H.persistent``
=====================  ==============================================

So a ``swap: false`` group runs all its members together, a persistent group
is never evicted by other groups (but still swaps internally), and loading
from a non-exclusive group never evicts other groups, not even exclusive ones
(a one-way rule kept from llama-swap; the matrix planner has no such gotcha).
Models in no group belong to the implicit :data:`DEFAULT_GROUP`, which swaps
and is exclusive, so with no groups at all one model runs at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from zope.interface import implementer

from llamaswap.scheduling.planner import ISwapPlanner

#: the implicit group of every model that is in no configured group.
DEFAULT_GROUP = "(default)"


@dataclass(frozen=True)
class Group:
    """One ``groups.<id>`` entry with llama-swap's defaults."""

    members: tuple[str, ...] = ()
    #: members evict each other.
    swap: bool = True
    #: loading a member evicts the (non-persistent) members of other groups.
    exclusive: bool = True
    #: members are never evicted by loads from other groups.
    persistent: bool = False


@implementer(ISwapPlanner)
class GroupPlanner:
    """Evictions from static group membership (the table in the module docstring).

    ``groups`` maps group id to :class:`Group`; a model may be a member of one
    group only (``ValueError`` otherwise).  An entry for :data:`DEFAULT_GROUP`
    sets the implicit group's flags; whether or not it lists members, every
    model in no other group belongs to it.
    """

    def __init__(self, groups: Mapping[str, Group]) -> None:
        group_of: dict[str, str] = {}
        for group_id, group in groups.items():
            for member in group.members:
                other = group_of.setdefault(member, group_id)
                if other != group_id:
                    raise ValueError(
                        f"model {member!r} is in multiple groups: {other!r} and {group_id!r}"
                    )
        all_groups = dict(groups)
        all_groups.setdefault(DEFAULT_GROUP, Group())
        self._groups = MappingProxyType(all_groups)
        self._group_of = MappingProxyType(group_of)

    @property
    def groups(self) -> Mapping[str, Group]:
        """Every group by id, :data:`DEFAULT_GROUP` included."""
        return self._groups

    def group_of(self, model: str) -> str:
        """The id of the group ``model`` belongs to."""
        return self._group_of.get(model, DEFAULT_GROUP)

    def evict_set(self, target: str, running: frozenset[str]) -> frozenset[str]:
        """The running models (other than ``target``) the table evicts.  The
        answer does not depend on whether ``target`` itself is in ``running``,
        so a target that is still stopping gets the same evictions as a cold
        start."""
        home_id = self.group_of(target)
        home = self._groups[home_id]
        evict = set()
        for model in running:
            if model == target:
                continue
            other_id = self.group_of(model)
            if other_id == home_id:
                if home.swap:
                    evict.add(model)
            elif home.exclusive and not self._groups[other_id].persistent:
                evict.add(model)
        return frozenset(evict)
