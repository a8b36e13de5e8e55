"""The run schedule: iteration budgets (reproducible), the wall-clock guard, the learning-rate curve."""

import pytest
import torch

from attrimeter.engine.runs import RunConfig, Schedule, lr_factor


def _optim() -> torch.optim.Optimizer:
    optim = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    optim.param_groups[0]["base_lr"] = 1.0
    return optim


def _run(schedule: Schedule, sampler: list[int], optim: torch.optim.Optimizer) -> list[tuple[int, float]]:
    seen = []
    for batch in schedule.batches(sampler, optim):
        seen.append((batch, optim.param_groups[0]["lr"]))
        schedule.iteration += 1
    return seen


def test_schedule_runs_exactly_epochs_times_batches_whatever_the_time_limit():
    config = RunConfig(epochs=3, max_minutes=60.0, warmup_fraction=0.0, min_lr_factor=0.0)
    schedule = Schedule(config, batches_per_epoch=4)
    seen = _run(schedule, [0, 1, 2, 3], _optim())
    assert [b for b, _ in seen] == [0, 1, 2, 3] * 3
    assert schedule.iteration == 12 and schedule.stopped_early is None
    # Cosine from 1 towards 0 over 12 iterations, by iteration count alone.
    assert [lr for _, lr in seen] == pytest.approx([lr_factor(i / 12, 0.0, 0.0) for i in range(12)])


def test_schedule_time_guard_stops_with_a_warning():
    config = RunConfig(epochs=1000, max_minutes=1e-9)
    schedule = Schedule(config, batches_per_epoch=2)
    with pytest.warns(RuntimeWarning, match="max_minutes"):
        seen = _run(schedule, [0, 1], _optim())
    assert len(seen) < 2000
    assert "stopped by the max_minutes" in schedule.stopped_early


def test_schedule_resumes_where_it_stopped():
    config = RunConfig(epochs=2, warmup_fraction=0.0)
    first, resumed = Schedule(config, 3), Schedule(config, 3, iteration=4)
    full = _run(first, [0, 1, 2], _optim())
    rest = _run(resumed, [0, 1, 2], _optim())
    assert len(full) == 6 and len(rest) == 2
    assert [lr for _, lr in rest] == pytest.approx([lr for _, lr in full[4:]])
