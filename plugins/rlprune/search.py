"""The episode loop: roll out the policy layer by layer, score the pruned model, learn, keep the
best episode, checkpoint after every episode (so an interrupted search resumes)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from netshrink.plugins.rlprune import checkpoint
from netshrink.plugins.rlprune.ddpg import DDPG, truncated_normal
from netshrink.plugins.rlprune.env import BudgetModel

EpisodeCallback = Callable[[int, float, float], None]
"""Called after each episode (and its checkpoint) with ``(episode, reward, best_reward)``."""


@dataclass
class SearchState:
    """Where a search stands; JSON-able so it goes into the checkpoint."""

    episode: int = 0
    """Episodes completed (the next episode's index)."""
    best_reward: float = -math.inf
    best_loss: float = math.inf
    best_accuracy: float = 0.0
    best_ratios: list[float] | None = None
    best_episode: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    search_time_s: float = 0.0
    """Search time summed over every run that contributed (resumed runs add up)."""
    resumed_from: int | None = None


@dataclass
class SearchSettings:
    """The search knobs the loop needs (taken from the compressor's config)."""

    episodes: int
    warmup: int
    noise: float
    noise_decay: float
    reward: str
    prior: list[float] | None = None
    """Ratios to explore around during warm-up (episode 0 takes them as they are)."""
    refit_best: bool = False
    """When warm-up ends, fit the actor to the best episode so far (behaviour cloning), so
    the learned episodes explore around it instead of around an untrained policy."""


def layer_state(static: torch.Tensor, budget: BudgetModel, prefix: list[float]) -> torch.Tensor:
    """The state of the next layer: its static descriptors plus what the episode has done so
    far (fraction removed, weights still ahead, budget still to remove, previous action)."""
    t = len(prefix)
    total = budget.total
    removed = budget.removed(prefix + [0.0] * (len(budget.params) - t))
    ahead = sum(budget.params[t + 1 :])
    dynamic = torch.tensor(
        [
            removed / total,
            ahead / total,
            (budget.target - removed) / total,
            prefix[-1] if prefix else 0.0,
        ],
        dtype=torch.float32,
    )
    return torch.cat([static[t], dynamic])


def clip_to_budget(budget: BudgetModel, prefix: list[float], ratio: float) -> float:
    """The next layer's ``ratio`` clipped to what keeps the global target reachable after
    ``prefix`` (AMC's action wall: every episode meets the target whatever is proposed)."""
    lo, hi = budget.bounds(prefix)
    return min(max(ratio, lo), hi)


def project(budget: BudgetModel, proposal: list[float]) -> list[float]:
    """A whole proposed ratio vector made to meet the target, layer by layer, exactly as a
    rollout clips its actions (what the random and evolutionary searches use)."""
    ratios: list[float] = []
    for ratio in proposal:
        ratios.append(clip_to_budget(budget, ratios, ratio))
    return ratios


def record_episode(
    state: SearchState,
    episode: int,
    ratios: list[float],
    acc: float,
    loss: float,
    reward_kind: str,
    sigma: float,
) -> float:
    """Book one scored episode into ``state`` (best so far, history) and return its reward;
    shared by every agent so their histories and best results mean the same thing."""
    reward = acc if reward_kind == "accuracy" else -loss
    # Ties on a small reward subset are common; the lower loss breaks them.
    if (reward, -loss) > (state.best_reward, -state.best_loss):
        state.best_reward, state.best_loss, state.best_accuracy = reward, loss, acc
        state.best_ratios, state.best_episode = list(ratios), episode
    state.history.append(
        {
            "episode": episode,
            "reward": reward,
            "accuracy": acc,
            "loss": loss,
            "best": state.best_reward,
            "sigma": sigma,
            "ratios": list(ratios),
        }
    )
    state.episode = episode + 1
    return reward


Rollout = tuple[list[float], list[torch.Tensor], list[float]]
BatchScore = Callable[[list[list[float]]], list[tuple[float, float]]]
"""Scores several episodes' ratios at once (an executor's ``map`` over the scorer)."""


def rollout(
    static: torch.Tensor,
    budget: BudgetModel,
    agent: DDPG,
    generator: torch.Generator,
    random_actions: bool,
    sigma: float,
    prior: list[float] | None = None,
) -> Rollout:
    """One episode's ratios (clipped to the budget), the states seen, and the actions taken
    expressed in the actor's (0, 1) scale (what the critic learns from). Warm-up actions are
    uniform, or around ``prior`` with std ``sigma`` when one is given."""
    low, high = budget.low, budget.high
    ratios: list[float] = []
    states: list[torch.Tensor] = []
    actions: list[float] = []
    for t in range(len(budget.params)):
        state = layer_state(static, budget, ratios)
        if random_actions and prior is not None:
            ratio = truncated_normal(prior[t], sigma * (high - low), low, high, generator)
        elif random_actions:  # warm-up: uniform exploration fills the replay buffer (AMC)
            ratio = low + (high - low) * float(torch.rand((), generator=generator))
        else:
            ratio = low + (high - low) * agent.act(state)
            ratio = truncated_normal(ratio, sigma * (high - low), low, high, generator)
        ratio = clip_to_budget(budget, ratios, ratio)
        ratios.append(ratio)
        states.append(state)
        actions.append((ratio - low) / (high - low) if high > low else 0.0)
    return ratios, states, actions


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the agent's tiny MLPs on one thread: on a busy machine, several threads spend far
    more time synchronising than computing on a 6-row batch (measured 6-10x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clone_policy(
    agent: DDPG, static: torch.Tensor, budget: BudgetModel, prior: list[float], steps: int = 200
) -> None:
    """Start the actor at the prior: fit it (and its target copy) to output the prior's ratios
    on the states of the prior's own episode (behaviour cloning, a few hundred Adam steps)."""
    low, high = budget.low, budget.high
    states, targets, prefix = [], [], []
    for ratio in prior:
        states.append(layer_state(static, budget, prefix))
        targets.append((ratio - low) / (high - low))
        prefix.append(ratio)
    x, y = torch.stack(states), torch.tensor(targets).unsqueeze(1).clamp(0.02, 0.98)
    opt = torch.optim.Adam(agent.actor.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(agent.actor(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    agent.actor_target.load_state_dict(agent.actor.state_dict())


def run_search(
    static: torch.Tensor,
    budget: BudgetModel,
    agent: DDPG,
    generator: torch.Generator,
    settings: SearchSettings,
    score: Callable[[list[float]], tuple[float, float]],
    *,
    path: Path | None,
    key: str,
    resume: bool,
    desc: str,
    progress: Callable[[Iterable[int], str, int], Iterable[int]],
    on_episode: EpisodeCallback | None = None,
    log: Callable[[str], None] | None = None,
    score_batch: BatchScore | None = None,
) -> SearchState:
    """Search the per-layer ratios. ``score(ratios)`` returns ``(accuracy, loss)`` on the
    reward subset. With ``path`` the search checkpoints after every episode and, when
    ``resume``, continues from a checkpoint of the same search.

    With ``score_batch`` (an executor's ``map`` over the scorer), the warm-up episodes still
    to run are rolled out first, in order, and scored together; their actions do not depend
    on any reward and the agent does not learn during warm-up, so every episode, the agent
    and the checkpoints are the same as scoring them one by one. Later episodes depend on the
    previous episode's learning and are scored one at a time."""
    state = SearchState()
    if path is not None and resume:
        loaded = checkpoint.load(path, key)
        if loaded is not None:
            tensors, saved = loaded
            agent.load(tensors, saved["agent"])
            generator.set_state(tensors["rng"])
            state = SearchState(**saved["search"])
            state.resumed_from = state.episode
            if log and state.episode:
                log(f"resuming the search from episode {state.episode} ({path})")
    started = time.perf_counter() - state.search_time_s
    if settings.prior is not None and state.episode == 0:
        with one_thread():
            clone_policy(agent, static, budget, settings.prior)
    episodes = range(state.episode, settings.episodes)
    ahead: dict[int, tuple[Rollout, tuple[float, float], torch.Tensor]] = {}
    for episode in progress(episodes, desc, len(episodes)):
        warm = episode < settings.warmup
        sigma = _sigma(settings, episode)
        if warm and score_batch is not None and episode not in ahead:
            ahead = _score_warmup(
                range(episode, settings.warmup),
                static,
                budget,
                agent,
                generator,
                settings,
                score_batch,
            )
        if settings.refit_best and episode == settings.warmup and state.best_ratios:
            # Deterministic (no draw from the generator), and done before this episode's
            # checkpoint, so a search resumed after it finds the refitted actor as saved.
            with one_thread():
                clone_policy(agent, static, budget, state.best_ratios)
        rng: torch.Tensor | None = None
        if episode in ahead:
            (ratios, states, actions), (acc, loss), rng = ahead.pop(episode)
        else:
            with one_thread():
                ratios, states, actions = rollout(
                    static, budget, agent, generator, warm, sigma, settings.prior
                )
            acc, loss = score(ratios)
        reward = record_episode(
            state, episode, ratios, acc, loss, settings.reward, 0.0 if warm else sigma
        )
        # AMC: every step of the episode gets the episode's reward; the last one is terminal.
        with one_thread():
            for t, (s, a) in enumerate(zip(states, actions)):
                last = t == len(states) - 1
                agent.buffer.add(s, a, reward, s if last else states[t + 1], last)
                if not warm:
                    agent.update(generator)
        state.search_time_s = time.perf_counter() - started
        if path is not None:
            saved = {"search": asdict(state) | {"resumed_from": None}, "agent": agent.scalars()}
            # A batched warm-up episode saves the generator as it was after its own rollout.
            rng_state = generator.get_state() if rng is None else rng
            checkpoint.save(path, key, agent.tensors() | {"rng": rng_state}, saved)
        if on_episode is not None:
            on_episode(episode, reward, state.best_reward)
    return state


def _sigma(settings: SearchSettings, episode: int) -> float:
    """The exploration noise std of ``episode`` (0 for the prior's own episode)."""
    if settings.prior is not None and episode == 0:
        return 0.0  # the prior itself is the first candidate
    return settings.noise * settings.noise_decay ** max(episode - settings.warmup, 0)


def _score_warmup(
    episodes: range,
    static: torch.Tensor,
    budget: BudgetModel,
    agent: DDPG,
    generator: torch.Generator,
    settings: SearchSettings,
    score_batch: BatchScore,
) -> dict[int, tuple[Rollout, tuple[float, float], torch.Tensor]]:
    """Roll out the warm-up ``episodes`` in order (keeping the generator's state after each,
    for its checkpoint) and score them in one batch: episode -> (rollout, score, rng)."""
    rollouts: list[Rollout] = []
    states: list[torch.Tensor] = []
    with one_thread():
        for episode in episodes:
            rollouts.append(
                rollout(
                    static,
                    budget,
                    agent,
                    generator,
                    True,
                    _sigma(settings, episode),
                    settings.prior,
                )
            )
            states.append(generator.get_state())
    scores = score_batch([r[0] for r in rollouts])
    return {
        e: (r, (float(a), float(b)), g)
        for e, r, (a, b), g in zip(episodes, rollouts, scores, states, strict=True)
    }
