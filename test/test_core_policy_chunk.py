"""Policy.pending(): the rest of the predicted action chunk after the action `act` returned."""
import numpy as np
import torch

from vdd_ros.core.policy import ModelPolicy, Policy, PolicySpec


class Planner(torch.nn.Module):
    """A model whose chunk is known: step k of the chunk is (query index * 10 + k) everywhere."""

    def __init__(self, horizon: int, action_dim: int) -> None:
        super().__init__()
        self.horizon, self.action_dim, self.queries = horizon, action_dim, 0

    def predict(self, window, generator=None, diagnostics=False):
        base = self.queries * 10.0
        self.queries += 1
        steps = torch.arange(self.horizon, dtype=torch.float32) + base
        return steps[None, :, None].expand(1, self.horizon, self.action_dim).clone(), {}


def test_pending_is_the_queue_then_the_predictions_beyond_action_exec():
    spec = PolicySpec(obs_fields=[('x', 2)], action_dim=3, action_horizon=4, action_exec=2)
    policy = ModelPolicy(Planner(4, 3), spec)
    policy.reset(0)
    assert policy.pending().shape == (0, 3)
    obs = np.zeros(2, np.float32)
    assert policy.act(obs)[0] == 0.0
    pending = policy.pending()
    assert pending.dtype == np.float32 and pending[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert policy.act(obs)[0] == 1.0                  # the queued action comes next
    assert policy.pending()[:, 0].tolist() == [2.0, 3.0]
    assert policy.act(obs)[0] == 10.0                 # the queue ran out: a new query
    assert policy.pending()[:, 0].tolist() == [11.0, 12.0, 13.0]
    policy.reset(1)
    assert policy.pending().shape == (0, 3)


def test_a_policy_without_chunks_has_nothing_pending():
    class Constant(Policy):
        spec = PolicySpec(obs_fields=[('x', 1)], action_dim=2)
        info: dict = {}

        def reset(self, seed=None):
            pass

        def act(self, obs):
            return np.ones(2, np.float32)

    assert Constant().pending().shape == (0, 2)
