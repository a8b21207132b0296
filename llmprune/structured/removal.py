"""What a structured prune removes: whole decoder layers, and inside the layers that stay, query heads,
key/value heads, MLP channels and experts, each by its index in the original model.

A :class:`Removal` is plain data: the structured methods fill it, the engine zeroes what it names while
the remaining layers are pruned (a zeroed head, channel or expert contributes nothing, so the model's
outputs are already those of the smaller model), and :mod:`llmprune.checkpoint.surgery` cuts the model
down to it. It goes into ``config.json``'s pruning metadata and the model card as :meth:`Removal.to_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerRemoval:
    """What goes from one decoder layer (indices in the original layer, ascending)."""

    heads: tuple[int, ...] = ()  # query heads, those of removed key/value heads included
    kv_heads: tuple[int, ...] = ()  # key/value heads (groups) removed with all their query heads
    channels: tuple[int, ...] = ()  # MLP intermediate channels (gate/up rows, down columns)
    experts: tuple[int, ...] = ()  # routed experts (and the router's rows for them)

    def __bool__(self) -> bool:
        return bool(self.heads or self.kv_heads or self.channels or self.experts)

    def to_dict(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in (("heads", self.heads), ("kv_heads", self.kv_heads),
                                        ("channels", self.channels), ("experts", self.experts)) if v}

    @classmethod
    def from_dict(cls, d: dict) -> LayerRemoval:
        return cls(**{k: tuple(int(i) for i in d.get(k, ())) for k in ("heads", "kv_heads", "channels", "experts")})


@dataclass
class Removal:
    """Everything removed from a model. ``layers``: decoder layers removed, original indices; ``per_layer``:
    original layer index -> what goes inside it (only layers that stay, only those that lose something)."""

    layers: tuple[int, ...] = ()
    per_layer: dict[int, LayerRemoval] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.layers) or any(self.per_layer.values())

    def kept_layers(self, n_layers: int) -> list[int]:
        """Original indices of the layers that stay, in order."""
        gone = set(self.layers)
        return [i for i in range(n_layers) if i not in gone]

    def to_dict(self) -> dict:
        return {"layers": list(self.layers),
                "per_layer": {str(i): r.to_dict() for i, r in sorted(self.per_layer.items()) if r}}

    @classmethod
    def from_dict(cls, d: dict) -> Removal:
        return cls(layers=tuple(int(i) for i in d.get("layers", ())),
                   per_layer={int(i): LayerRemoval.from_dict(r) for i, r in d.get("per_layer", {}).items()})
