"""Activation sparsity: calibrated thresholds (TEAL, WINA, CATS) stored in the checkpoint, installed by
forward hooks, and a CPU decode path that reads only the weight rows of surviving inputs.

- :mod:`.criteria`: what a threshold compares (``|x|``, ``|x_j|·‖W_:,j‖₂``, ``|act(gate(x))|``);
- :mod:`.calibrate`: the calibration pass over the decoder layers (uniform or TEAL-greedy allocation);
- :mod:`.result`: what the pass chose (``ActivationResult``) and its held-out measurement;
- :mod:`.apply`: the modules and hooks that apply thresholds, ``apply_activation_sparsity`` and ``remove``;
- :mod:`.options`: the activation settings of a pruning config;
- :mod:`.report`: the summary lines.
"""

from __future__ import annotations

from .apply import (ActivationSparsity, ActivationThreshold, SparseDecodeLinear, ThresholdSpec,
                    apply_activation_sparsity, apply_from_config, installed)
from .calibrate import ALLOCATIONS, ActivationCalibration
from .criteria import CRITERIA
from .result import ActivationResult

__all__ = [
    "ALLOCATIONS", "CRITERIA", "ActivationCalibration", "ActivationResult", "ActivationSparsity",
    "ActivationThreshold", "SparseDecodeLinear", "ThresholdSpec", "apply_activation_sparsity", "apply_from_config",
    "installed",
]
