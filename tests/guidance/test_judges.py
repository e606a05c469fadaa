"""Judges are found by name among installed packages (entry-point group `cvg.judges`)."""

import numpy as np
import pytest

from cvg.cli import main
from cvg.guidance.composition import Composition
from cvg.guidance.judges import Verdict, installed_judges, load_judge
from cvg_research.compshapes import judge as compshapes


def test_the_compshapes_judge_is_installed_by_cvg_research_and_judges():
    assert "compshapes" in installed_judges()
    judge = load_judge("compshapes")
    assert judge is compshapes.judge
    empty = np.full((3, 32, 32, 3), 200, np.uint8)
    verdict = judge(empty, Composition.parse("red cube left of blue ball"))
    assert isinstance(verdict, Verdict) and not verdict.ok and verdict.failure == "drawing"


def test_an_unknown_judge_is_a_one_line_error_naming_those_installed(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"no judge 'oracle' is installed \(installed: .*compshapes"):
        load_judge("oracle")
    # refused before the model is read: the model directory does not even exist
    args = ["generate", "--model", str(tmp_path / "none"), "--prompt", "p", "--out", str(tmp_path / "o.mp4")]
    assert main([*args, "--judge", "oracle"]) == 2
    assert "no judge 'oracle' is installed" in capsys.readouterr().err
