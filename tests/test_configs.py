"""Every config this repository ships validates against its schema, and the factor files it names exist
and load (a user copies these first)."""

from pathlib import Path

import pytest

from fitness.baselines import BASELINES
from fitness.config_io import load_yaml, read_yaml
from fitness.factor_files import load_factor_file
from mixed_window_train.finetune import FinetuneConfig
from mixed_window_train.pretrain import PretrainConfig
from search.config import SearchConfig
from search.evaluate import EvalConfig

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def schema(path: Path):
    if path.name.startswith("eval-"):
        return EvalConfig
    if path.name.startswith("train-"):
        return FinetuneConfig
    return SearchConfig


def factor_files(config) -> list[str]:
    """The factor files and run folders a config names (method names are not files)."""
    if isinstance(config, EvalConfig):
        return [value for value in config.factors.values() if value not in BASELINES]
    if isinstance(config, FinetuneConfig):
        return [config.factors] if config.factors not in BASELINES else []
    return [config.long_factors] if config.long_factors else []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_a_shipped_config_validates_and_its_factor_files_load(path):
    config = load_yaml(path, schema(path))
    for name in factor_files(config):
        file = REPO / name
        candidate = load_factor_file(file / "best_factors.json" if file.is_dir() else file)
        assert len(candidate.long_factors) == candidate.geometry.pairs


def test_the_bundled_model_recipe_validates():
    config = load_yaml(REPO / "models/tiny-llama/recipe.yaml", PretrainConfig)
    assert config.window == 256 and config.architecture.head_dim == 64


def test_there_are_configs_of_every_kind():
    assert {schema(p) for p in SHIPPED} == {SearchConfig, EvalConfig, FinetuneConfig}


@pytest.mark.parametrize("name", ["smollm2-16k.yaml", "smollm2-32k.yaml"])
def test_smollm2_searches_mix_formats_and_hold_out_unseen_ones(name):
    config = load_yaml(REPO / "configs" / name, SearchConfig)
    assert len(config.needles.formats) >= 3
    unseen = set(config.holdout.formats) - set(config.needles.formats)
    assert len(unseen) >= 2 and unseen == set(config.holdout.formats)
    assert not set(config.holdout.haystack) & set(config.needles.haystack)


def test_the_bundled_default_searches_and_holds_out_magic_numbers_only():
    config = load_yaml(REPO / "configs" / "default.yaml", SearchConfig)
    assert config.needles.formats == config.holdout.formats == ["magic_number"]
    assert config.needles.wordings == config.holdout.wordings == "first"


def test_without_a_holdout_section_the_formats_and_haystack_are_ones_the_search_never_used():
    config = SearchConfig(scale=2, needles={"formats": ["magic_number", "pass_key"], "haystack": ["pydoc"]})
    assert len(config.holdout.formats) >= 2 and not set(config.holdout.formats) & {"magic_number", "pass_key"}
    assert config.holdout.haystack and not set(config.holdout.haystack) & {"pydoc"}


SEARCHES = [p for p in SHIPPED if schema(p) is SearchConfig]


@pytest.mark.parametrize("path", SEARCHES, ids=[p.name for p in SEARCHES])
def test_a_shipped_search_passes_every_check_a_search_makes(path):
    """Beyond the schema: its model, target, space, haystacks and short-stage seeds (a seed outside the short
    space was once clamped and reported under its own name)."""
    from search import runs

    runs.load_search_config(path)


def test_the_yarn_control_is_the_searched_fine_tune_but_for_its_factors():
    """Same data, steps, seed, tokens and held-out needles: only the name, the factors and the target differ."""
    searched = read_yaml(REPO / "configs" / "train-smollm2-32k.yaml")
    control = read_yaml(REPO / "configs" / "train-smollm2-32k-yarn.yaml")
    assert control.pop("factors") == "yarn" and control.pop("target_window") == 32768
    assert control.pop("name") != searched.pop("name")
    searched.pop("factors")
    assert control == searched
    needles = load_yaml(REPO / "configs" / "train-smollm2-32k.yaml", FinetuneConfig).evaluation.needles
    assert needles.formats == ["magic_number", "pass_key", "key_value", "multi_needle", "word"]
    assert needles.haystack == ["idle"] and needles.seed == 1000 and needles.documents == 8 * 5


def test_an_attention_factor_is_a_name_or_a_number_and_the_kernel_key_keeps_its_old_name(tmp_path):
    """`space.attention: 1.05` (unquoted) is the factor 1.05; `model.attention`, the old name of the kernel
    key, still loads (with a warning) and a run created under it still resumes."""
    import warnings

    import yaml

    from search import runs
    from search.config import unresumable_changes
    from search.space import RopeSpace
    from tests.search_helpers import write_config

    path = write_config(tmp_path, **{"space.attention": 1.05, "model.attention": "eager"})
    assert "attention: 1.05" in path.read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = runs.load_search_config(path)
    assert any("attn_implementation" in str(w.message) for w in caught)
    assert config.model.attn_implementation == "eager" and config.space.attention == 1.05
    from fitness.geometry import geometry_from_config
    from fitness.models import load_config

    geometry = geometry_from_config(load_config("tiny"))
    assert RopeSpace(geometry, 1024, config.space).attention == 1.05
    old = yaml.safe_load(path.read_text())  # what a study created before the rename kept
    old["model"] = {**config.model.model_dump(mode="json"), "attention": "eager"}
    del old["model"]["attn_implementation"]
    saved = {**config.model_dump(mode="json"), "model": old["model"]}
    assert unresumable_changes(saved, config.model_dump(mode="json")) == []


def test_a_key_added_since_the_study_began_is_not_an_edit(tmp_path):
    """The 64k search, begun before `short_guard.bound_attention` existed, was refused on resume as if its
    config had been edited. A key the study's config lacks, at the default that keeps the old behaviour, is
    no change; setting it is."""
    from search import runs
    from search.config import unresumable_changes
    from tests.search_helpers import write_config

    config = runs.load_search_config(write_config(tmp_path, **{"short_guard.max_cost": 0.01}))
    saved = config.model_dump(mode="json")
    del saved["short_guard"]["bound_attention"]  # what the older version kept
    assert unresumable_changes(saved, config.model_dump(mode="json")) == []
    edited = config.model_copy(update={"short_guard": config.short_guard.model_copy(update={"bound_attention": True})})
    assert unresumable_changes(saved, edited.model_dump(mode="json")) == ["short_guard.bound_attention"]
