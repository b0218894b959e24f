import math

import pytest

from ckptavg import schedules
from ckptavg.errors import ScheduleError


class TestSwa:
    def test_equal_weights_sum_to_one(self):
        weights = schedules.swa().weights(7)
        assert weights == [1 / 7] * 7
        assert math.isclose(sum(weights), 1.0)

    def test_no_checkpoints_is_an_error(self):
        with pytest.raises(ScheduleError, match="no checkpoints"):
            schedules.swa().weights(0)


class TestEma:
    @pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 1.0])
    def test_weights_equal_unrolled_torch_update(self, decay):
        # torch's AveragedModel copies the first checkpoint, then lerps each next one in.
        count = 6
        unrolled = [1.0] + [0.0] * (count - 1)
        for k in range(1, count):
            unrolled = [w * decay for w in unrolled]
            unrolled[k] += 1 - decay
        assert schedules.ema(decay).weights(count) == pytest.approx(unrolled, abs=1e-15)
        assert math.isclose(sum(schedules.ema(decay).weights(count)), 1.0)

    def test_single_checkpoint_gets_all_weight(self):
        assert schedules.ema(0.9).weights(1) == [1.0]

    @pytest.mark.parametrize("decay", [-0.1, 1.5, float("nan")])
    def test_decay_outside_unit_interval_is_refused(self, decay):
        with pytest.raises(ScheduleError, match="`decay` must be between 0 and 1"):
            schedules.ema(decay)

    def test_warns_when_one_checkpoint_dominates(self):
        (warning,) = schedules.ema(0.999).warnings(10)
        assert "99.1% of the weight on checkpoint 1" in warning
        assert "`decay=0.92`" in warning

    def test_no_warning_for_balanced_weights(self):
        assert schedules.ema(0.7).warnings(4) == []

    @pytest.mark.parametrize("count", [2, 3, 10, 100])
    def test_suggested_decay_keeps_every_weight_at_most_half(self, count):
        decay = schedules.suggest_decay(count)
        assert max(schedules.ema(decay).weights(count)) <= 0.5


class TestWeighted:
    def test_normalized_to_sum_to_one(self):
        assert schedules.weighted([1, 1, 2]).weights(3) == [0.25, 0.25, 0.5]

    def test_count_must_match(self):
        with pytest.raises(ScheduleError, match="3 values for 2 checkpoints"):
            schedules.weighted([1, 2, 3]).weights(2)

    @pytest.mark.parametrize("weights", [[0, 0], [1, -1], [float("inf"), 1]])
    def test_bad_weights_are_refused(self, weights):
        with pytest.raises(ScheduleError, match="`weights`"):
            schedules.weighted(weights)
