"""Each method's options are declared beside the method (a small settings model) and composed into
PruneConfig: the same keys, defaults, limits, help and messages as one flat config, in a fixed order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmprune.activation.options import ActivationOptions
from llmprune.config import ConfigError, PruneConfig, _Core, option_owners
from llmprune.pruners.alps import ALPS, ALPSOptions
from llmprune.pruners.ria import RIA, RIAOptions
from llmprune.pruners.sparsegpt import SparseGPT, SparseGPTOptions
from llmprune.registry import PRUNERS, register_pruner
from llmprune.steps.admm import ADMM, ADMMOptions
from llmprune.steps.dsnot import DSnoT, DSnoTOptions
from llmprune.steps.eora import EoRA, EoRAOptions
from llmprune.steps.evopress import Search, SearchOptions
from llmprune.steps.owl import OWL, OWLOptions
from llmprune.structured.options import StructureOptions

METHODS = [(SparseGPT, SparseGPTOptions), (RIA, RIAOptions), (DSnoT, DSnoTOptions), (ALPS, ALPSOptions),
           (ADMM, ADMMOptions), (EoRA, EoRAOptions), (OWL, OWLOptions), (Search, SearchOptions)]


def _same_field(a, b) -> bool:
    return (a.annotation, a.default, a.metadata, a.description) == (b.annotation, b.default, b.metadata, b.description)


@pytest.mark.parametrize("method, options", METHODS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_methods_options_are_its_models_fields_and_config_fields(method, options):
    assert method.options == tuple(options.model_fields)
    for name, field in options.model_fields.items():
        assert _same_field(PruneConfig.model_fields[name], field), name
        assert method.name in option_owners()[name]


def test_damp_is_declared_once_and_shared():
    damp = SparseGPTOptions.model_fields["damp"]
    for options in (ALPSOptions, EoRAOptions):
        assert _same_field(options.model_fields["damp"], damp)
    owners = option_owners()["damp"]  # other methods may share it too (activation, flap, search)
    assert {"sparsegpt", "alps", "eora"} <= owners and "admm" not in owners  # ADMM has its own admm_damp
    assert option_owners()["admm_damp"] == {"admm"}


def test_fields_keep_their_order_core_options_activation_engine():
    expected = list(_Core.model_fields)
    for options in (*(o for _, o in METHODS), ActivationOptions, StructureOptions):
        expected += [n for n in options.model_fields if n not in expected]
    expected += ["sequential", "execution", "batch_size", "eval", "save_format"]
    assert list(PruneConfig.model_fields) == expected
    assert expected[:2] == ["model", "method"] and expected[23:27] == ["blocksize", "damp", "act_order", "nm_exact"]


def test_an_options_model_validates_alone_and_within_the_config():
    assert DSnoTOptions().dsnot_skip and ALPSOptions().damp == 0.01
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        DSnoTOptions(dsnot_skip="(")
    with pytest.raises(ConfigError, match=r"dsnot_skip = '\(': '\(' is not a valid regular expression"):
        PruneConfig.build({"refine": "dsnot", "dsnot_skip": "("})
    with pytest.raises(ConfigError, match="damp = 1.5: Input should be less than 1"):
        PruneConfig.build({"method": "alps", "damp": 1.5})


def test_activation_options_alone_and_stray_activation_settings():
    assert ActivationOptions(activation="teal").activation_target == 0.5
    assert PruneConfig(activation="wina", activation_holdout="none").activation_holdout is None
    with pytest.raises(ConfigError, match="activation_sparsity set but no activation criterion"):
        PruneConfig.build({"method": "none", "activation_sparsity": 0.3})  # named before method 'none'


def test_selected_methods_run_their_own_config_checks():
    with pytest.raises(ConfigError, match=r"nm_exact=true would score C\(32, 16\)"):
        PruneConfig.build({"method": "sparsegpt", "nm_exact": True, "module_sparsity": {"mlp": "16:32"}})

    class _Picky(SparseGPT):
        name = "picky"
        seen: list = []

        @classmethod
        def check_config(cls, config) -> None:
            cls.seen.append(config.pattern)
            if config.blocksize == 7:
                raise ValueError("blocksize 7 is unlucky; choose another")

    register_pruner(_Picky)
    try:
        PruneConfig.build({"method": "picky", "pattern": "2:4"})
        assert _Picky.seen == ["2:4"]
        with pytest.raises(ConfigError, match="blocksize 7 is unlucky"):
            PruneConfig.build({"method": "picky", "blocksize": 7})
    finally:
        PRUNERS.pop("picky", None)
