"""fit callbacks (inference/training/callbacks.py): KL warm-up continued from an earlier phase."""
from types import SimpleNamespace

import pytest

from pyro_lvm.inference.training import KLWarmup
from pyro_lvm.inference.objectives import ELBO


def test_kl_warmup_continues_a_schedule_started_by_an_earlier_fit():
    """KLWarmup(epochs, start_epoch=e) is the same schedule as KLWarmup(epochs) shifted by e
    epochs (a warm start of e epochs followed by this fit), not a restart at beta = 0."""
    whole, continued = [], []
    full = KLWarmup(epochs=4)
    later = KLWarmup(epochs=4, start_epoch=2)
    state = SimpleNamespace(objective=ELBO(), steps_per_epoch=3, global_step=0,
                            log=lambda key, value: None)
    full.on_fit_start(state)
    for step in range(15):
        state.global_step = step
        full.on_step_start(state)
        whole.append(state.objective.beta)
    state.global_step = 0
    later.on_fit_start(state)
    assert state.objective.beta == 0.5
    for step in range(9):
        state.global_step = step
        later.on_step_start(state)
        continued.append(state.objective.beta)
    assert continued == whole[6:]
    assert repr(later) == "KLWarmup(epochs=4, start_epoch=2)"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="start_epoch"):
            KLWarmup(4, start_epoch=bad)
