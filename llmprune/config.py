"""Typed, validated pruning configuration.

Every field maps 1:1 to a YAML recipe key and a kebab-case CLI flag
(``nsamples`` -> ``--nsamples``, ``trust_remote_code`` -> ``--trust-remote-code``).
Values are validated here, before any model is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from . import pruners, steps  # noqa: F401 - every built-in method registered, with its options
from .activation.options import ActivationOptions
from .errors import ConfigError
from .evaluation.config import EvalConfig
from .evaluation.perplexity import split_eval_names
from .masks import parse_module_sparsity, parse_pattern
from .pruners.alps import ALPSOptions
from .pruners.ria import RIAOptions
from .pruners.sparsegpt import SparseGPTOptions
from .recipe_files import read_recipe, recipe_path, recipe_summaries
from .registry import _TABLES, lookup, option_owners
from .settings import Settings, check_regex, split_list
from .steps.admm import ADMMOptions
from .steps.dsnot import DSnoTOptions
from .steps.eora import EoRAOptions
from .steps.evopress import SearchOptions
from .steps.owl import OWLOptions
from .structured.options import DIMENSIONS, StructureOptions

__all__ = ["ConfigError", "EvalConfig", "PruneConfig", "option_owners", "parse_pattern", "recipe_path",
           "recipe_summaries", "split_eval_names"]


class _Core(Settings):
    """The fields that open every config: what to prune, with which calibration data, on which model and
    device. Kept apart from :class:`PruneConfig`'s own fields only so that they come first (see there)."""

    model: str | None = Field(
        None, description="Hub id or local folder; None prunes the embedded default SmolLM2-135M-Instruct."
    )
    method: str = Field(
        "sparsegpt", description="Pruning method: magnitude, wanda, sparsegpt, ria, alps (or any registered pruner); "
        "'none' leaves the weights dense (activation sparsity only, the default when --activation is given "
        "without --method, --sparsity or --pattern)."
    )
    refine: str | None = Field(
        None, description="Refinement of every pruned mask, e.g. 'dsnot' (DSnoT prune-and-grow); none by default."
    )
    allocation: str | None = Field(
        None,
        description="Per-layer sparsity allocation from an observe-only pass over the dense model, e.g. 'owl'; "
        "none: every layer gets --sparsity.",
    )
    reconstruct: str | None = Field(
        None, description="Reconstruction of the kept weights with the mask fixed, after the pruner and any "
        "refinement, e.g. 'admm' (layer-wise least squares: ADMM and/or conjugate gradients on the support); none "
        "by default.",
    )
    compensate: str | None = Field(
        None, description="Low-rank compensation of each pruned module, saved beside the sparse base as a PEFT LoRA "
        "adapter, e.g. 'eora' (EoRA: the pruning error's SVD in the eigenspace of the inputs); none by default.",
    )
    sparsity: float | None = Field(
        None,
        description="Fraction of weights set to zero in each target, in [0, 1). "
        "Defaults to 0.5 for 'unstructured' and to 1 - N/M for an N:M pattern.",
    )
    pattern: str = Field(
        "unstructured", description="'unstructured', or 'N:M' to keep N of every M consecutive input weights."
    )
    layer_sparsity: list[float] | None = Field(
        None,
        description="Sparsity of each decoder layer, one fraction per layer in order (comma-separated); "
        "not with --allocation.",
    )
    module_sparsity: dict[str, float | str] | None = Field(
        None,
        description="Sparsity by module: regex on the full module name -> fraction or 'N:M' pattern; the "
        "first match wins over --layer-sparsity and allocations. CLI: 'mlp\\.=0.6;self_attn\\.=0.4'.",
    )
    calib: str = Field(
        "c4",
        description="Calibration source: 'c4', 'wikitext2', 'self', a .txt/.jsonl/.json/.parquet path, "
        "or an HF dataset 'name[:config][:split]'.",
    )
    nsamples: int = Field(128, ge=1, description="Number of calibration windows.")
    seqlen: int = Field(2048, ge=1, description="Tokens per calibration window (clipped to the model's context).")
    seed: int = Field(0, description="Seed of the calibration window sampling.")
    text_field: str = Field("text", description="Text field of .jsonl/.json/.parquet and HF dataset sources.")
    data_dir: str | None = Field(
        None, description="Folder with offline copies of the named datasets (also $LLMPRUNE_DATA_DIR)."
    )
    targets: str | None = Field(
        None,
        description="Regex on module names (relative to the decoder layer, e.g. 'mlp\\.'); "
        "default: every Linear/Conv1D inside the decoder layers.",
    )
    ignore: str | None = Field(None, description="Regex on module names to leave dense.")
    device: str = Field("auto", description="Compute device: 'cpu', 'cuda', 'cuda:N' or 'auto'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Storage dtype of the model; statistics and pruning math run in float32."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repository.")
    allow_pickle: bool = Field(
        False, description="Allow loading .bin/.pt (pickle) weights when no safetensors exist."
    )
    low_memory: bool | None = Field(
        None, description="Stream the decoder layers from the safetensors shards (meta-device skeleton, each "
        "layer read when reached and written to the output shards once pruned): peak memory about the "
        "embeddings plus two layers. None: chosen automatically when the weights do not fit in free memory.",
    )


# Each method's options (fields, defaults, limits, help, their own validators) are a small settings model
# beside the method (SparseGPTOptions in pruners/sparsegpt.py, ...; the activation ones in activation/options.py);
# a method's `options` are its model's fields, so option_owners() cannot drift from them. pydantic orders
# inherited fields from the last base to the first, then the class's own: the bases are listed in reverse so the
# keys (model_dump, config.json, to_yaml, --help, "valid keys" errors) keep their order: core, SparseGPT, RIA,
# DSnoT, ALPS, ADMM, EoRA, OWL, search, activation, structured removal, then engine, eval, save format.
class PruneConfig(StructureOptions, ActivationOptions, SearchOptions, OWLOptions, EoRAOptions, ADMMOptions, ALPSOptions,
                  DSnoTOptions, RIAOptions, SparseGPTOptions, _Core):
    """What to prune, how, and with which calibration data."""

    # Engine
    sequential: Literal["within-layer", "dense-layer"] = Field(
        "within-layer",
        description="Order inside a decoder layer: 'within-layer' prunes each module on the outputs of the "
        "already-pruned modules before it (true-sequential, measured best); 'dense-layer' gathers every "
        "module's statistics from the dense layer first (the reference codes' order). The same in any memory.",
    )
    execution: Literal["auto", "lockstep", "replay"] = Field(
        "auto",
        description="How a within-layer run holds its calibration chunks: 'lockstep' keeps every chunk's "
        "activations alive at once (fastest), 'replay' one chunk's at a time, starting each chunk's forward "
        "again from the layer's input after each pruned module (least memory, about 2.3x the layer time on the "
        "embedded model); 'auto': lockstep when free memory holds it, replay in a streamed run (--low-memory "
        "puts memory first). The same result either way.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Calibration windows per layer forward chunk (default: 2048 tokens per chunk on the CPU, "
        "32768 on GPUs). Sets the summation order of the statistics, so the masks depend on it only through "
        "float rounding: the two defaults differ in 0.004 % of Wanda's and 1.6 % of SparseGPT's mask entries on "
        "the embedded model (eval/results/chunk_masks.md), and a GPU sums in another order at any chunk size; "
        "whether chunks run in lockstep or are replayed follows free memory and never changes the result.",
    )
    # Evaluation after pruning, on the model in memory
    eval: EvalConfig | None = Field(
        None,
        description="Evaluate the pruned model before saving: 'wikitext2,piqa' (perplexity datasets and "
        "lm-eval tasks, comma-separated); in a recipe, a mapping of evaluation settings.",
    )
    # How the checkpoint is stored (llmprune/checkpoint)
    save_format: Literal["dense", "compressed"] = Field(
        "dense", description="Checkpoint weights: 'dense' (plain safetensors, loads with transformers) or "
        "'compressed' (kept values + a packed bitmask or N:M indices: 9/16 of the bytes of 16-bit weights at half "
        "sparsity; loads with llmprune.load, `llmprune decompress` writes a dense copy).",
    )

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_list(cls, v: Any) -> Any:
        if isinstance(v, (str, list)):
            names = split_list(v)
            bad = [x for x in names if not isinstance(x, str) or not x.strip()]
            if bad:
                raise ValueError(f"evaluation entries must be dataset or task names such as 'wikitext2' or "
                                 f"'piqa', got {bad[0]!r}")
            return split_eval_names(names)
        return v

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        return v if v == "none" else _registered("method", v)

    @model_validator(mode="before")
    @classmethod
    def _activation_only(cls, data: Any) -> Any:
        """``activation`` without a method, sparsity or pattern: activation sparsity only (method none)."""
        if isinstance(data, dict) and data.get("activation") not in (None, "none", "") and not any(
                data.get(k) is not None for k in ("method", "sparsity", "pattern")):
            data = {**data, "method": "none"}
        if isinstance(data, dict) and any(data.get(k) for k in (*DIMENSIONS, "structure_budget")) and not any(
                data.get(k) is not None for k in ("method", "sparsity", "pattern")):
            data = {**data, "method": "none"}  # structured removal alone
        if isinstance(data, dict) and data.get("activation") in ("none", ""):
            data = {**data, "activation": None}
        return data

    @model_validator(mode="after")
    def _check_activation(self) -> PruneConfig:  # after ActivationOptions' own check (stray activation_*)
        if self.structured:
            self._check_structured()
        elif self.structure is not None:
            raise ValueError(f"structure {self.structure!r} chooses which heads and channels go, but no removal is asked "
                             "for; add e.g. --remove-channels 0.25, --remove-heads 3 or --structure-budget 0.25")
        if self.activation is None and self.method == "none" and not self.structured:
            raise ValueError("method 'none' prunes nothing and no activation sparsity is asked for; choose a "
                             "method (e.g. sparsegpt) or add --activation teal")
        if self.method == "none":
            used = [k for k in ("sparsity", "layer_sparsity", "module_sparsity", "refine", "allocation",
                                "reconstruct", "compensate") if getattr(self, k) is not None]
            if used or self.pattern != "unstructured":
                raise ValueError(f"method 'none' leaves the weights dense, but {', '.join(used) or 'pattern'} "
                                 "prunes them; choose a method (e.g. --method sparsegpt) or remove it")
        return self

    def _check_structured(self) -> None:
        if self.method != "none":
            raise ValueError(f"structured removal writes a smaller dense model and runs alone, but method "
                             f"{self.method!r} is also given; prune the smaller model it writes in a second run "
                             "(llmprune prune OUT --method ...), or drop --method")
        if self.activation is not None:
            raise ValueError("structured removal runs alone; calibrate activation sparsity on the smaller model it "
                             "writes in a second run (llmprune prune OUT --activation ...)")
        if self.low_memory:
            raise ValueError("structured removal holds the model in memory; --low-memory (streaming from the shards) "
                             "is not supported with it yet: drop --low-memory")

    @field_validator("structure")
    @classmethod
    def _check_structure(cls, v: str | None) -> str | None:
        return None if v in (None, "none", "") else _registered("structure", v)

    @field_validator("refine", "allocation", "reconstruct", "compensate")
    @classmethod
    def _check_step(cls, v: str | None, info) -> str | None:
        return None if v is None or v in ("none", "") else _registered(info.field_name, v)

    @field_validator("layer_sparsity", mode="before")
    @classmethod
    def _layer_list(cls, v: Any) -> Any:
        return split_list(v)

    @field_validator("layer_sparsity")
    @classmethod
    def _check_layer_sparsity(cls, v: list[float] | None) -> list[float] | None:
        for x in v or []:
            if not 0.0 <= x < 1.0:
                raise ValueError(f"layer sparsity {x} is out of range; give fractions in [0, 1), one per layer")
        return v

    @field_validator("module_sparsity", mode="before")
    @classmethod
    def _module_map(cls, v: Any) -> Any:
        return parse_module_sparsity(v) if isinstance(v, str) else v

    @field_validator("module_sparsity")
    @classmethod
    def _check_module_sparsity(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        out: dict[str, float | str] = {}
        for rx, val in v.items():
            check_regex(rx)
            if isinstance(val, str) and ":" in val:
                parse_pattern(val)
                out[rx] = val.strip()
                continue
            try:
                x = float(val)
            except (TypeError, ValueError):
                raise ValueError(f"module sparsity {val!r} for {rx!r} is not a fraction or an N:M pattern") from None
            if not 0.0 <= x < 1.0:
                raise ValueError(f"module sparsity {x} for {rx!r} is out of range; give a fraction in [0, 1)")
            out[rx] = x
        return out

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_not_number(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            raise ValueError(
                f"pattern was read as the number {v} (YAML reads an unquoted 2:4 as a base-60 integer); "
                "quote it: pattern: \"2:4\""
            )
        return v

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v.strip()

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity {v} is out of range; give a fraction in [0, 1), e.g. 0.5")
        return v

    @field_validator("targets", "ignore")
    @classmethod
    def _check_regex(cls, v: str | None) -> str | None:
        return check_regex(v)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device {v!r} is not supported; choose one of: auto, cpu, cuda, cuda:N")
        return v

    @model_validator(mode="after")
    def _check_sparsity_vs_pattern(self) -> PruneConfig:
        nm = parse_pattern(self.pattern)
        if nm is not None and self.sparsity is not None:
            implied = 1 - nm[0] / nm[1]
            if abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means sparsity {implied:g}); "
                    "leave sparsity unset for an N:M pattern"
                )
        return self

    @model_validator(mode="after")
    def _check_options(self) -> PruneConfig:
        if self.allocation is not None and self.layer_sparsity is not None:
            raise ValueError("layer_sparsity and allocation both set the per-layer sparsity; give one of them")
        for kind in _TABLES:  # each selected method's own checks (SparseGPT's: an exact N:M search too large)
            name = getattr(self, kind)
            if name not in (None, "none"):
                getattr(lookup(kind, name), "check_config", lambda _: None)(self)
        selected = self.selected_methods()
        for name in self.model_fields_set:
            owners = option_owners().get(name)
            if owners and not owners & selected:
                raise ValueError(
                    f"option {name!r} belongs to {', '.join(sorted(owners))}, which this config does not use "
                    f"(method {self.method!r}, refine {self.refine!r}, allocation {self.allocation!r}, reconstruct "
                    f"{self.reconstruct!r}, compensate {self.compensate!r}); "
                    "remove it or select that method"
                )
        return self

    def selected_methods(self) -> set[str]:
        """The registered methods this config uses: its pruner, refinement, allocation, reconstruction and
        compensation."""
        return {x for x in (self.method, self.refine, self.allocation, self.reconstruct, self.compensate,
                            self.structure or ("search" if self.structured else None)) if x}

    # ---- derived -------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def eval_settings(self) -> EvalConfig | None:
        """The evaluation to run after pruning (None if none), with this config's data dir by default."""
        if self.eval is None or self.eval.empty:
            return None
        return self.eval if self.eval.data_dir else self.eval.model_copy(update={"data_dir": self.data_dir})

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity

    # ---- YAML ------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> PruneConfig:
        """Load a recipe, a packaged one by name (``"sparsegpt-50"``, see :func:`recipe_summaries`) or a YAML
        file; ``overrides`` (e.g. from the CLI) win over its values."""
        path = recipe_path(path)
        data = read_recipe(path)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        chosen = ("method", "refine", "allocation", "reconstruct", "compensate")
        if any(k in overrides and overrides[k] != data.get(k) for k in chosen):
            # options of the recipe's methods that the overrides replaced do not apply any more
            kept = {overrides.get(k, data.get(k)) for k in chosen} - {None}
            for key in [k for k in data if k in option_owners() and not option_owners()[k] & kept]:
                data.pop(key)
        if "pattern" in overrides and "sparsity" not in overrides and parse_pattern(str(overrides["pattern"])):
            data.pop("sparsity", None)  # an N:M override implies its own sparsity
        if isinstance(overrides.get("eval"), (str, list)) and isinstance(data.get("eval"), dict):
            # --eval names the datasets and tasks; the recipe's other evaluation settings stay
            overrides["eval"] = {**data["eval"], **split_eval_names(split_list(overrides["eval"]))}
        data.update(overrides)
        return cls.build(data, source=str(path))

    def to_yaml(self) -> str:
        owners, used = option_owners(), self.selected_methods()
        data = {k: v for k, v in self.model_dump().items() if k not in owners or owners[k] & used}
        return yaml.safe_dump(data, sort_keys=False)


def _registered(kind: str, name: str) -> str:
    lookup(kind, name)  # the error lists the registered choices
    return name
