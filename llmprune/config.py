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
from .errors import ConfigError
from .evaluation.config import EvalConfig
from .evaluation.perplexity import PPL_DATASETS
from .masks import parse_pattern
from .pruners.sparsegpt import SparseGPT
from .registry import _TABLES, lookup
from .settings import Settings, split_list

__all__ = ["ConfigError", "EvalConfig", "PruneConfig", "parse_pattern"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 integers, so an unquoted ``pattern: 2:4`` stays the string '2:4'."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+)$"), list("-+0123456789")
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)









class PruneConfig(Settings):
    """What to prune, how, and with which calibration data."""

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
    # SparseGPT
    blocksize: int = Field(128, ge=1, description="SparseGPT: columns per lazy-update block.")
    damp: float = Field(
        0.01, gt=0, lt=1, description="SparseGPT, ALPS, ADMM reconstruction, EoRA: Hessian damping as a fraction of "
        "its mean diagonal."
    )
    act_order: bool | None = Field(
        None,
        description="SparseGPT: visit input columns (whole N:M groups) by decreasing Hessian diagonal, as GPTQ's "
        "act-order. None: on for N:M patterns, off for unstructured (whose blocks each get the same sparsity).",
    )
    nm_exact: bool | Literal["auto"] = Field(
        "auto",
        description="SparseGPT N:M: which M-N weights of each group to prune. true: the set with the least exact "
        "OBS loss, every C(M, M-N) set scored (refused above 100,000 sets); auto: exact up to 70 sets (every "
        "M <= 8), beyond that greedy on the same loss, one weight at a time; false: the reference's one-by-one "
        "saliency w^2 / [H^-1]_jj^2.",
    )
    # RIA (method: ria)
    ria_alpha: float = Field(
        0.5, ge=0, description="RIA: exponent a on the input-activation norm ‖X_j‖₂ in the score (0: relative "
        "importance only).",
    )
    ria_permute: bool = Field(
        True, description="RIA N:M: reorder input channels so the N:M groups keep the most score (heuristic "
        "allocation + linear-sum assignment); the weight is saved in the original order.",
    )
    ria_lsa_rounds: int = Field(
        1, ge=0, description="RIA N:M permutation: sweeps of linear-sum-assignment refinement over the M positions "
        "of a group (0: heuristic allocation only; the reference sweeps once).",
    )
    ria_lsa_blocks: int = Field(
        1, ge=1, description="RIA N:M permutation: solve the assignment within this many contiguous blocks of "
        "channels (faster, slightly worse; the reference's --fast uses 4/8/16).",
    )
    # DSnoT (refine: dsnot)
    dsnot_cycles: int = Field(
        50, ge=0, description="DSnoT: at most this many grow-and-prune swaps per output row (the reference's "
        "max_cycle_time).",
    )
    dsnot_threshold: float = Field(
        0.1 / 2048, ge=0, description="DSnoT: stop a row once |Σ_j (W - Ŵ)_ij E[x_j]| is at most this, per token "
        "(the reference's update_threshold 0.1 on sums over 2048-token sequences, made independent of seqlen).",
    )
    dsnot_var_power: float = Field(
        1.0, ge=0, description="DSnoT: the growing score is W·E[x] / Var[x]^p; 0 disables the variance term.",
    )
    dsnot_same_sign: bool | None = Field(
        None, description="DSnoT: refuse a swap that flips the sign of the row's error; unset: as the reference "
        "(off for unstructured, on for N:M).",
    )
    dsnot_monotone: bool = Field(
        True, description="DSnoT: refuse a swap that does not lower |error| (ending the row); false: as the "
        "reference, keep swapping while |error| is above the threshold, overshooting allowed.",
    )
    dsnot_skip: str | None = Field(
        r"mlp|\.fc\d|experts|moe", description="DSnoT: regex on full module names left unrefined (the reference "
        "refines attention only: --skip_layer mlp); '' refines every target.",
    )
    # ALPS (method: alps)
    alps_rho: float = Field(
        0.1, gt=0, description="ALPS: initial ADMM penalty ρ on the normalised Hessian (unit diagonal); the paper's "
        "schedule raises it by 1.3/1.2/1.1 every 3 iterations while the support still changes.",
    )
    alps_iters: int = Field(
        300, ge=0, description="ALPS: at most this many ADMM iterations (the reference's max_iter); they stop earlier "
        "once the support no longer changes.",
    )
    alps_pcg_iters: int = Field(
        10, ge=0, description="ALPS: at most this many conjugate-gradient iterations on the final support (the "
        "reference's 10).",
    )
    # ADMM reconstruction (reconstruct: admm)
    admm_iters: int = Field(
        0, ge=0, description="ADMM reconstruction: at most this many ADMM iterations (Boža 2024, ρ growing 1.3x "
        "every 3) before the conjugate gradients; 0: conjugate gradients only, which reach the same layer error "
        "several times faster (eval/results/reconstruct.md).",
    )
    admm_rho: float = Field(
        1.0, gt=0, description="ADMM reconstruction: initial penalty ρ on the normalised Hessian (unit diagonal).",
    )
    admm_pcg_iters: int = Field(
        30, ge=0, description="ADMM reconstruction: at most this many conjugate-gradient iterations on the support.",
    )
    admm_tol: float = Field(
        1e-3, ge=0, description="ADMM reconstruction: stop when an iteration lowers the layer's reconstruction error "
        "by less than this fraction of it (ADMM: when ‖V − Z‖/‖Z‖ is below it).",
    )
    # EoRA (compensate: eora)
    rank: int = Field(
        64, ge=1, description="EoRA: LoRA rank of the correction of every pruned module.",
    )
    eora_budget: float | None = Field(
        None, gt=0, lt=1, description="EoRA: instead of --rank, add this fraction of each module's weights as "
        "adapter parameters (rank = budget · out · in / (out + in)).",
    )
    # OWL (allocation: owl)
    owl_m: float = Field(
        5.0, gt=0, description="OWL: a Wanda score |W|·‖X‖ counts as an outlier above owl_m x the mean score "
        "of its decoder layer (the paper's M).",
    )
    owl_lambda: float = Field(
        0.08, ge=0, lt=1, description="OWL: every layer's sparsity stays within sparsity ± owl_lambda (the paper's "
        "λ); with N:M a layer's N moves by at most owl_lambda·M, so it needs at least 1/M to change anything.",
    )
    # Activation sparsity (llmprune/activation/)
    activation: Literal["teal", "wina", "cats"] | None = Field(
        None, description="Activation sparsity: calibrated thresholds that zero small entries of the inputs of the "
        "decoder layers' linear maps at inference, stored in config.json and applied by llmprune.load. 'teal' |x| "
        "on every input; 'wina' |x_j|·‖W_:,j‖₂; 'cats' |act(gate(x))| of gated MLPs only. None: dense activations.",
    )
    activation_sparsity: float | None = Field(
        None, description="Activation sparsity: target fraction of zeroed entries, model-wide, weighted by the "
        "weights each thresholded tensor feeds (cats: of the gated MLPs' activations), in [0, 1); default 0.5.",
    )
    activation_allocation: Literal["uniform", "greedy"] = Field(
        "uniform", description="Activation sparsity per tensor: 'uniform' (every tensor at the target) or 'greedy' "
        "(TEAL's block-wise greedy: each layer meets the target with the least output error).",
    )
    activation_greedy_step: float = Field(
        0.025, gt=0, lt=1, description="Activation greedy allocation: weighted layer sparsity added per step "
        "(smaller: finer allocation, more layer forwards).",
    )
    activation_holdout: str | None = Field(
        "wikitext2", description="Activation sparsity: held-out text the reached sparsity is measured on (a perplexity "
        "dataset or .txt/.jsonl file, never the calibration text); 'none' skips the measurement.",
    )
    activation_holdout_windows: int = Field(
        4, ge=1, description="Activation sparsity: windows of --seqlen tokens of the held-out text measured.",
    )
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
        "float rounding; whether chunks run in lockstep or are replayed follows free memory and never changes "
        "the result.",
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
        if isinstance(data, dict) and data.get("activation") in ("none", ""):
            data = {**data, "activation": None}
        return data

    @field_validator("activation_holdout")
    @classmethod
    def _holdout_none(cls, v: str | None) -> str | None:
        return None if v in (None, "none", "") else v

    @field_validator("activation_sparsity")
    @classmethod
    def _check_activation_sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"activation sparsity {v} is out of range; give a fraction in [0, 1), e.g. 0.5")
        return v

    @model_validator(mode="after")
    def _check_activation(self) -> PruneConfig:
        if self.activation is None:
            stray = sorted(k for k in self.model_fields_set if k.startswith("activation_")
                           and getattr(self, k) != type(self).model_fields[k].default)  # a full dump repeats defaults
            if stray:
                raise ValueError(f"{', '.join(stray)} set but no activation criterion; add --activation teal "
                                 "(or wina, cats), or remove them")
            if self.method == "none":
                raise ValueError("method 'none' prunes nothing and no activation sparsity is asked for; choose a "
                                 "method (e.g. sparsegpt) or add --activation teal")
        if self.method == "none":
            used = [k for k in ("sparsity", "layer_sparsity", "module_sparsity", "refine", "allocation",
                                "reconstruct", "compensate") if getattr(self, k) is not None]
            if used or self.pattern != "unstructured":
                raise ValueError(f"method 'none' leaves the weights dense, but {', '.join(used) or 'pattern'} "
                                 "prunes them; choose a method (e.g. --method sparsegpt) or remove it")
        return self

    @property
    def activation_target(self) -> float:
        """The model-wide activation sparsity target (0.5 when only the criterion is given)."""
        return 0.5 if self.activation_sparsity is None else self.activation_sparsity

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
        if isinstance(v, str):  # 'RE=V;RE=V' from the command line
            out = {}
            for item in filter(None, (x.strip() for x in v.split(";"))):
                rx, sep, val = item.rpartition("=")
                if not sep or not rx:
                    raise ValueError(f"module sparsity {item!r} is not understood; write REGEX=VALUE, e.g. 'mlp\\.=0.6'")
                out[rx] = val.strip()
            return out
        return v

    @field_validator("module_sparsity")
    @classmethod
    def _check_module_sparsity(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        out: dict[str, float | str] = {}
        for rx, val in v.items():
            try:
                re.compile(rx)
            except re.error as e:
                raise ValueError(f"{rx!r} is not a valid regular expression ({e})") from None
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

    @field_validator("targets", "ignore", "dsnot_skip")
    @classmethod
    def _check_regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{v!r} is not a valid regular expression ({e})") from None
        return v

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
        if self.method == "sparsegpt" and self.nm_exact is True:  # an exact search too large: say so now
            patterns = [self.pattern, *[v for v in (self.module_sparsity or {}).values() if isinstance(v, str)]]
            for p in patterns:
                SparseGPT(nm_exact=True).nm_choice(parse_pattern(p))
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
        return {x for x in (self.method, self.refine, self.allocation, self.reconstruct, self.compensate) if x}

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
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecipeLoader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML{at}: {problem}; fix the file "
                              "(see `llmprune recipes` for examples)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping of config fields, got {type(data).__name__}")
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


RECIPES_DIR = Path(__file__).parent / "recipes"  # shipped with the package (package data)


def recipe_path(recipe: str | Path) -> Path:
    """The file of ``recipe``: a YAML path, or the name of a packaged recipe (``sparsegpt-50``)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{recipe}.yaml"
    if path.suffix == "" and path.name == str(recipe) and named.is_file():
        return named
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {str(recipe)!r} does not exist: it is neither a YAML file nor a packaged recipe; give "
                      f"a path, or one of: {', '.join(names)} (`llmprune recipes` lists what each does)")


def recipe_summaries() -> list[tuple[str, str]]:
    """``(name, what it reproduces)`` of every packaged recipe: its name and the line below its command."""
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        comments = [ln.lstrip("# ").strip() for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.startswith("#")]
        out.append((path.stem, comments[1] if len(comments) > 1 else ""))
    return out


def _registered(kind: str, name: str) -> str:
    lookup(kind, name)  # the error lists the registered choices
    return name


def option_owners() -> dict[str, set[str]]:
    """Config field -> names of the registered methods that take it as an option."""
    owners: dict[str, set[str]] = {}
    for table in _TABLES.values():
        for name, cls in table.items():
            for opt in getattr(cls, "options", ()):
                owners.setdefault(opt, set()).add(name)
    return owners


def split_eval_names(names: list[str]) -> dict[str, list[str]]:
    """Sort ``--eval`` names into perplexity datasets (wikitext2, c4, text files) and lm-eval tasks."""
    ppl = [n for n in names if n in PPL_DATASETS or Path(n).suffix in (".txt", ".jsonl", ".json")]
    return {"ppl": ppl, "tasks": [n for n in names if n not in ppl]}
