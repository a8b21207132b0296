"""The sequential layer-wise engine, one for every architecture.

- :mod:`.targets`: the decoder stack and the weights to prune in each layer (incl. MoE experts);
- :mod:`.capture`: every decoder layer's real call recorded once per calibration chunk;
- :mod:`.layer`: one layer's hooks, which gather the declared statistics and prune on demand;
- :mod:`.lockstep`: small CPU chunks of the batch run in lockstep through one layer;
- :mod:`.plan`: what happens to each target (pruner, per-module sparsity, refinement);
- :mod:`.passes`: the prune pass (one-pass or two-pass per layer) and the observe-only pass;
- :mod:`.residency`: where a layer's weights live around its turn.
"""

from __future__ import annotations

from .capture import (LayerCall, UnsupportedModelError, capture_layer_inputs, inference_state, module_device,
                      resolve_device)
from .layer import ERROR_SAMPLE_ROWS, LayerReport, LayerWork, ModuleReport
from .lockstep import CPU_CHUNK_TOKENS, Lockstep, compute_chunk
from .passes import SequentialRun, plan_batch_size, run_sequential
from .plan import PrunePlan, layer_index, pattern_name, sparsity_map
from .residency import LayerResidency
from .targets import ExpertGroup, LayerTargets, Target, find_decoder_layers, find_targets

__all__ = [
    "CPU_CHUNK_TOKENS", "ERROR_SAMPLE_ROWS", "ExpertGroup", "LayerCall", "LayerReport", "LayerTargets", "LayerResidency",
    "LayerWork", "Lockstep", "ModuleReport", "PrunePlan", "SequentialRun", "Target", "UnsupportedModelError", "capture_layer_inputs",
    "compute_chunk", "find_decoder_layers", "find_targets", "inference_state", "layer_index", "module_device",
    "pattern_name", "plan_batch_size", "resolve_device", "run_sequential", "sparsity_map",
]
