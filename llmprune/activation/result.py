"""What the activation calibration pass chose (:class:`ActivationResult`: one spec per thresholded tensor,
stored in ``config.json``'s metadata) and the sparsity its thresholds reach on held-out text
(:func:`measure_holdout`, kept in the result's ``holdout``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.capture import capture_layer_inputs, inference_state, module_device
from ..engine.passes import _store_output
from .apply import ThresholdSpec


@dataclass
class ActivationResult:
    """What the calibration pass chose: one spec per thresholded tensor, and how long it took."""

    criterion: str
    allocation: str
    target: float
    specs: list[ThresholdSpec] = field(default_factory=list)
    seconds: float = 0.0
    step: float | None = None
    holdout: dict[str, Any] | None = None  # measured sparsity on held-out text (see measure_holdout)
    wina: str | None = None  # wina: 'official' (a threshold per reader) or 'stacked' (one per tensor)
    prefill: float = 1.0  # fraction of each multi-position call's last positions thresholded (apply.py)

    @property
    def calibration_sparsity(self) -> dict[str, float | None]:
        """Model-wide sparsity on the calibration tokens: over entries, and weighted by weights fed."""
        w = sum(s.weights for s in self.specs)
        return {"weighted": sum(s.calibration * s.weights for s in self.specs) / w if w else None}

    def metadata(self) -> dict[str, Any]:
        """The ``"activation"`` block of ``config.json``'s ``llmprune`` metadata: module → threshold."""
        thresholds = {}
        for s in self.specs:
            for m in s.members:
                thresholds[m] = {"threshold": s.threshold, "group": s.name, "site": s.site,
                                 "target": round(s.target, 6) if s.target is not None else None,
                                 "calibration": round(s.calibration, 6) if s.calibration is not None else None,
                                 "measured": round(s.measured, 6) if s.measured is not None else None,
                                 "weights": s.weights, **({"norms": s.norms} if s.norms is not None else {})}
        return {
            "criterion": self.criterion, **({"wina": self.wina} if self.wina else {}), "allocation": self.allocation,
            "target_sparsity": self.target, "prefill": self.prefill,
            "calibration_sparsity": _round(self.calibration_sparsity["weighted"]),
            "measured_sparsity": _round((self.holdout or {}).get("weighted")),
            **({"measured_on": {k: v for k, v in self.holdout.items() if k not in ("tensors",)}}
               if self.holdout else {}),
            **({"greedy_step": self.step} if self.allocation == "greedy" else {}),
            "meaning": "entries of each listed module's input (site 'input'; 'output': the module's output) whose "
                       "score is below 'threshold' are set to zero at inference; score |x| (teal, cats, and wina "
                       "where 'norms' is false) or |x_j|*||W[:, j]||_2 over the group's stacked weights (wina); "
                       "modules with the same 'group' share one mask. Applied to every decode step (one position "
                       "per call) and to the last 'prefill' fraction of the positions of a longer call. Installed "
                       "by llmprune.load / llmprune.apply_activation_sparsity; transformers alone ignores it "
                       "(dense activations).",
            "thresholds": thresholds,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def measure_holdout(run, handle, input_ids: torch.Tensor, description: dict[str, Any]) -> dict[str, Any]:
    """Sparsity the installed thresholds reach on held-out windows ``input_ids [n, L]``: per tensor
    (written into each spec's ``measured``) and model-wide (over entries, and weighted by weights fed), with
    every position of the windows thresholded (as a decode step is), whatever the installed ``prefill``.

    It runs as the calibration pass does, on ``run`` (the :class:`~llmprune.engine.SequentialRun` the
    thresholds were calibrated on): each window's embeddings captured on ``run.device``, then the decoder
    layers one at a time on that device, each going back where it lives after (a GPU run keeps the model
    in CPU memory between layers, so a whole-model forward would meet inputs on another device than its
    embeddings; it would also compute the head, where no threshold sits). One window per forward."""
    model, device = run.model, run.device
    observed = getattr(run.residency, "observed", None)
    with inference_state(model), handle.measure(), handle.applied(1.0):
        hidden, calls = capture_layer_inputs(model, run.layers, list(input_ids.split(1)), device)
        for i, layer in enumerate(run.layers):
            home = module_device(layer)
            layer.to(device)
            for c in range(len(hidden)):
                _store_output(hidden, c, calls[c][i](layer, hidden[c]))
            layer.to(home)
            if observed is not None:  # an offloaded layer's pages go back, as after the calibration pass
                observed(i, layer)
    got = handle.sparsity()
    for spec in handle.specs:
        spec.measured = got["tensors"].get(spec.name)
    return {**description, "tokens": int(input_ids.numel()), "entries": got["entries"], "weighted": got["weighted"],
            "tensors": got["tensors"]}
