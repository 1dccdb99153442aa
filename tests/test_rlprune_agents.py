"""rlprune's search baselines: random and (μ+λ) evolutionary search of the per-layer ratios at
the same number of evaluations as the DDPG agent, meeting the same target, reproducible,
resumable, and (for evolution) selecting the best parents."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from pydantic import ValidationError

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, model_info
from netshrink.plugins.rlprune import RLPrune, RLPruneConfig
from netshrink.plugins.rlprune.baselines import (
    BaselineSettings,
    generation_start,
    population,
    run_baseline,
)
from netshrink.plugins.rlprune.env import BudgetModel, LayerInfo
from netshrink.plugins.rlprune.search import SearchState, project, record_episode

FAST = {"episodes": 10, "population": 4, "reward_samples": 64}


def _run(model, data, config, *, seed=0, on_episode=None):
    model = copy.deepcopy(model)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=seed, step_name="rlprune")
    layers = LayerSelector(types=["Conv2d", "Linear"]).resolve(model, head=info.head)
    out = RLPrune(config, on_episode=on_episode).compress(model, layers, ctx)
    return out, layers


@pytest.mark.parametrize("agent", ["random", "evolution"])
def test_agent_meets_the_target_and_keeps_a_curve(lenet, digits, tmp_path, agent):
    seen = []
    out, layers = _run(
        lenet,
        digits,
        {**FAST, "agent": agent, "checkpoint": str(tmp_path / "a")},
        on_episode=lambda e, r, b: seen.append((e, r, b)),
    )
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    assert zeros == round(0.8 * total)
    assert out.summary["achieved_sparsity"] == pytest.approx(0.8, abs=1e-6)
    ratios = list(out.summary["ratios"].values())
    assert len(ratios) == len(layers) and all(0.0 <= r <= 0.98 for r in ratios)
    assert out.summary["agent"] == agent and out.summary["episodes"] == FAST["episodes"]
    rewards, best = out.summary["episode_rewards"], out.summary["best_rewards"]
    assert len(rewards) == len(best) == len(seen) == FAST["episodes"]
    assert [e for e, _, _ in seen] == list(range(FAST["episodes"]))
    assert best == [round(b, 6) for _, _, b in seen]  # the callback and the summary agree
    assert out.summary["best_reward"] == pytest.approx(max(rewards), abs=1e-6)
    # The applied model is the best episode's: its reward-subset accuracy is the best reward.
    x, y = (t[: FAST["reward_samples"]] for t in digits.val.tensors)
    with torch.no_grad():
        acc = float((out.model.eval()(x).argmax(1) == y).float().mean())
    assert out.summary["best_reward"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("agent", ["random", "evolution"])
def test_same_seed_same_search_other_seed_differs(lenet, digits, tmp_path, agent):
    config = {**FAST, "agent": agent}
    a, _ = _run(lenet, digits, {**config, "checkpoint": str(tmp_path / "a")})
    b, _ = _run(lenet, digits, {**config, "checkpoint": str(tmp_path / "b")})
    c, _ = _run(lenet, digits, {**config, "checkpoint": str(tmp_path / "c")}, seed=1)
    assert a.summary["resumed_from"] is None and b.summary["resumed_from"] is None
    assert a.summary["ratios"] == b.summary["ratios"]
    assert a.summary["episode_rewards"] == b.summary["episode_rewards"]
    assert a.summary["ratios"] != c.summary["ratios"]


def test_agents_draw_different_candidates(lenet, digits, tmp_path):
    # Evolution's initial population is random search's first draws; its children are not.
    config = {**FAST, "episodes": 8}
    rnd, _ = _run(lenet, digits, {**config, "agent": "random", "checkpoint": str(tmp_path / "r")})
    evo, _ = _run(
        lenet, digits, {**config, "agent": "evolution", "checkpoint": str(tmp_path / "e")}
    )
    mu = config["population"]
    assert rnd.summary["episode_rewards"][:mu] == evo.summary["episode_rewards"][:mu]
    assert rnd.summary["episode_rewards"][mu:] != evo.summary["episode_rewards"][mu:]


def test_interrupted_evolution_resumes_to_the_uninterrupted_result(lenet, digits, tmp_path):
    config = {**FAST, "agent": "evolution"}
    full, _ = _run(lenet, digits, {**config, "checkpoint": str(tmp_path / "full")})
    path = str(tmp_path / "cut")

    def stop(episode, reward, best):
        if episode == 5:  # in the middle of the first generation of children
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(lenet, digits, {**config, "checkpoint": path}, on_episode=stop)
    seen = []
    resumed, _ = _run(
        lenet, digits, {**config, "checkpoint": path}, on_episode=lambda e, r, b: seen.append(e)
    )
    assert seen == list(range(6, FAST["episodes"])) and resumed.summary["resumed_from"] == 6
    for key in ("episode_rewards", "ratios", "best_episode", "best_reward"):
        assert resumed.summary[key] == full.summary[key], key


def test_magnitude_prior_is_the_first_candidate(lenet, digits, tmp_path):
    prior = {"episodes": 1, "prior": "magnitude", "reward_samples": 64}
    ddpg, _ = _run(lenet, digits, {**prior, "warmup": 1, "checkpoint": str(tmp_path / "d")})
    for agent in ("random", "evolution"):
        out, _ = _run(lenet, digits, {**prior, "agent": agent, "checkpoint": str(tmp_path / agent)})
        assert out.summary["ratios"] == ddpg.summary["ratios"]


def test_bad_agent_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match=r"agent\n.*'ddpg', 'random' or 'evolution'"):
        RLPruneConfig.model_validate({"agent": "genetic"})
    with pytest.raises(ns.RecipeError, match=r"config\.agent"):
        ns.compress("zoo:lenet5", [ns.step("rlprune", agent="ppo")], data="digits")
    for field, value in (("population", 1), ("mutation", 0.0)):
        with pytest.raises(ValidationError, match=field):
            RLPruneConfig.model_validate({"agent": "evolution", field: value})
    # Only the DDPG agent warms up: a recipe switching agents keeps its warmup setting.
    assert RLPruneConfig.model_validate({"agent": "random", "episodes": 6, "warmup": 8})
    with pytest.raises(ValidationError, match="warmup must be <= episodes"):
        RLPruneConfig.model_validate({"episodes": 6, "warmup": 8})


# -- the search on its own, with a scorer whose optimum is known --------------------------------

PARAMS = [100, 200, 300, 400, 500]
GOAL = [0.2, 0.9, 0.5, 0.7, 0.54]  # removes 0.6 of the 1500 weights


def _budget() -> BudgetModel:
    infos = [
        LayerInfo(f"l{i}", torch.nn.Identity(), n, n, 1, 1, 1, 1, False)
        for i, n in enumerate(PARAMS)
    ]
    return BudgetModel(infos, 0.6, 0.0, 0.98, channel=False)


def _score(ratios: list[float]) -> tuple[float, float]:
    """Accuracy falls with the distance to GOAL (a smooth landscape with one optimum)."""
    distance = sum(abs(r - g) for r, g in zip(ratios, GOAL)) / len(GOAL)
    return 1.0 - distance, distance


def _search(agent: str, episodes: int = 48, seed: int = 0, score_batch=None, **extra):
    settings = BaselineSettings(
        agent,
        episodes,
        "accuracy",
        0.5,
        extra.get("population", 6),
        extra.get("mutation", 0.2),
        extra.get("prior"),
    )
    gen = torch.Generator().manual_seed(seed)
    return run_baseline(
        _budget(),
        gen,
        settings,
        _score,
        path=None,
        key="k",
        resume=False,
        desc="test",
        progress=lambda it, desc, n: it,
        score_batch=score_batch,
    )


def test_projection_meets_the_target_whatever_is_proposed():
    budget = _budget()
    for proposal in ([0.0] * 5, [0.98] * 5, [0.9, 0.9, 0.0, 0.0, 0.0], GOAL):
        ratios = project(budget, proposal)
        assert budget.removed(ratios) == pytest.approx(budget.target, abs=1e-6)
        assert all(0.0 <= r <= 0.98 for r in ratios)
    assert project(budget, GOAL) == pytest.approx(GOAL)  # a feasible vector is left alone


def test_evolution_selects_the_best_and_improves_on_its_initial_population():
    state = _search("evolution")
    mu = 6
    rewards = [h["reward"] for h in state.history]
    assert len(rewards) == 48
    best = [h["best"] for h in state.history]
    assert all(b1 <= b2 for b1, b2 in itertools.pairwise(best))
    # Selection works: the search ends clearly above its random initial population ...
    assert state.best_reward > max(rewards[:mu]) + 0.05
    # ... and every child descends from the best `mu` candidates scored before its generation
    # (a tiny mutation keeps it next to its parent), not from the discarded ones.
    tiny = _search("evolution", episodes=18, mutation=1e-4)
    for h in tiny.history[mu:]:
        start = generation_start(h["episode"], BaselineSettings("evolution", 18, "", 0, mu, 0))
        ranked = sorted(
            (g for g in tiny.history if g["episode"] < start), key=lambda g: -g["reward"]
        )
        gap = [max(abs(a - b) for a, b in zip(h["ratios"], g["ratios"])) for g in ranked]
        assert min(gap[:mu]) < 0.01
        assert min(gap[:mu]) < min(gap[mu:], default=1.0)


def test_evolution_beats_random_search_at_equal_evaluations_on_a_smooth_landscape():
    # Mean over seeds, so one lucky draw does not decide it (measured: 0.947 against 0.903).
    evo = sum(_search("evolution", seed=s).best_reward for s in range(10)) / 10
    rnd = sum(_search("random", seed=s).best_reward for s in range(10)) / 10
    assert evo > rnd + 0.02


def test_population_is_the_best_scored_before_the_generation():
    state = SearchState()
    for episode, acc in enumerate([0.1, 0.5, 0.3, 0.5, 0.9]):
        record_episode(state, episode, [acc], acc, 1.0 - acc + 0.01 * episode, "accuracy", 0.0)
    assert population(state, 4, 2) == [[0.5], [0.5]]  # episode 4 is not before 4
    assert population(state, 5, 3) == [[0.9], [0.5], [0.5]]
    assert [h["best"] for h in state.history] == [0.1, 0.5, 0.5, 0.5, 0.9]


@pytest.mark.parametrize("agent", ["random", "evolution"])
def test_batched_scoring_gives_the_same_search(agent):
    batches = []

    def score_batch(items):
        batches.append(len(items))
        return [_score(r) for r in items]

    local = _search(agent, episodes=20)
    fanned = _search(agent, episodes=20, score_batch=score_batch)
    assert [h["ratios"] for h in fanned.history] == [h["ratios"] for h in local.history]
    assert fanned.best_ratios == local.best_ratios
    # Random draws are all independent: one batch. Evolution: the population, then generations.
    assert batches == ([20] if agent == "random" else [6, 6, 6, 2])


def _benchmark(name: str):
    """``benchmarks.<name>``: benchmarks/ lives at the repository root, not in the install."""
    import importlib
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"benchmarks.{name}")


def test_benchmark_script_runs_quick(tmp_path, capsys):
    rlprune_agents = _benchmark("rlprune_agents")
    rlprune_agents.main(
        [
            "--quick",
            "--data",
            "digits",
            "--episodes",
            "3",
            "--reward-samples",
            "64",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    for row in (
        "| uniform | 1 |",
        "| magnitude | 1 |",
        "| ddpg | 1 |",
        "| ddpg-tuned | 1 |",
        "| random | 1 |",
        "| evolution | 1 |",
    ):
        assert row in out
    assert "n=360" in out  # the test accuracy carries its n (and its interval)
    assert (tmp_path / "lenet5-digits-3ep-1seeds.png").stat().st_size > 5_000


def test_tuning_script_runs_quick(capsys):
    rlprune_tuning = _benchmark("rlprune_tuning")
    rlprune_tuning.main(["--quick", "--data", "digits", "--episodes", "2", "--seeds", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| 2 |" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(rlprune_tuning.VARIANTS)
    assert "seeds 10-11" in out
