"""The units an export converts: one per expert, or one per stage of a progressive expert."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pool_builder.models.wrn import ProgressiveExpert


@dataclass(frozen=True)
class ExpertUnit:
    """One expert graph to convert: a whole expert (``stage`` None) or stage ``stage`` (1-based) of one."""

    task: str
    stage: int | None
    module: nn.Module

    @property
    def key(self) -> str:
        """Name in file paths and logs: ``tops`` or ``tops.stage2``."""
        return self.task if self.stage is None else f"{self.task}.stage{self.stage}"


def expert_units(experts: dict[str, nn.Module]) -> dict[str, ExpertUnit]:
    """Every expert as one unit, a progressive expert as one unit per stage (each sits on the library alone)."""
    units = []
    for task, module in experts.items():
        if isinstance(module, ProgressiveExpert):
            units += [ExpertUnit(task, k, stage) for k, stage in enumerate(module.stages, start=1)]
        else:
            units.append(ExpertUnit(task, None, module))
    return {u.key: u for u in units}
