"""The per-layer plan of one quantization: for every Linear/Conv2d of a denoiser (by its fully qualified
name), whether it takes the recipe's weight spec, the recipe's fallback, or stays float, and why. One plan
replaces the separate exclusion lists (the family's defaults, the recipe's patterns, the caller's patterns,
the model profile's measured float layers, and the layers a 4-bit group cannot take): it is built once
(`diffquant.quantization.plan.plan_layers`), the backend quantizes from it, the record and the saved
artifact keep it, and reports and model cards read it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

PLAN_VERSION = 1
QUANTIZE, FALLBACK, FLOAT = "quantize", "fallback", "float"
ACTIONS = (QUANTIZE, FALLBACK, FLOAT)


@dataclass(frozen=True)
class LayerEntry:
    """One layer: its name, what happens to it (`ACTIONS`) and, unless it takes the recipe's spec, why."""

    name: str
    action: str
    reason: str = ""


@dataclass(frozen=True)
class LayerPlan:
    """Every quantizable layer of a denoiser, in module order, with its action."""

    recipe: str
    layers: tuple[LayerEntry, ...]
    version: int = PLAN_VERSION

    def names(self, action: str) -> list[str]:
        """The layers with this action, in module order."""
        return [e.name for e in self.layers if e.action == action]

    @property
    def float_layers(self) -> list[str]:
        return self.names(FLOAT)

    def counts(self) -> dict[str, int]:
        """action -> number of layers (every action present, zero where none)."""
        counted = Counter(e.action for e in self.layers)
        return {action: counted.get(action, 0) for action in ACTIONS}

    def reasons(self, action: str = FLOAT) -> dict[str, list[str]]:
        """reason -> the layers that take `action` for it, in order of first appearance."""
        grouped: dict[str, list[str]] = {}
        for entry in self.layers:
            if entry.action == action:
                grouped.setdefault(entry.reason, []).append(entry.name)
        return grouped

    def summary(self) -> str:
        """One line: 'w8a8-int8: 65 quantized, 24 float (the model profile's measured float layers: 24)'."""
        counts = self.counts()
        parts = [f"{counts[QUANTIZE]} quantized"]
        for action in (FALLBACK, FLOAT):
            if counts[action]:
                why = "; ".join(f"{reason}: {len(names)}" for reason, names in self.reasons(action).items())
                parts.append(f"{counts[action]} {'take the fallback' if action == FALLBACK else 'float'} ({why})")
        return f"{self.recipe}: " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {"type": "LayerPlan", "version": self.version, "recipe": self.recipe,
                "layers": [[e.name, e.action, e.reason] for e in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        if data.get("type") != "LayerPlan" or data.get("version") != PLAN_VERSION:
            raise ValueError(f"not a version-{PLAN_VERSION} LayerPlan: {str(data)[:80]}")
        return cls(recipe=data["recipe"], layers=tuple(LayerEntry(*row) for row in data["layers"]))
