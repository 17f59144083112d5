"""Average and forgetting on hand-made matrices."""
import math

import pytest

from fastcp.eval.metrics import learned, summarize


def test_average_and_forgetting_higher_is_better():
    m = [[0.9, 0.1, 0.0],
         [0.5, 0.8, 0.1],
         [0.3, 0.6, 1.0]]
    s = summarize(m, higher_is_better=True)
    assert s["average"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    # concept 0: max(0.9, 0.5, 0.3) - 0.3 = 0.6 ; concept 1: max(0.8, 0.6) - 0.6 = 0.2
    assert s["forgetting"] == pytest.approx((0.6 + 0.2) / 2)


def test_forgetting_of_a_loss_flips_sign():
    m = [[0.10, 0.5],
         [0.30, 0.2]]
    s = summarize(m, higher_is_better=False)
    assert s["average"] == pytest.approx(0.25)
    assert s["forgetting"] == pytest.approx(0.30 - 0.10)


def test_no_forgetting_and_single_task():
    assert summarize([[1.0, 0.0], [1.0, 1.0]])["forgetting"] == 0.0
    s = summarize([[0.7]])
    assert s == {"average": 0.7, "forgetting": 0.0}
    assert not math.isnan(summarize([[0.2, 0.4], [0.9, 0.1]])["forgetting"])


def test_bad_matrix():
    with pytest.raises(ValueError, match="matrix"):
        summarize([[1.0, 2.0]])


def test_learned_is_the_diagonal_mean():
    # A method that never learns concept 2 forgets nothing, and "learned" shows it.
    m = [[1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 0.0]]
    assert summarize(m)["forgetting"] == 0.0
    assert learned(m) == 0.5
    with pytest.raises(ValueError, match="square"):
        learned([[1.0, 2.0]])


def test_forgetting_norms_and_an_unmeasured_upper_triangle():
    nan = math.nan
    m = [[0.9, nan, nan],
         [0.5, 0.8, nan],
         [0.3, 0.6, 1.0]]
    drops = (0.9 - 0.3) + (0.8 - 0.6)
    assert summarize(m)["forgetting"] == pytest.approx(drops / 2)  # ÷(T-1), the default
    assert summarize(m, forgetting_norm="t")["forgetting"] == pytest.approx(drops / 3)  # ÷T, luk-st/continual-lora
    assert summarize(m)["average"] == pytest.approx((0.3 + 0.6 + 1.0) / 3)
    assert learned(m) == pytest.approx((0.9 + 0.8 + 1.0) / 3)
    with pytest.raises(ValueError, match="forgetting_norm"):
        summarize(m, forgetting_norm="T")


def test_reports_leave_unlearned_cells_blank(tmp_path):
    from fastcp.eval.report import format_matrix, save_heatmap

    m = [[0.9, None], [0.5, 0.8]]  # as results.json holds it
    assert format_matrix(m, ["a", "b"], "fidelity").splitlines()[2].split() == ["after", "1", "0.900", "–"]
    assert format_matrix([[0.9, math.nan], [0.5, 0.8]], ["a", "b"], "x").splitlines()[2].split()[-1] == "–"
    save_heatmap([[0.9, math.nan], [0.5, 0.8]], ["a", "b"], "fidelity", tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
