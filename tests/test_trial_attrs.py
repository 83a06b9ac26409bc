"""What optuna-dashboard shows of a search (issue 16): each trial's generation, critical pair and scores per
needle format, and the objective's name, on a small pruned search of the bundled model."""

import math

import pytest
from optuna.trial import TrialState

from fitness.needles import build_needle_set
from search import long_stage, runs
from search.slots import slot_of
from tests.search_helpers import write_config

FORMATS = ["magic_number", "pass_key"]
FIRST = 2  # first-stage documents of 4
SEARCH = {"needles.formats": FORMATS, "pruning.name": "earlier_trials", "pruning.documents": FIRST,
          "pruning.min_reference": 4}


@pytest.mark.parametrize("sampler", ["evolution", "tpe"])
def test_each_trial_carries_what_the_dashboard_shows(tiny, tmp_path, sampler):
    changes = {**SEARCH, "sampler.name": sampler}
    if sampler == "tpe":
        changes["budget.evaluations"] = 8
    config = runs.load_search_config(write_config(tmp_path, **changes))
    run_dir = runs.create(config, tmp_path / "runs")
    runs.run(run_dir, quiet=True)
    ctx = long_stage.open_context(run_dir, runs.load(run_dir))
    assert ctx.study.metric_names == ["needle_ppl"]  # the dashboard's label for the told value
    trials = ctx.study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    states = {t.state for t in trials}
    assert TrialState.PRUNED in states or sampler == "tpe"  # evolution: both stages' joins are checked

    _, tokenizer = tiny
    formats = build_needle_set(tokenizer, config.needles, ctx.target).formats()
    assert list(formats) == FORMATS or list(formats) == FORMATS[::-1]
    for trial in trials:
        attrs = trial.user_attrs
        slot = slot_of(trial)
        assert attrs.get("generation") == (slot[0] if slot else None)  # Optuna's own samplers have none
        # a parameter already, so the dashboard shows it without a user attribute
        assert trial.params["critical_dim"] == ctx.candidate(trial.params).params["critical_dim"]
        nll = attrs["document_nll"]  # the documents this trial was scored on: the first FIRST when pruned
        assert len(nll) == (FIRST if trial.state == TrialState.PRUNED else 4)
        seen = 0
        for name, docs in formats.items():
            docs = [j for j in docs if j < len(nll)]
            if not docs:
                assert f"ppl:{name}" not in attrs
                continue
            assert attrs[f"ppl:{name}"] == pytest.approx(math.exp(sum(nll[j] for j in docs) / len(docs)), rel=1e-12)
            seen += len(docs) * attrs[f"retrieval:{name}"]
        assert seen / len(nll) == pytest.approx(attrs["retrieval"])
