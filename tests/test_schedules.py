"""Golden values of the lr and tau schedules, computed by hand from the paper's formulas."""
import math

import pytest

from byol_ray.schedules import learning_rate, target_decay

# peak 3.2 (0.2 x 4096/256), 10 warmup steps, 110 total: hand-computed values
LR_CASES = [
    (0, 0.0),                    # first step of warmup
    (5, 1.6),                    # half-way up: 3.2 * 5/10
    (10, 3.2),                   # end of warmup: peak
    (60, 1.6),                   # half of the 100 decay steps: 3.2 * (1 + cos(pi/2))/2
    (35, 3.2 * (1 + math.sqrt(0.5)) / 2),  # a quarter: cos(pi/4)
    (110, 0.0),                  # last
    (500, 0.0),                  # past the end stays at 0
]


@pytest.mark.parametrize("step,expected", LR_CASES)
def test_learning_rate_golden(step, expected):
    assert learning_rate(step, peak_lr=3.2, warmup_steps=10, total_steps=110) == pytest.approx(expected, abs=1e-12)


def test_learning_rate_without_warmup_starts_at_peak():
    assert learning_rate(0, peak_lr=1.0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


TAU_CASES = [
    (0, 0.996),                                # tau_base at the start
    (50, 1 - 0.004 * 0.5),                     # half-way: (cos(pi/2) + 1)/2 = 0.5
    (25, 1 - 0.004 * (math.sqrt(0.5) + 1) / 2),
    (100, 1.0),                                # K: tau = 1
]


@pytest.mark.parametrize("step,expected", TAU_CASES)
def test_target_decay_golden(step, expected):
    assert target_decay(step, tau_base=0.996, total_steps=100) == pytest.approx(expected, abs=1e-12)


def test_target_decay_is_monotone():
    taus = [target_decay(k, tau_base=0.99, total_steps=37) for k in range(38)]
    assert all(b >= a for a, b in zip(taus, taus[1:]))
