"""``rlprune``: a DDPG agent searches each layer's pruning ratio under a global sparsity target.

Paper: a 2023 Chinese journal paper (title and authors not recorded) on combined pruning:
reinforcement-learning weight pruning of the convolutional layers and a 3σ threshold rule for
the fully connected layers. The agent follows AMC (He et al.
2018, https://arxiv.org/abs/1802.03494): a layer-by-layer episode, a continuous action per
layer, actions clipped so the global target is met, reward from validation accuracy, the best
episode's ratios applied. The paper prunes weights (unstructured); channel pruning through
Torch-Pruning is offered as an option.

``agent`` swaps the DDPG agent for a random search or a (μ+λ) evolutionary search with the same
action space, the same clipping to the target, the same scorer and the same number of
evaluations (``episodes``), so the agent can be judged against them; every agent's per-episode
rewards and best-so-far curve are in the step summary (``episode_rewards``, ``best_rewards``).
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from netshrink import (
    Capabilities,
    Compressor,
    CompressorConfig,
    LayerRecord,
    NetshrinkError,
    SelectionError,
    StepResult,
    cache_dir,
    failing_module,
    hookimpl,
)
from netshrink.plugins.rlprune.baselines import BaselineSettings, run_baseline
from netshrink.plugins.rlprune.checkpoint import search_key
from netshrink.plugins.rlprune.ddpg import DDPG
from netshrink.plugins.rlprune.env import (
    DYNAMIC_FEATURES,
    BudgetModel,
    EpisodeScorer,
    RewardFn,
    WeightPruner,
    copy_model,
    describe_layers,
    link_channel_sources,
    magnitude_prior,
    prune_channels,
    prune_checked,
    static_features,
    weight_counts,
)
from netshrink.plugins.rlprune.preflight import check_channel_surgery
from netshrink.plugins.rlprune.search import (
    EpisodeCallback,
    SearchSettings,
    SearchState,
    run_search,
)

# Knobs that do not change the search result: they stay out of the checkpoint key.
_NOT_IN_KEY = {"checkpoint", "resume", "executor", "workers", "time_limit"}


class RLPruneConfig(CompressorConfig):
    """Configuration of :class:`RLPrune`."""

    target_sparsity: float = Field(
        0.8,
        gt=0.0,
        lt=1.0,
        description="Fraction of the selected layers' weights to remove in total (met exactly "
        "in 'weight' granularity; channel granularity meets it under its cost model).",
    )
    granularity: Literal["weight", "channel"] = Field(
        "weight",
        description="'weight': unstructured magnitude pruning per layer, stored "
        "sparse (the paper). 'channel': lowest-L1 output channels removed through Torch-Pruning "
        "(physically smaller layers).",
    )
    time_limit: float = Field(
        300.0,
        gt=0,
        description="Channel granularity: seconds the check before the search may "
        "take (Torch-Pruning's trace, and copies pruned at target_sparsity and max_ratio run "
        "once); past it, or if "
        "either fails, the step is refused naming the module or op, before any episode.",
    )
    episodes: int = Field(
        100,
        ge=1,
        le=100_000,
        description="Search episodes: evaluated ratio vectors (one "
        "policy rollout each for 'ddpg'), the budget every agent gets.",
    )
    agent: Literal["ddpg", "random", "evolution"] = Field(
        "ddpg",
        description="What proposes the ratio vectors. 'ddpg': the paper's (AMC's) "
        "actor-critic agent. 'random': each episode draws a vector as a DDPG warm-up episode "
        "does (uniform, or around the prior) and the best is kept. 'evolution': a (μ+λ) "
        "search, μ = λ = population: the first `population` episodes are random draws, then "
        "each generation's children are size-2-tournament parents with every ratio moved by "
        "a truncated Gaussian of std `mutation`, and the best `population` of parents and "
        "children survive. Every agent clips its vectors to the target the same way, is scored "
        "the same way and spends `episodes` evaluations; 'random' and 'evolution' ignore the "
        "DDPG knobs (warmup, noise_decay, hidden, lr_*, tau, discount, batch_size, "
        "buffer_size, baseline_alpha).",
    )
    population: int = Field(
        6,
        ge=2,
        le=10_000,
        description="agent 'evolution': parents kept (μ) and children per "
        "generation (λ); the first `population` episodes are the random initial population.",
    )
    mutation: float = Field(
        0.2,
        gt=0.0,
        le=10.0,
        description="agent 'evolution': std of the Gaussian mutation of "
        "each ratio, as a fraction of the ratio range (max_ratio - min_ratio); the child is "
        "truncated to the range and clipped to meet the target.",
    )
    warmup: int = Field(
        25,
        ge=0,
        description="agent 'ddpg': first episodes with uniformly random actions, "
        "before the agent learns (warmup == episodes is a pure random search).",
    )
    min_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Smallest pruning ratio of a layer.")
    max_ratio: float = Field(
        0.98, gt=0.0, lt=1.0, description="Largest pruning ratio of a layer (1 would delete it)."
    )
    reward: Literal["accuracy", "loss"] = Field(
        "accuracy",
        description="'accuracy': validation accuracy on the reward subset (the "
        "paper); 'loss': minus its cross-entropy (smoother on small subsets).",
    )
    reward_samples: int = Field(
        512,
        ge=1,
        description="Validation examples the reward is measured on (a fixed subset: "
        "the first N of the val split).",
    )
    prior: Literal["none", "magnitude"] = Field(
        "none",
        description="'none': warm-up actions are uniformly random (AMC, the paper). "
        "'magnitude': start from global magnitude pruning's per-layer ratios: episode 0 "
        "evaluates them, warm-up explores around them, the actor is initialised to output them.",
    )
    noise: float = Field(
        0.5,
        ge=0.0,
        le=10.0,
        description="Initial std of the truncated-normal exploration "
        "noise, as a fraction of the ratio range (AMC: 0.5).",
    )
    noise_decay: float = Field(
        0.95, gt=0.0, le=1.0, description="Noise std multiplier per episode after warm-up."
    )
    hidden: int = Field(
        300, ge=4, le=4096, description="Hidden units of the actor and critic MLPs."
    )
    lr_actor: float = Field(1e-4, gt=0.0, le=1.0, description="Actor learning rate (Adam).")
    lr_critic: float = Field(1e-3, gt=0.0, le=1.0, description="Critic learning rate (Adam).")
    tau: float = Field(0.01, gt=0.0, le=1.0, description="Soft target-update rate.")
    discount: float = Field(
        1.0, ge=0.0, le=1.0, description="Discount factor of the critic's target."
    )
    batch_size: int = Field(64, ge=1, le=65_536, description="Replay mini-batch size.")
    buffer_size: int = Field(2000, ge=1, description="Replay buffer capacity (transitions).")
    baseline_alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="Rate of the moving-average reward baseline."
    )
    reward_norm: Literal["baseline", "zscore"] = Field(
        "baseline",
        description="agent 'ddpg': how rewards are scaled for the critic. 'baseline' (AMC, "
        "the paper): minus a moving-average baseline (rate baseline_alpha). 'zscore': minus "
        "the mean and divided by the std of every reward in the replay buffer, so episodes a "
        "fraction of a point apart still give the critic targets of order one.",
    )
    refit_best: bool = Field(
        False,
        description="agent 'ddpg': when warm-up ends, fit the actor to the best episode so "
        "far (behaviour cloning, as prior 'magnitude' does at the start), so the learned "
        "episodes explore around the best vector found instead of an untrained policy.",
    )
    state_features: Literal["amc", "amc+magnitude"] = Field(
        "amc",
        description="agent 'ddpg': the layer state. 'amc' (the paper): index, type, channels, "
        "kernel, stride, weights, MACs, and what the episode has removed so far. "
        "'amc+magnitude' adds the ratio global magnitude pruning would give the layer at the "
        "target (how much of it lies below the network-wide threshold).",
    )
    executor: str = Field(
        "local",
        description="Where episodes are scored: 'local' (here, one by one), "
        "'process' (a pool of local processes), 'ray' (Ray tasks, on a cluster when "
        "RAY_ADDRESS is set; pip install 'netshrink[ray]'), or a plugin's executor. The "
        "episodes whose ratios depend on no pending reward are scored together (DDPG's "
        "warm-up, every random-search episode, each evolution generation); the result is the "
        "same for every executor.",
    )
    workers: int | None = Field(
        None, ge=1, description="Episodes scored at once by the executor (default: its own)."
    )
    checkpoint: str | None = Field(
        None,
        description="Checkpoint file of the search (safetensors). Default: "
        "<cache_dir>/rlprune/<digest of model, config, layers, seed>.safetensors.",
    )
    resume: bool = Field(
        True,
        description="Continue from a checkpoint of the same search if one exists (a "
        "finished one returns its result at once); false starts afresh and overwrites it.",
    )

    @field_validator("warmup")
    @classmethod
    def _warmup_fits(cls, value: int, info: ValidationInfo) -> int:
        episodes = info.data.get("episodes")
        # Only the DDPG agent warms up: a random or evolutionary search may be shorter.
        if info.data.get("agent", "ddpg") == "ddpg" and episodes is not None and value > episodes:
            raise ValueError(f"warmup must be <= episodes ({episodes}), got {value}")
        return value

    @field_validator("min_ratio")
    @classmethod
    def _min_below_target(cls, value: float, info: ValidationInfo) -> float:
        target = info.data.get("target_sparsity")
        if target is not None and value > target:
            raise ValueError(f"min_ratio must be <= target_sparsity ({target}), got {value}")
        return value

    @field_validator("max_ratio")
    @classmethod
    def _max_above_target(cls, value: float, info: ValidationInfo) -> float:
        low, target = info.data.get("min_ratio"), info.data.get("target_sparsity")
        if low is not None and value <= low:
            raise ValueError(f"max_ratio must be > min_ratio ({low}), got {value}")
        if target is not None and value < target:
            raise ValueError(f"max_ratio must be >= target_sparsity ({target}), got {value}")
        return value


class RLPrune(Compressor):
    """DDPG search of per-layer pruning ratios under a global sparsity target (paper 003, AMC)."""

    name = "rlprune"
    Config = RLPruneConfig
    capabilities = Capabilities(
        handles=("Conv2d", "Linear"), needs_data=True, changes_structure=True, needs_finetune=True
    )
    paper = (
        "A 2023 Chinese journal paper (title and authors not given in the available text) "
        "combining DDPG reinforcement-learning weight pruning of the convolutional layers "
        "with a 3σ threshold rule for the fully connected layers; agent after He, Lin, "
        'Liu, Wang, Li, Han, "AMC: AutoML for Model Compression and Acceleration on Mobile '
        'Devices", ECCV 2018, https://arxiv.org/abs/1802.03494'
    )
    config: RLPruneConfig

    @classmethod
    def capabilities_for(cls, config: RLPruneConfig) -> Capabilities:
        """Only channel granularity changes the structure; weight granularity stores sparse."""
        return replace(cls.capabilities, changes_structure=config.granularity == "channel")

    def __init__(
        self,
        config: RLPruneConfig | dict | None = None,
        *,
        on_episode: EpisodeCallback | None = None,
    ) -> None:
        super().__init__(config)
        self.on_episode = on_episode
        """Called after every episode with ``(episode, reward, best)``; raising stops the
        search (its checkpoint is already written)."""

    def checkpoint_path(self, key: str) -> Path:
        """Where this search checkpoints."""
        if self.config.checkpoint:
            return Path(self.config.checkpoint)
        return cache_dir() / "rlprune" / f"{key[:24]}.safetensors"

    def compress(self, model, layers, ctx) -> StepResult:
        cfg = self.config
        data = ctx.require_data()
        n = min(cfg.reward_samples, len(data.val))
        # A TensorDataset's raw tensors; any other split (an ArrayDataset, which normalises
        # as it fetches) through the data's own loader, which gives what the model sees.
        tensors = getattr(data.val, "tensors", None)
        x, y = tensors[:2] if tensors is not None else data.batch("val", n)
        x, y = x[:n].to(ctx.device), y[:n].to(ctx.device)
        infos = describe_layers(model, layers, x)
        channel = cfg.granularity == "channel"
        left_out: dict[str, str] = {}
        if channel:
            # The ratios the search ends near (the target) and the largest it may pick.
            left_out = check_channel_surgery(
                model,
                [li.name for li in infos],
                [cfg.target_sparsity, cfg.max_ratio],
                x,
                cfg.time_limit,
                lambda: link_channel_sources(model, infos, x),
            )
            if left_out:  # layers Torch-Pruning cannot prune consistently stay as they are
                layers = [(n, m) for n, m in layers if n not in left_out]
                infos = describe_layers(model, layers, x)
                link_channel_sources(model, infos, x)
        try:
            budget = BudgetModel(infos, cfg.target_sparsity, cfg.min_ratio, cfg.max_ratio, channel)
        except ValueError as exc:
            raise ValueError(f"rlprune: {exc}") from None
        names = [li.name for li in infos]
        key = search_key(model, cfg.model_dump(exclude=_NOT_IN_KEY), names, ctx.seed, (x, y))
        path = self.checkpoint_path(key)
        target_count = round(cfg.target_sparsity * budget.total)
        score = EpisodeScorer(model, infos, budget, target_count, x, RewardFn(x, y), channel)
        score_batch = None
        if cfg.executor != "local":
            score_batch = functools.partial(_executor(cfg.executor, cfg.workers).map, score)

        prior = None
        if cfg.prior == "magnitude":
            prior = [
                min(max(r, cfg.min_ratio), cfg.max_ratio)
                for r in magnitude_prior(infos, cfg.target_sparsity)
            ]
        started = time.perf_counter()
        try:
            state = self._search(cfg, infos, budget, prior, score, score_batch, path, key, ctx)
        finally:
            score.restore()
        ctx.logger.info(
            "rlprune: %s, %d episodes, best reward %.4f (episode %d), search %.1fs",
            cfg.agent,
            state.episode,
            state.best_reward,
            state.best_episode,
            state.search_time_s,
        )
        ratios = state.best_ratios or []
        rewards = [h["reward"] for h in state.history]
        summary = {
            "agent": cfg.agent,
            "episodes": state.episode,
            "best_episode": state.best_episode,
            "best_reward": state.best_reward,
            "best_reward_accuracy": state.best_accuracy,
            "search_time_s": round(state.search_time_s, 3),
            "run_time_s": round(time.perf_counter() - started, 3),
            "resumed_from": state.resumed_from,
            "checkpoint": str(path),
            "episode_rewards": [round(r, 6) for r in rewards],
            # Best reward after each episode: the search curve, the same for every agent.
            "best_rewards": [round(r, 6) for r in itertools.accumulate(rewards, max)],
            "target_sparsity": cfg.target_sparsity,
            "granularity": cfg.granularity,
            "ratios": {nm: round(r, 6) for nm, r in zip(names, ratios)},
        }
        if channel:
            records = self._apply_channels(model, infos, ratios, x)
        else:
            records = self._apply_weights(model, infos, budget, ratios, target_count, ctx)
        removed = sum(li.params - r.details["params_after"] for li, r in zip(infos, records))
        summary["achieved_sparsity"] = round(removed / max(budget.total, 1), 6)
        if left_out:
            summary["skipped"] = dict(left_out)
            records += [LayerRecord(name, {"skipped": f"{why}; left unpruned"})
                        for name, why in left_out.items()]
        return StepResult(model, records, summary)

    def _search(
        self, cfg: RLPruneConfig, infos, budget, prior, score, score_batch, path, key, ctx
    ) -> SearchState:
        """Run the configured agent's search (DDPG, random or evolutionary)."""
        common = {
            "path": path,
            "key": key,
            "resume": cfg.resume,
            "desc": "search",
            "progress": ctx.progress,
            "on_episode": self.on_episode,
            "log": ctx.logger.info,
            "score_batch": score_batch,
        }
        if cfg.agent != "ddpg":
            settings = BaselineSettings(
                cfg.agent, cfg.episodes, cfg.reward, cfg.noise, cfg.population, cfg.mutation, prior
            )
            return run_baseline(budget, ctx.generator(offset=17), settings, score, **common)
        static = static_features(infos)
        if cfg.state_features == "amc+magnitude":
            magnitude = torch.tensor(magnitude_prior(infos, cfg.target_sparsity))
            static = torch.cat([static, magnitude.unsqueeze(1)], dim=1)
        agent = DDPG(
            static.shape[1] + len(DYNAMIC_FEATURES),
            hidden=cfg.hidden,
            lr_actor=cfg.lr_actor,
            lr_critic=cfg.lr_critic,
            tau=cfg.tau,
            discount=cfg.discount,
            batch_size=cfg.batch_size,
            buffer_size=cfg.buffer_size,
            baseline_alpha=cfg.baseline_alpha,
            seed=ctx.seed * 1_000_003 + ctx.step_index,
            reward_norm=cfg.reward_norm,
        )
        settings = SearchSettings(
            cfg.episodes, cfg.warmup, cfg.noise, cfg.noise_decay, cfg.reward, prior,
            refit_best=cfg.refit_best,
        )
        return run_search(
            static,
            budget,
            agent,
            ctx.generator(offset=17),
            settings,
            score,
            **common,
        )

    def _apply_weights(self, model, infos, budget, ratios, target_count, ctx) -> list[LayerRecord]:
        pruner = WeightPruner(infos)
        masks = pruner.masks(weight_counts(ratios, budget.params, target_count))
        records = []
        for li, ratio, mask in zip(infos, ratios, masks):
            tname = f"{li.name}.weight"
            kept = int(ctx.prune(model, tname, mask).sum())
            records.append(
                LayerRecord(
                    li.name,
                    {
                        "ratio": round(ratio, 6),
                        "sparsity": round(1 - kept / li.params, 6),
                        "params_after": kept,
                    },
                )
            )
        return records

    def _apply_channels(self, model, infos, ratios, x) -> list[LayerRecord]:
        before = [li.out_channels for li in infos]
        names = [li.name for li in infos]
        trial = copy_model(model)
        try:
            prune_channels(trial, names, ratios, before, x)
            runs = failing_module(trial, x[:1]) is None
        except (TimeoutError, NetshrinkError):
            raise
        except Exception:  # Torch-Pruning failing on this mix: the checked pruning below
            runs = False
        put_back: dict[str, str] = {}
        if runs:
            kept = prune_channels(model, names, ratios, before, x)
        else:  # as the episode scored it: layers that break this mix are put back
            trial = copy_model(model)
            try:
                put_back = prune_checked(trial, names, ratios, before, x)
            except SelectionError:
                raise
            except NetshrinkError as exc:  # the model is still untouched: refuse
                raise SelectionError(
                    "rlprune channel mode refused (nothing changed): the best episode's "
                    f"channel ratios cannot be built into a model that runs: {exc}; use "
                    "granularity='weight' or exclude that module") from None
            model.__dict__.clear()  # the checked copy becomes the model, in place
            model.__dict__.update(trial.__dict__)
            kept = [int(model.get_submodule(n).weight.shape[0]) for n in names]
        modules = dict(model.named_modules())
        records = []
        for li, ratio, k, c in zip(infos, ratios, kept, before):
            after = modules[li.name].weight.numel()
            records.append(
                LayerRecord(
                    li.name,
                    {
                        "ratio": round(ratio, 6),
                        "channels_before": c,
                        "channels_after": k,
                        "sparsity": round(1 - after / li.params, 6),
                        "params_after": after,
                        **({"skipped": f"{put_back[li.name]}; put back, unpruned"}
                           if li.name in put_back else {}),
                    },
                )
            )
        return records


def _executor(name: str, workers: int | None) -> Any:
    """The executor ``name`` (imported here: only a search that fans out needs it)."""
    from netshrink import get_executor

    return get_executor(name, workers)


__all__ = ["RLPrune", "RLPruneConfig"]


@hookimpl
def register_compressors(register):
    register(RLPrune)
