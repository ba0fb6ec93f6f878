"""`mm demo` end to end on the mini dataset: the learned alignment must beat chance clearly."""

import json
import shutil

import pytest


@pytest.mark.slow
def test_demo_reaches_three_times_chance_in_every_direction(mm, mini_root, tmp_path):
    shutil.copytree(mini_root, tmp_path / "demo" / "data")  # the synthesis itself is tested elsewhere
    result = mm("demo", "--workdir", tmp_path / "demo", "--device", "cpu")
    assert result.exit_code == 0, result.output
    steps = [line[:5] for line in result.out.splitlines() if line.startswith("[")]
    assert steps == ["[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"]
    evaluation = json.loads((tmp_path / "demo" / "runs" / "mmn-tiny" / "eval-test.json").read_text())
    directions = evaluation["directions"]
    assert len(directions) == 6
    for name, metrics in directions.items():
        assert metrics["R@10"] >= 3 * metrics["chance@10"], f"{name}: {metrics}"
    assert "6 of 6 directions reach R@10 ≥ 3 × chance" in result.out
