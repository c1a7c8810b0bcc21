import pytest

from agcl_ds.metrics import bwt, fwt, op, summary

# a[i][j]: accuracy on task j after training task i
M = [[0.9, 0.1, 0.2],
     [0.5, 0.8, 0.3],
     [0.4, 0.6, 0.7]]
BASE = [0.1, 0.0, 0.1]


def test_hand_computed():
    assert op(M) == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert bwt(M) == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)  # over T-1 tasks
    assert fwt(M, BASE) == pytest.approx(((0.1 - 0.0) + (0.3 - 0.1)) / 2)
    assert summary(M, BASE) == {"OP": op(M), "BWT": bwt(M), "FWT": fwt(M, BASE)}


def test_no_forgetting_and_single_task():
    perfect = [[1.0, 0.0], [1.0, 1.0]]
    assert bwt(perfect) == 0.0 and op(perfect) == 1.0
    assert bwt([[0.7]]) is None and fwt([[0.7]], [0.1]) is None and op([[0.7]]) == 0.7


def test_shape_checked():
    with pytest.raises(ValueError, match="T x T"):
        op([[1.0, 0.0]])
    with pytest.raises(ValueError, match="expected 3 values"):
        fwt(M, [0.0])
