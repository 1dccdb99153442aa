"""Search baselines the DDPG agent must beat at the same number of evaluations: random search
and a (μ+λ) evolutionary search of the per-layer ratios.

Both propose whole ratio vectors, make them meet the target with the rollout's own clipping
(:func:`~netshrink.plugins.rlprune.search.project`), score them with the same scorer (and the
same executor fan-out) and book them with the same
:func:`~netshrink.plugins.rlprune.search.record_episode`, so an episode means the same thing for
every agent: one evaluated ratio vector.

Every episode draws from its own generator, seeded from the search's generator and the episode
index, and the evolutionary population is the best ``population`` episodes scored before the
current generation; so the whole search state is its history, the checkpoint needs no tensors,
and a resumed search ends exactly where the uninterrupted one does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from netshrink.plugins.rlprune import checkpoint
from netshrink.plugins.rlprune.ddpg import truncated_normal
from netshrink.plugins.rlprune.env import BudgetModel
from netshrink.plugins.rlprune.search import (
    BatchScore,
    EpisodeCallback,
    SearchState,
    project,
    record_episode,
)


@dataclass
class BaselineSettings:
    """The knobs of a random or evolutionary search (taken from the compressor's config)."""

    agent: str
    """'random' or 'evolution'."""
    episodes: int
    reward: str
    noise: float
    """Std (fraction of the ratio range) of the random proposals around ``prior``."""
    population: int
    """Evolution: μ, the parents kept, and λ, the children per generation."""
    mutation: float
    """Evolution: std of the Gaussian mutation of each ratio (fraction of the ratio range)."""
    prior: list[float] | None = None


Proposal = tuple[int, list[float], float]
"""(episode, ratios meeting the target, the std its proposal was drawn with)."""


def random_proposal(
    budget: BudgetModel, generator: torch.Generator, episode: int, settings: BaselineSettings
) -> Proposal:
    """A candidate drawn like a DDPG warm-up episode: uniform ratios, or (with a prior) the
    prior itself at episode 0 and truncated-normal ratios around it after."""
    low, high = budget.low, budget.high
    prior = settings.prior
    if prior is not None and episode == 0:
        return episode, project(budget, prior), 0.0
    if prior is not None:
        std = settings.noise * (high - low)
        proposal = [truncated_normal(p, std, low, high, generator) for p in prior]
        return episode, project(budget, proposal), settings.noise
    rand = torch.rand(len(budget.params), generator=generator, dtype=torch.float64)
    return episode, project(budget, [low + (high - low) * float(u) for u in rand]), 1.0


def mutate(
    budget: BudgetModel,
    generator: torch.Generator,
    episode: int,
    parents: list[list[float]],
    settings: BaselineSettings,
) -> Proposal:
    """A child: a parent picked by a size-2 tournament (``parents`` is sorted best first),
    every ratio moved by truncated N(0, mutation), then clipped to meet the target."""
    low, high = budget.low, budget.high
    i, j = torch.randint(0, len(parents), (2,), generator=generator).tolist()
    parent = parents[min(i, j)]
    std = settings.mutation * (high - low)
    child = [truncated_normal(r, std, low, high, generator) for r in parent]
    return episode, project(budget, child), settings.mutation


def generation_start(episode: int, settings: BaselineSettings) -> int:
    """First episode of the generation holding ``episode`` (the random initial population is
    generation 0; random search is one generation)."""
    mu = settings.population
    if settings.agent == "random" or episode < mu:
        return 0
    return mu + (episode - mu) // mu * mu


def generation_end(start: int, settings: BaselineSettings) -> int:
    """One past the last episode of the generation starting at ``start``."""
    if settings.agent == "random":
        return settings.episodes
    return min(start + settings.population, settings.episodes)


def population(state: SearchState, before: int, size: int) -> list[list[float]]:
    """The ``size`` best candidates among episodes ``< before``, best first ((μ+λ) elitism:
    parents compete with their children, so the best is never lost). Ties on the reward go
    to the lower loss, then to the earlier episode."""
    scored = [h for h in state.history if h["episode"] < before]
    scored.sort(key=lambda h: (-h["reward"], h["loss"], h["episode"]))
    return [h["ratios"] for h in scored[:size]]


def propose(
    budget: BudgetModel,
    base_seed: int,
    state: SearchState,
    episodes: range,
    settings: BaselineSettings,
) -> list[Proposal]:
    """The candidates of ``episodes`` (all in one generation): each drawn from its own
    generator, so a candidate depends only on its episode and the population before it."""
    start = generation_start(episodes.start, settings)
    parents = population(state, start, settings.population) if start else []
    out = []
    for episode in episodes:
        generator = torch.Generator().manual_seed(base_seed + episode)
        if parents:
            out.append(mutate(budget, generator, episode, parents, settings))
        else:
            out.append(random_proposal(budget, generator, episode, settings))
    return out


def run_baseline(
    budget: BudgetModel,
    generator: torch.Generator,
    settings: BaselineSettings,
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
    """Run a random or evolutionary search for ``settings.episodes`` evaluations. Arguments
    as :func:`~netshrink.plugins.rlprune.search.run_search`; with ``score_batch`` the
    candidates of a generation (every candidate, for random search) are scored together,
    with the same result as one by one."""
    state = SearchState()
    if path is not None and resume:
        loaded = checkpoint.load(path, key)
        if loaded is not None:
            state = SearchState(**loaded[1]["search"])
            state.resumed_from = state.episode
            if log and state.episode:
                log(f"resuming the {settings.agent} search from episode {state.episode} ({path})")
    base_seed = int(torch.randint(0, 2**62, (), generator=generator))
    started = time.perf_counter() - state.search_time_s
    episodes = range(state.episode, settings.episodes)
    ahead: dict[int, tuple[Proposal, tuple[float, float] | None]] = {}
    for episode in progress(episodes, desc, len(episodes)):
        if episode not in ahead:
            end = generation_end(generation_start(episode, settings), settings)
            batch = propose(budget, base_seed, state, range(episode, end), settings)
            scores: list[tuple[float, float] | None] = [None] * len(batch)
            if score_batch is not None:
                scores = [(float(a), float(b)) for a, b in score_batch([p[1] for p in batch])]
            ahead = {p[0]: (p, s) for p, s in zip(batch, scores, strict=True)}
        (_, ratios, sigma), scored = ahead.pop(episode)
        acc, loss = scored if scored is not None else score(ratios)
        reward = record_episode(state, episode, ratios, acc, loss, settings.reward, sigma)
        state.search_time_s = time.perf_counter() - started
        if path is not None:
            saved: dict[str, Any] = {
                "search": asdict(state) | {"resumed_from": None},
                "agent": {"kind": settings.agent},
            }
            checkpoint.save(path, key, {}, saved)
        if on_episode is not None:
            on_episode(episode, reward, state.best_reward)
    return state
