"""A small DDPG agent (Lillicrap et al. 2016, https://arxiv.org/abs/1509.02971) in the shape AMC
used for per-layer compression ratios (He et al. 2018, https://arxiv.org/abs/1802.03494):
actor and critic MLPs, target copies with soft updates, a replay buffer, truncated-normal
exploration noise, and a moving-average reward baseline.

Everything the agent holds is exported as named tensors (:meth:`DDPG.tensors`) plus a JSON-able
dict (:meth:`DDPG.scalars`) so a search can be checkpointed with safetensors, without pickle.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Actor(nn.Module):
    """Maps a layer's state to a pruning ratio in (0, 1) (scaled to the allowed range outside)."""

    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(state))


class Critic(nn.Module):
    """Q(state, action): the expected (baseline-subtracted) reward of taking ``action``."""

    def __init__(self, state_dim: int, hidden: int) -> None:
        super().__init__()
        self.state_in = nn.Linear(state_dim, hidden)
        self.action_in = nn.Linear(1, hidden)
        self.net = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(self.state_in(state) + self.action_in(action))


class ReplayBuffer:
    """A fixed-size circular buffer of transitions ``(s, a, r, s', done)`` held as tensors."""

    def __init__(self, capacity: int, state_dim: int) -> None:
        self.capacity = capacity
        self.states = torch.zeros(capacity, state_dim)
        self.actions = torch.zeros(capacity, 1)
        self.rewards = torch.zeros(capacity, 1)
        self.next_states = torch.zeros(capacity, state_dim)
        self.dones = torch.zeros(capacity, 1)
        self.size = 0
        self.cursor = 0

    def add(self, state: torch.Tensor, action: float, reward: float, next_state: torch.Tensor,
            done: bool) -> None:
        """Store one transition, overwriting the oldest when full."""
        i = self.cursor
        self.states[i] = state
        self.actions[i, 0] = action
        self.rewards[i, 0] = reward
        self.next_states[i] = next_state
        self.dones[i, 0] = float(done)
        self.cursor = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A uniformly sampled mini-batch (with replacement), drawn from ``generator``."""
        idx = torch.randint(0, self.size, (batch,), generator=generator)
        return (self.states[idx], self.actions[idx], self.rewards[idx], self.next_states[idx],
                self.dones[idx])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored part of the buffer, for checkpoints."""
        n = self.size
        return {"states": self.states[:n], "actions": self.actions[:n], "rewards": self.rewards[:n],
                "next_states": self.next_states[:n], "dones": self.dones[:n]}

    def load(self, tensors: dict[str, torch.Tensor], cursor: int) -> None:
        """Restore what :meth:`tensors` exported."""
        n = tensors["states"].shape[0]
        for key in ("states", "actions", "rewards", "next_states", "dones"):
            getattr(self, key)[:n] = tensors[key]
        self.size, self.cursor = n, cursor


def truncated_normal(mean: float, std: float, low: float, high: float,
                     generator: torch.Generator) -> float:
    """One sample of N(mean, std) truncated to [low, high], by inverting the normal CDF (so it
    is exact and draws a single uniform from ``generator``)."""
    if std <= 0 or high <= low:
        return min(max(mean, low), high)
    a = torch.special.ndtr(torch.tensor((low - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((high - mean) / std, dtype=torch.float64))
    u = torch.rand((), generator=generator, dtype=torch.float64)
    p = (a + u * (b - a)).clamp(1e-12, 1 - 1e-12)
    return float(min(max(mean + std * float(torch.special.ndtri(p)), low), high))


class DDPG:
    """Actor-critic agent with target networks, replay and a reward baseline (AMC's recipe)."""

    def __init__(self, state_dim: int, *, hidden: int, lr_actor: float, lr_critic: float,
                 tau: float, discount: float, batch_size: int, buffer_size: int,
                 baseline_alpha: float, seed: int, reward_norm: str = "baseline") -> None:
        # Network initialisation uses its own seeded RNG so it never disturbs (or depends on)
        # the global torch RNG: the same seed always gives the same agent.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.actor = Actor(state_dim, hidden)
            self.critic = Critic(state_dim, hidden)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=lr_critic)
        self.buffer = ReplayBuffer(buffer_size, state_dim)
        self.tau, self.discount, self.batch_size = tau, discount, batch_size
        self.baseline_alpha = baseline_alpha
        self.reward_norm = reward_norm
        self.baseline: float | None = None
        self.updates = 0

    @torch.no_grad()
    def act(self, state: torch.Tensor) -> float:
        """The deterministic policy's action in (0, 1)."""
        return float(self.actor(state.unsqueeze(0))[0, 0])

    def update(self, generator: torch.Generator) -> dict[str, float]:
        """One DDPG step: critic regression to the bootstrapped target, actor ascent on Q,
        then soft target updates.

        ``reward_norm`` ``"baseline"`` (AMC) centres rewards on a moving-average baseline, so the
        critic learns which ratios beat the recent average, not the accuracy level;
        ``"zscore"`` also divides by their spread: rewards become z-scores over every reward in
        the replay buffer, so episodes a fraction of a point apart give targets of order one."""
        if self.buffer.size < min(self.batch_size, 2):
            return {}
        s, a, r, s1, done = self.buffer.sample(self.batch_size, generator)
        if self.reward_norm == "zscore":
            stored = self.buffer.rewards[: self.buffer.size]
            self.baseline = float(stored.mean())
            r = (r - self.baseline) / (float(stored.std()) + 1e-8)
        else:
            mean_r = float(r.mean())
            self.baseline = mean_r if self.baseline is None else (
                self.baseline + self.baseline_alpha * (mean_r - self.baseline))
            r = r - self.baseline
        with torch.no_grad():
            future = self.critic_target(s1, self.actor_target(s1))
            target = r + self.discount * (1.0 - done) * future
        critic_loss = F.mse_loss(self.critic(s, a), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, q in zip(net.parameters(), tgt.parameters()):
                    q.mul_(1 - self.tau).add_(p, alpha=self.tau)
        self.updates += 1
        return {"critic_loss": critic_loss.item(), "actor_loss": actor_loss.item()}

    # -- checkpointing ----------------------------------------------------------------------

    _NETS = ("actor", "critic", "actor_target", "critic_target")
    _OPTS = ("actor_opt", "critic_opt")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the agent (networks, optimiser moments, replay), flat-named."""
        out: dict[str, torch.Tensor] = {}
        for name in self._NETS:
            for key, value in getattr(self, name).state_dict().items():
                out[f"{name}.{key}"] = value
        for name in self._OPTS:
            for idx, state in getattr(self, name).state_dict()["state"].items():
                for key, value in state.items():
                    out[f"{name}.{idx}.{key}"] = torch.as_tensor(value)
        for key, value in self.buffer.tensors().items():
            out[f"buffer.{key}"] = value
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    def scalars(self) -> dict[str, Any]:
        """The agent's non-tensor state (JSON-able)."""
        groups = {n: getattr(self, n).state_dict()["param_groups"] for n in self._OPTS}
        return {"baseline": self.baseline, "updates": self.updates, "cursor": self.buffer.cursor,
                "opt_groups": groups}

    def load(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        """Restore what :meth:`tensors` and :meth:`scalars` exported."""
        for name in self._NETS:
            prefix = f"{name}."
            getattr(self, name).load_state_dict(
                {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name in self._OPTS:
            prefix = f"{name}."
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    idx, field = key[len(prefix):].split(".", 1)
                    state.setdefault(int(idx), {})[field] = value.clone()
            getattr(self, name).load_state_dict(
                {"state": state, "param_groups": scalars["opt_groups"][name]})
        self.buffer.load({k[len("buffer."):]: v for k, v in tensors.items()
                          if k.startswith("buffer.")}, scalars["cursor"])
        self.baseline = scalars["baseline"]
        self.updates = scalars["updates"]
