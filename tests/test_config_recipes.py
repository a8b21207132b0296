"""PruneConfig validation and the YAML recipes: every recipe loads, every bad value is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llmprune.config import ConfigError, PruneConfig, parse_pattern

RECIPES_DIR = Path(__file__).resolve().parents[1] / "llmprune" / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) >= 9


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_matches_its_name(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "llmprune prune" in first
    assert f"--recipe {path.stem} " in first + " "  # the command runs this very recipe, by name

    cfg = PruneConfig.from_yaml(path)
    method, _, shape = path.stem.partition("-")  # e.g. wanda-2of4, sparsegpt-50, wanda-70-owl-dsnot
    if method == "structured":  # structured-25: a quarter of the decoder's parameters removed
        assert cfg.method == "none" and cfg.structure_budget == pytest.approx(int(shape) / 100)
        assert PruneConfig.build(yaml.safe_load(cfg.to_yaml())) == cfg
        return
    shape, *steps = shape.split("-")
    assert cfg.method == method
    assert cfg.allocation == ("owl" if "owl" in steps else None)
    assert cfg.refine == ("dsnot" if "dsnot" in steps else None)
    assert cfg.reconstruct == ("admm" if "admm" in steps else None)
    assert cfg.compensate == ("eora" if "eora" in steps else None)
    if m := re.fullmatch(r"(\d+)of(\d+)", shape):
        n, mm = int(m.group(1)), int(m.group(2))
        assert cfg.nm == (n, mm)
        assert cfg.target_sparsity == pytest.approx(1 - n / mm)
    else:
        assert cfg.pattern == "unstructured"
        assert cfg.target_sparsity == pytest.approx(int(shape) / 100)
    # the YAML dump round-trips through the same validation
    assert PruneConfig.build(yaml.safe_load(cfg.to_yaml())) == cfg


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_valid_keys(tmp_path):
    path = _write(tmp_path, "method: wanda\nsparstiy: 0.5\n")
    with pytest.raises(ConfigError) as e:
        PruneConfig.from_yaml(path)
    msg = str(e.value)
    assert "unknown key 'sparstiy'" in msg
    assert str(path) in msg
    for key in ("sparsity", "pattern", "nsamples", "seqlen", "calib", "method"):
        assert key in msg.split("valid keys are:")[1]


@pytest.mark.parametrize(
    "data, fragments",
    [
        ({"sparsity": 1.5}, ["sparsity", "1.5", "[0, 1)"]),
        ({"sparsity": 1.0}, ["sparsity", "1.0", "[0, 1)"]),
        ({"sparsity": -0.1}, ["sparsity", "-0.1", "[0, 1)"]),
        ({"pattern": "3:2"}, ["'3:2'", "0 < N < M"]),
        ({"pattern": "0:4"}, ["'0:4'", "0 < N < M"]),
        ({"pattern": "2-4"}, ["'2-4'", "'unstructured' or 'N:M'"]),
        ({"pattern": "2:4", "sparsity": 0.6}, ["0.6", "2:4", "contradicts", "leave sparsity unset"]),
        ({"targets": "mlp.(gate"}, ["'mlp.(gate'", "not a valid regular expression"]),
        ({"ignore": "[down"}, ["'[down'", "not a valid regular expression"]),
        ({"device": "gpu"}, ["'gpu'", "cpu", "cuda"]),
        ({"method": "wandaa"}, ["method", "'wandaa'", "magnitude", "sparsegpt"]),
        ({"nsamples": 0}, ["nsamples", "0"]),
        ({"damp": 1.5}, ["damp", "1.5"]),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_values_name_the_value(data, fragments):
    with pytest.raises(ConfigError) as e:
        PruneConfig.build(data)
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_bad_value_in_a_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match=r"pattern = '2-4'"):
        PruneConfig.from_yaml(_write(tmp_path, "pattern: 2-4\n"))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_unquoted_nm_pattern_in_yaml(tmp_path, pattern):
    path = _write(tmp_path, f"method: wanda\npattern: {pattern}\n")
    try:
        cfg = PruneConfig.from_yaml(path)
    except ConfigError as e:  # acceptable: an error that says how to write it
        assert f"'{pattern}'" in str(e) and "quote" in str(e)
    else:
        assert cfg.pattern == pattern


def test_missing_or_non_mapping_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PruneConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        PruneConfig.from_yaml(_write(tmp_path, "- method: wanda\n"))


def test_overrides_beat_file_values(tmp_path):
    path = _write(tmp_path, "method: wanda\npattern: '2:4'\nnsamples: 128\nseqlen: 2048\ncalib: c4\n")
    cfg = PruneConfig.from_yaml(path, nsamples=4, seqlen=16, calib="data.txt", method=None)
    assert (cfg.nsamples, cfg.seqlen, cfg.calib) == (4, 16, "data.txt")
    assert cfg.method == "wanda"  # None means "not given": the file's value stays
    assert PruneConfig.from_yaml(path, method="sparsegpt").method == "sparsegpt"


def test_empty_recipe_gives_defaults(tmp_path):
    assert PruneConfig.from_yaml(_write(tmp_path, "# nothing\n")) == PruneConfig()


@pytest.mark.parametrize(
    "data, expected",
    [
        ({}, 0.5),
        ({"sparsity": 0.7}, 0.7),
        ({"sparsity": 0.0}, 0.0),
        ({"pattern": "2:4"}, 0.5),
        ({"pattern": "4:8"}, 0.5),
        ({"pattern": "1:4"}, 0.75),
        ({"pattern": "2:8", "sparsity": 0.75}, 0.75),
    ],
)
def test_target_sparsity_defaults(data, expected):
    assert PruneConfig.build(data).target_sparsity == pytest.approx(expected)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 4 : 8 ") == (4, 8)
    assert PruneConfig(pattern=" 2:4 ").pattern == "2:4"


def test_assignment_is_validated():
    cfg = PruneConfig()
    with pytest.raises(ValueError, match="out of range"):
        cfg.sparsity = 2.0
