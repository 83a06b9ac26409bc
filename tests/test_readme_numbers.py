"""Every number the README's Results quote comes from a committed file under benchmarks/results/."""

import re

from benchmarks.readme_numbers import NUMBER, check, found_in, results_section


def test_every_results_number_is_in_a_results_file():
    assert check() == []


def test_a_number_in_no_file_is_reported(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("## Results\n\nneedle PPL 1.2345678 in 9 min 59 s wall\n\n## Next\n")
    page = tmp_path / "results.md"
    page.write_text("# Results\n\n## A part\n\nheld-out 7.654321 at 4x\n")
    assert len(check(readme, None)) == 2
    assert [m.split(":")[0] for m in check(readme, page)] == ["README.md", "README.md", "results.md"]


def test_durations_are_read_only_from_durations(tmp_path):
    """208 evaluations are not 3.5 minutes."""
    quote = NUMBER.search("3.5 min")
    assert found_in(quote, {tmp_path / "a.json": [(208.0, "evaluations")]}) is None
    assert found_in(quote, {tmp_path / "a.json": [(208.0, "seconds")]}) is not None


def test_the_section_is_the_results_one():
    assert results_section().startswith("## Results") and not re.search(r"\n## (?!#)", results_section()[3:])


def test_a_study_gives_its_trials_parameters_and_attributes(tmp_path):
    """A trial's attention factor and short-window cost can be quoted, not only its value."""
    import optuna

    from benchmarks.readme_numbers import study_numbers

    path = tmp_path / "run-study.db"
    study = optuna.create_study(storage=f"sqlite:///{path}")
    trial = study.ask({"attention_factor": optuna.distributions.FloatDistribution(0.8, 1.3)})
    trial.set_user_attr("short_cost", 0.0196)
    trial.set_user_attr("run", "not a number")
    study.tell(trial, 2.5)
    numbers = [value for value, _ in study_numbers(path)]
    assert 0.0196 in numbers and trial.params["attention_factor"] in numbers and 2.5 in numbers
