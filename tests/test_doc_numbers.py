"""The numbers the README and docs quote: the cheap ones recomputed and compared with ``docs/numbers.json``,
and every marked spot in the docs equal to what ``docs/numbers.json`` renders.

When one fails after a change that moves a number: ``python scripts/regenerate_doc_numbers.py --write``
(add ``--expensive`` when the CelebA demo's results may have moved), then review and commit the diff.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    path = REPO / "scripts" / "regenerate_doc_numbers.py"
    spec = importlib.util.spec_from_file_location("regenerate_doc_numbers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()


@pytest.fixture(scope="module")
def numbers() -> dict:
    return script.load_numbers()


def test_cheap_numbers_have_not_drifted(numbers):
    assert script.cheap_problems(numbers) == []


def test_docs_quote_docs_numbers_json(numbers):
    assert script.doc_problems(numbers) == []


def test_a_drifted_number_is_caught(numbers):
    drifted = copy.deepcopy(numbers)
    drifted["mnist_default"]["epsilons"]["rdp"] *= 1.01
    drifted["celeba_demo"]["runs"]["dp"]["epsilons"]["pld"] += 0.01
    problems = script.cheap_problems(drifted)
    assert len(problems) == 2 and problems[0].startswith("mnist_default") and "celeba_demo dp run" in problems[1]


def test_a_stale_spot_is_reported_and_rewritten(numbers, tmp_path):
    (tmp_path / "docs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("ε ≈ <!-- numbers:mnist_default_epsilon -->9.99<!-- /numbers:mnist_default_epsilon --> (δ)\n")
    expected = f"{numbers['mnist_default']['epsilons']['rdp']:.2f}"
    problems = script.doc_problems(numbers, tmp_path)
    assert f"README.md: spot mnist_default_epsilon says '9.99', the numbers give '{expected}'" in problems
    fixed = script.rewrite(readme.read_text(), numbers, "README.md")
    assert fixed == (f"ε ≈ <!-- numbers:mnist_default_epsilon -->{expected}<!-- /numbers:mnist_default_epsilon -->"
                     " (δ)\n")
    readme.write_text(fixed)
    assert not [p for p in script.doc_problems(numbers, tmp_path) if p.startswith("README.md")]


@pytest.mark.parametrize("text,message", [
    ("<!-- numbers:no_such_spot -->1<!-- /numbers:no_such_spot -->", "unknown spot 'no_such_spot'"),
    ("<!-- numbers:mnist_default_epsilon -->2.02", "has no partner"),
    ("2.02<!-- /numbers:mnist_default_epsilon -->", "has no partner"),
])
def test_bad_markers_are_refused(numbers, text, message):
    with pytest.raises(ValueError, match=message):
        script.rewrite(text, numbers, "doc.md")


def test_celeba_table_renders_the_runs(numbers):
    table = script.SPOTS["celeba_demo_table"](numbers)
    dp = numbers["celeba_demo"]["runs"]["dp"]
    assert table.startswith("\n\n| run |") and table.endswith("|\n\n")
    assert table.count("\n| ") == 4  # header, rule, two runs
    assert f"{dp['test_accuracy']:.3f}" in table and script.fmt_delta(dp["delta"]) in table
    assert script.fmt_delta(1.5620118712902218e-05) == "1.56e-5"


@pytest.mark.slow
def test_celeba_subset_counts_are_current(numbers, tmp_path):
    """The documented demo archive and subset commands (about half a minute) give the counts the README quotes."""
    assert script.celeba_subset_facts(tmp_path) == numbers["celeba_demo"]["per_class"]
