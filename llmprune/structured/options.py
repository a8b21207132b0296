"""Structured removal's settings, fields of :class:`llmprune.PruneConfig` (CLI flags and recipe keys of the
same names). A size is a fraction (below 1) or a count (1 or more: ``remove_layers: 8`` is eight layers)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from ..errors import ConfigError
from ..settings import Settings

DIMENSIONS = ("remove_heads", "remove_kv_heads", "remove_channels", "remove_layers", "remove_experts")


class StructureOptions(Settings):
    structure: str | None = Field(
        None, description="How heads and MLP channels are chosen for removal: 'search' (greedy OBS removal that "
        "minimises each layer's output error, with least-squares updates: ZipLM/OSSCAR-style), 'activation' "
        "(Minitron's activation magnitudes) or 'flap' (FLAP's fluctuation); default 'search' when a width is "
        "removed. The removed structures are gone from the saved checkpoint, a smaller dense model.",
    )
    remove_heads: float = Field(
        0, ge=0, description="Query heads removed from every decoder layer: a fraction of each key/value head's "
        "query heads (rounded to a whole number of them), or a count per layer that the key/value heads share "
        "equally; GQA stays valid.",
    )
    remove_kv_heads: float = Field(
        0, ge=0, description="Key/value heads removed from every decoder layer with all their query heads: a "
        "fraction or a count per layer.",
    )
    remove_channels: float = Field(
        0, ge=0, description="MLP intermediate channels removed from every decoder layer (gate/up rows and "
        "down-projection columns): a fraction or a count per layer.",
    )
    remove_layers: float = Field(
        0, ge=0, description="Whole decoder layers removed: a fraction or a count, chosen by --depth-method.",
    )
    remove_experts: float = Field(
        0, ge=0, description="Routed experts removed from every MoE layer by REAP saliency (router weight x "
        "expert output norm): a fraction or a count per layer; top-k stays as it is.",
    )
    structure_budget: float | None = Field(
        None, gt=0, lt=1, description="Fraction of the decoder layers' parameters to remove; what the "
        "remove_* settings given do not take is taken from MLP channels.",
    )
    depth_method: Literal["block-influence", "kl", "search"] = Field(
        "block-influence", description="How layers are chosen: 'block-influence' (ShortGPT: lowest "
        "1 - cos(input, output), one pass), 'kl' (one at a time, the layer whose removal changes the model's "
        "output distribution least on --depth-windows calibration windows; one model forward per candidate) or "
        "'search' (EvoPress: block influence's choice improved by an evolutionary search that swaps removed and "
        "kept layers, scored by the KL of the final logits on calibration windows; the --search-* settings).",
    )
    depth_windows: int = Field(
        2, ge=1, description="Calibration windows the 'kl' depth method scores each candidate on.",
    )
    search_batch: int = Field(
        16, ge=1, description="MLP channels the 'search' method removes per OBS step (1: one at a time, as ZipLM; "
        "each step re-scores the rest after a block update, so larger is faster and coarser).",
    )
    structure_reconstruct: bool = Field(
        True, description="Re-solve the consumers of the kept heads and channels (o_proj, down_proj) by least "
        "squares on the calibration inputs after an 'activation' or 'flap' choice ('search' always does).",
    )

    @property
    def structured(self) -> bool:
        """Whether structures are removed at all."""
        return self.structure_budget is not None or any(getattr(self, k) for k in DIMENSIONS)


def count(value: float, total: int, what: str) -> int:
    """A size setting as a count of ``total``: a fraction below 1 rounds to the nearest count, 1 or more is a
    count (an integer). Refuses removing everything."""
    if value == 0:
        return 0
    if value < 1:
        n = int(math.floor(value * total + 0.5))
    elif value != int(value):
        raise ConfigError(f"{what} {value} is neither a fraction below 1 nor a whole count; give e.g. 0.25 or 8")
    else:
        n = int(value)
    if n >= total:
        raise ConfigError(f"{what} {value} removes {n} of {total}, leaving none; give a smaller fraction or count")
    return n
