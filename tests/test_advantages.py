import numpy as np
import pytest
import torch

from finetune.advantages import PerPromptStatTracker, clip_advantages


def test_group_normalisation_matches_numpy():
    prompts = ["a"] * 4 + ["b"] * 4
    rewards = np.array([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])
    adv = PerPromptStatTracker(min_count=2, eps=0.0).update(prompts, rewards)
    a, b = rewards[:4], rewards[4:]
    assert np.allclose(adv[:4], (a - a.mean()) / a.std())
    assert np.allclose(adv[4:], (b - b.mean()) / b.std())


def test_global_std_and_min_count_fallback():
    prompts = ["a", "a", "b", "b"]
    rewards = np.array([0.0, 2.0, 5.0, 9.0])
    adv = PerPromptStatTracker(global_std=True, eps=0.0).update(prompts, rewards)
    assert np.allclose(adv, [-1 / rewards.std(), 1 / rewards.std(), -2 / rewards.std(), 2 / rewards.std()])
    # Fewer than min_count rewards for a prompt: the batch mean/std stand in (DDPO).
    adv = PerPromptStatTracker(min_count=3, eps=0.0).update(prompts, rewards)
    assert np.allclose(adv, (rewards - rewards.mean()) / rewards.std())


def test_buffer_across_epochs_clear_and_state():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    tracker.update(["a", "a"], [0.0, 1.0])
    adv = tracker.update(["a", "a"], [2.0, 3.0])  # buffer keeps the last 3: [1, 2, 3]
    assert np.allclose(adv, (np.array([2.0, 3.0]) - 2.0) / np.std([1.0, 2.0, 3.0]))
    clone = PerPromptStatTracker(buffer_size=3, min_count=2, eps=0.0)
    clone.load_state_dict(tracker.state_dict())
    assert np.allclose(clone.update(["a"], [4.0]), tracker.update(["a"], [4.0]))
    tracker.clear()
    assert tracker.stats == {}
    with pytest.raises(ValueError, match="2 prompts but 1 rewards"):
        tracker.update(["a", "b"], [1.0])


def test_clipping():
    assert torch.equal(clip_advantages(torch.tensor([-9.0, 0.5, 7.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))
