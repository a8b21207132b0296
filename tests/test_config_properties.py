"""Property tests (hypothesis) over config and recipe inputs: whatever a user writes, the result
is a valid config or a ConfigError that names the offending key; nothing else escapes."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmprune.config import ConfigError, PruneConfig

KEYS = sorted(PruneConfig.model_fields)
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12) | st.sampled_from(["2:4", "4:8", "0:4", "5:4", "a:b", "wanda", "owl", "dsnot",
                                                     "unstructured", "auto", "none", "mlp\\.", "(", "1e-3"]))
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(st.text(max_size=6), SCALARS, max_size=2)
CONFIGS = st.dictionaries(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8), VALUES, max_size=4)
RECIPES = st.dictionaries(st.sampled_from(KEYS) | st.integers(0, 3) | st.booleans(), VALUES, max_size=4)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_or_named_error(data: dict) -> PruneConfig | None:
    try:
        cfg = PruneConfig.build(data)
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith("invalid config") and "\n  " in msg  # one line per problem
        assert any(str(k) in msg or repr(k) in msg for k in data) or "(config)" in msg, msg
        return None
    assert set(data) <= set(PruneConfig.model_fields)  # what was accepted was really validated
    assert 0 <= cfg.target_sparsity < 1 and math.isfinite(cfg.target_sparsity)
    return cfg


@PROPS
@given(CONFIGS)
def test_any_mapping_is_a_valid_config_or_a_config_error(data):
    _valid_or_named_error(data)


@PROPS
@given(CONFIGS)
def test_a_valid_config_round_trips_through_its_recipe(data):
    cfg = _valid_or_named_error(data)
    if cfg is None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(cfg.to_yaml())
        assert PruneConfig.from_yaml(path) == cfg


@PROPS
@given(st.text(max_size=80) | RECIPES.map(lambda d: yaml.safe_dump(d, allow_unicode=True)))
def test_any_recipe_text_loads_or_fails_with_a_config_error(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(text)
        try:
            PruneConfig.from_yaml(path)
        except ConfigError as e:
            assert str(path) in str(e) or "recipe" in str(e)
