"""rlprune: the DDPG search meets the global target exactly, is reproducible, resumes an
interrupted search to the same result, prunes channels through Torch-Pruning, and refuses bad
configs naming the field."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

import netshrink as ns
from netshrink import CompressionContext, LayerSelector, model_info
from netshrink.encodings import Sparse
from netshrink.plugins.rlprune import RLPrune, RLPruneConfig
from netshrink.plugins.rlprune.ddpg import DDPG, truncated_normal
from netshrink.plugins.rlprune.env import BudgetModel, LayerInfo, weight_counts

FAST = {"episodes": 5, "warmup": 2, "hidden": 16, "batch_size": 8, "reward_samples": 64}


def _run(model, data, config, *, seed=0, types=("Conv2d", "Linear"), on_episode=None):
    model = copy.deepcopy(model)
    info = model_info(model)
    ctx = CompressionContext(data=data, info=info, seed=seed, step_name="rlprune")
    layers = LayerSelector(types=list(types)).resolve(model, head=info.head)
    out = RLPrune(config, on_episode=on_episode).compress(model, layers, ctx)
    ctx.encodings.reconcile(out.model)
    return out, ctx, layers


def test_weight_mode_meets_target_exactly_and_stores_sparse(lenet, digits, tmp_path):
    out, ctx, layers = _run(lenet, digits, {**FAST, "checkpoint": str(tmp_path / "s.st")})
    total = sum(m.weight.numel() for _, m in layers)
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    assert zeros == round(0.8 * total)  # the AMC-style clipping hits the target to the weight
    assert out.summary["achieved_sparsity"] == pytest.approx(0.8, abs=1e-6)
    ratios = list(out.summary["ratios"].values())
    assert len(ratios) == len(layers) and all(0.0 <= r <= 0.98 for r in ratios)
    assert len(set(ratios)) > 1  # per-layer ratios, not one uniform value
    for name, module in layers:
        enc = ctx.encoding_of(f"{name}.weight")
        assert isinstance(enc, Sparse)
        assert enc.nonzeros == int((module.weight != 0).sum())
    # The head was protected and left dense.
    assert ctx.encoding_of("fc2.weight") is None
    assert out.summary["episodes"] == FAST["episodes"]
    assert 0.0 <= out.summary["best_reward"] <= 1.0


@pytest.mark.parametrize("reward", ["accuracy", "loss"])
def test_applied_model_is_the_best_episode(lenet, digits, tmp_path, reward):
    config = {**FAST, "reward": reward, "checkpoint": str(tmp_path / "r.st")}
    out, _, _ = _run(lenet, digits, config)
    x, y = (t[: FAST["reward_samples"]] for t in digits.val.tensors)
    with torch.no_grad():
        logits = out.model.eval()(x)
    acc = float((logits.argmax(1) == y).float().mean())
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert out.summary["best_reward_accuracy"] == pytest.approx(acc, abs=1e-9)
    expected = acc if reward == "accuracy" else -loss
    assert out.summary["best_reward"] == pytest.approx(expected, rel=1e-4)
    # The model applied for real scores what the best logged episode scored. With this seed the
    # best episode is neither the first nor the last, so applying either of them would fail.
    rewards, best = out.summary["episode_rewards"], out.summary["best_episode"]
    assert 0 < best < len(rewards) - 1
    assert expected == pytest.approx(max(rewards), abs=2e-6)
    assert rewards[best] == pytest.approx(expected, abs=2e-6)


def test_magnitude_prior_starts_from_global_magnitude(lenet, digits, tmp_path):
    from netshrink.plugins.magnitude import Magnitude

    # One episode with the prior: it is global magnitude pruning's allocation, exactly.
    config = {
        **FAST,
        "episodes": 1,
        "warmup": 1,
        "prior": "magnitude",
        "checkpoint": str(tmp_path / "p.st"),
    }
    out, _, layers = _run(lenet, digits, config)
    ref = copy.deepcopy(lenet)
    info = model_info(ref)
    ref_layers = LayerSelector(types=["Conv2d", "Linear"]).resolve(ref, head=info.head)
    Magnitude({"sparsity": 0.8, "scope": "global"}).compress(
        ref, ref_layers, CompressionContext(data=digits, info=info)
    )
    for (_, m), (_, r) in zip(layers, ref_layers):
        assert torch.equal(m.weight == 0, r.weight == 0)
    # A longer search explores around it and keeps the best (never worse on the reward subset).
    longer, _, _ = _run(
        lenet, digits, {**config, "episodes": 5, "warmup": 3, "checkpoint": str(tmp_path / "q.st")}
    )
    assert longer.summary["best_reward"] >= out.summary["best_reward"]


def test_same_seed_same_search_other_seed_differs(lenet, digits, tmp_path):
    a, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(tmp_path / "a.st")})
    b, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(tmp_path / "b.st")})
    c, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(tmp_path / "c.st")}, seed=1)
    assert a.summary["ratios"] == b.summary["ratios"]
    assert a.summary["resumed_from"] is None and b.summary["resumed_from"] is None
    assert a.summary["ratios"] != c.summary["ratios"]


def test_interrupted_search_resumes_to_the_uninterrupted_result(lenet, digits, tmp_path):
    config = {**FAST, "episodes": 6, "warmup": 2}
    full, _, _ = _run(lenet, digits, {**config, "checkpoint": str(tmp_path / "full.st")})
    path = tmp_path / "cut.st"

    def stop_after_3(episode, reward, best):
        if episode == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(lenet, digits, {**config, "checkpoint": str(path)}, on_episode=stop_after_3)
    with safe_open(str(path), framework="pt") as handle:  # a safetensors file, no pickle
        assert "actor.net.0.weight" in handle.keys()  # noqa: SIM118
        assert '"episode": 4' in handle.metadata()["state"]
    seen = []
    resumed, _, _ = _run(
        lenet,
        digits,
        {**config, "checkpoint": str(path)},
        on_episode=lambda e, r, b: seen.append(e),
    )
    assert seen == [4, 5]  # only the missing episodes ran
    assert resumed.summary["resumed_from"] == 4
    assert resumed.summary["ratios"] == full.summary["ratios"]
    assert resumed.summary["best_reward"] == full.summary["best_reward"]
    # A finished search with the same config returns at once; resume=False starts afresh.
    again, _, _ = _run(
        lenet,
        digits,
        {**config, "checkpoint": str(path)},
        on_episode=lambda e, r, b: seen.append(e),
    )
    assert seen == [4, 5] and again.summary["ratios"] == full.summary["ratios"]
    fresh, _, _ = _run(lenet, digits, {**config, "checkpoint": str(path), "resume": False})
    assert fresh.summary["resumed_from"] is None
    assert fresh.summary["ratios"] == full.summary["ratios"]


def test_checkpoint_of_another_search_is_not_reused(lenet, digits, tmp_path):
    path = tmp_path / "shared.st"
    _run(lenet, digits, {**FAST, "checkpoint": str(path)})
    other, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(path), "target_sparsity": 0.6})
    assert other.summary["resumed_from"] is None
    assert other.summary["achieved_sparsity"] == pytest.approx(0.6, abs=1e-6)


def test_checkpoint_of_other_netshrink_code_is_not_reused(lenet, digits, tmp_path,
                                                          monkeypatch):
    from netshrink.plugins.rlprune import checkpoint

    path = tmp_path / "versioned.st"
    _run(lenet, digits, {**FAST, "checkpoint": str(path)})
    again, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(path)})
    assert again.summary["resumed_from"] is not None  # same code: the finished search is reused
    monkeypatch.setattr(checkpoint, "__version__", checkpoint.__version__ + ".other")
    other, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(path)})
    assert other.summary["resumed_from"] is None


def test_default_checkpoint_goes_to_the_cache(lenet, digits, tmp_path, monkeypatch):
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path))
    out, _, _ = _run(lenet, digits, {**FAST, "episodes": 3, "warmup": 3})
    assert out.summary["checkpoint"].startswith(str(tmp_path / "rlprune"))
    assert (tmp_path / "rlprune").is_dir() and len(list((tmp_path / "rlprune").iterdir())) == 1


def test_channel_mode_removes_channels_through_the_dependency_graph(lenet, digits, tmp_path):
    out, _, _ = _run(
        lenet,
        digits,
        {
            **FAST,
            "granularity": "channel",
            "target_sparsity": 0.5,
            "checkpoint": str(tmp_path / "ch.st"),
        },
        types=("Conv2d",),
    )
    model = out.model
    assert model.conv1.out_channels < 20 or model.conv2.out_channels < 50
    assert model.conv2.in_channels == model.conv1.out_channels  # coupled layers follow
    assert model.fc1.in_features % model.conv2.out_channels == 0
    params_before = 20 * 1 * 25 + 50 * 20 * 25
    params_after = model.conv1.weight.numel() + model.conv2.weight.numel()
    assert 1 - params_after / params_before == pytest.approx(0.5, abs=0.08)
    x = digits.test.tensors[0][:4]
    assert model(x).shape == (4, 10)


def test_budget_clipping_forces_the_last_layer():
    infos = [
        LayerInfo(f"l{i}", torch.nn.Identity(), n, n, 1, 1, 1, 1, False)
        for i, n in enumerate([100, 300, 600])
    ]
    budget = BudgetModel(infos, 0.5, 0.0, 0.98, channel=False)
    lo, hi = budget.bounds([0.9, 0.9])  # 90 + 270 pruned: the last must prune 140 of 600
    assert lo == pytest.approx(140 / 600, abs=1e-9) and hi == pytest.approx(140 / 600, abs=1e-9)
    lo, hi = budget.bounds([0.0])  # 500 still to remove; the last layer alone can take 588
    assert (lo, hi) == (0.0, 0.98)
    # At an 80% target the last layer's 588 are not enough: the middle one must take 212 of 300.
    lo, hi = BudgetModel(infos, 0.8, 0.0, 0.98, channel=False).bounds([0.0])
    assert lo == pytest.approx(212 / 300, abs=1e-9) and hi == 0.98
    # At a 20% target the middle layer may remove at most the 200 weights the target asks for.
    lo, hi = BudgetModel(infos, 0.2, 0.0, 0.98, channel=False).bounds([0.0])
    assert lo == 0.0 and hi == pytest.approx(200 / 300, abs=1e-9)
    assert weight_counts([0.9, 0.9, 140 / 600], [100, 300, 600], 500) == [90, 270, 140]
    with pytest.raises(ValueError, match="out of reach"):
        BudgetModel(infos, 0.99, 0.0, 0.9, channel=False)


def _small_ddpg(seed: int, reward_norm: str = "baseline") -> DDPG:
    return DDPG(5, hidden=8, lr_actor=1e-2, lr_critic=1e-2, tau=0.5, discount=1.0,
                batch_size=4, buffer_size=10, baseline_alpha=0.5, seed=seed,
                reward_norm=reward_norm)


def test_ddpg_pieces():
    gen = torch.Generator().manual_seed(0)
    samples = [truncated_normal(0.9, 0.5, 0.0, 1.0, gen) for _ in range(200)]
    assert all(0.0 <= s <= 1.0 for s in samples) and max(samples) > 0.95
    agent = _small_ddpg(seed=0)
    for i in range(12):  # the buffer wraps around
        agent.buffer.add(
            torch.rand(5, generator=gen), 0.5, float(i), torch.rand(5, generator=gen), i % 3 == 2
        )
    assert agent.buffer.size == 10 and agent.buffer.cursor == 2
    before = agent.actor_target.net[0].weight.clone()
    assert agent.update(gen)
    assert not torch.equal(before, agent.actor_target.net[0].weight)  # soft update moved it
    clone = _small_ddpg(seed=1)
    clone.load(agent.tensors(), agent.scalars())
    for p, q in zip(agent.critic.parameters(), clone.critic.parameters()):
        assert torch.equal(p, q)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    agent.update(g1)
    clone.update(g2)
    for p, q in zip(agent.actor.parameters(), clone.actor.parameters()):
        assert torch.equal(p, q)  # optimiser moments restored too


def _filled(reward_norm: str, scale: float, shift: float) -> DDPG:
    agent = _small_ddpg(seed=0, reward_norm=reward_norm)
    gen = torch.Generator().manual_seed(0)
    for i in range(8):
        reward = shift + scale * (0.80 + 0.01 * (i % 4))
        agent.buffer.add(torch.rand(5, generator=gen), 0.1 * i, reward,
                         torch.rand(5, generator=gen), True)
    return agent


@pytest.mark.parametrize("reward_norm", ["baseline", "zscore"])
def test_zscore_rewards_make_the_update_independent_of_the_reward_scale(reward_norm):
    # Accuracies 0.80-0.83 and the same episodes scored on a 100x scale with an offset: with
    # z-scored rewards the critic sees the same targets, so the agents learn the same thing;
    # with AMC's baseline only the offset cancels, and the critic's targets are 100x larger.
    small, large = _filled(reward_norm, 1.0, 0.0), _filled(reward_norm, 100.0, 5.0)
    for agent in (small, large):
        agent.update(torch.Generator().manual_seed(1))
    same = all(torch.allclose(p, q, atol=1e-5)
               for p, q in zip(small.critic.parameters(), large.critic.parameters()))
    assert same == (reward_norm == "zscore")
    if reward_norm == "zscore":  # the baseline is the mean of every stored reward
        assert large.baseline == pytest.approx(5.0 + 100 * 0.815, rel=1e-6)


def test_refit_best_starts_learning_from_the_best_warmup_episode(lenet, digits, tmp_path):
    # noise 0: after warm-up the actor's own output is the episode (no exploration), so the
    # first learned episode shows what the actor starts from.
    config = {**FAST, "episodes": 4, "warmup": 3, "noise": 0.0, "reward": "loss"}
    histories = {}
    for refit in (False, True):
        seen = []
        _run(lenet, digits, {**config, "refit_best": refit,
                             "checkpoint": str(tmp_path / f"{refit}.st")},
             on_episode=lambda e, r, b, seen=seen: seen.append(r))
        histories[refit] = seen
    assert histories[False][:3] == histories[True][:3]  # the same warm-up
    best_warm = max(histories[True][:3])
    # Refitted, the first learned episode lands near the best warm-up vector's reward; an
    # untrained actor's episode (near 0.5 everywhere) is scored differently.
    assert histories[True][3] == pytest.approx(best_warm, abs=0.1 * abs(best_warm))
    assert histories[True][3] != histories[False][3]


def test_tuned_search_interrupted_before_the_refit_resumes_to_the_same_result(
        lenet, digits, tmp_path):
    config = {**FAST, "episodes": 5, "warmup": 2, "refit_best": True, "reward_norm": "zscore",
              "state_features": "amc+magnitude"}
    full, _, _ = _run(lenet, digits, {**config, "checkpoint": str(tmp_path / "full.st")})

    def stop_after_warmup(episode, reward, best):
        if episode == 1:  # the last warm-up episode: the refit is the resumed run's first act
            raise KeyboardInterrupt

    path = str(tmp_path / "cut.st")
    with pytest.raises(KeyboardInterrupt):
        _run(lenet, digits, {**config, "checkpoint": path}, on_episode=stop_after_warmup)
    resumed, _, _ = _run(lenet, digits, {**config, "checkpoint": path})
    assert resumed.summary["resumed_from"] == 2
    assert resumed.summary["episode_rewards"] == full.summary["episode_rewards"]
    assert resumed.summary["ratios"] == full.summary["ratios"]


def test_magnitude_state_feature_changes_the_search(lenet, digits, tmp_path):
    plain, _, _ = _run(lenet, digits, {**FAST, "checkpoint": str(tmp_path / "a.st")})
    fed, _, _ = _run(lenet, digits, {**FAST, "state_features": "amc+magnitude",
                                      "checkpoint": str(tmp_path / "b.st")})
    assert fed.summary["achieved_sparsity"] == pytest.approx(0.8, abs=1e-6)
    # The warm-up episodes are the same draws; the learned ones see one more input.
    rewards = plain.summary["episode_rewards"], fed.summary["episode_rewards"]
    assert rewards[0][:2] == rewards[1][:2] and rewards[0][2:] != rewards[1][2:]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reward_norm", "rank"),
        ("state_features", "magnitude"),
        ("target_sparsity", 1.0),
        ("target_sparsity", 1.5),
        ("target_sparsity", 0.0),
        ("episodes", 0),
        ("warmup", -1),
        ("max_ratio", 1.0),
        ("noise_decay", 0.0),
        ("granularity", "filter"),
        ("tau", 0.0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        RLPruneConfig.model_validate({field: value})


def test_inconsistent_config_is_refused():
    cases = [
        ({"episodes": 5, "warmup": 6}, r"warmup\n.*warmup must be <= episodes \(5\), got 6"),
        (
            {"target_sparsity": 0.3, "min_ratio": 0.5, "max_ratio": 0.6},
            r"min_ratio\n.*min_ratio must be <= target_sparsity \(0.3\), got 0.5",
        ),
        (
            {"target_sparsity": 0.99, "max_ratio": 0.95},
            r"max_ratio\n.*max_ratio must be >= target_sparsity \(0.99\), got 0.95",
        ),
    ]
    for config, message in cases:
        with pytest.raises(ValidationError, match=message):
            RLPruneConfig.model_validate(config)
    with pytest.raises(ns.RecipeError, match=r"config\.episodes"):
        ns.compress("zoo:lenet5", [ns.step("rlprune", episodes=0)], data="digits")


def test_pipeline_rl_convs_plus_sigma_fc_roundtrip(lenet, digits, tmp_path):
    steps = [
        ns.step(
            "rlprune",
            select={"types": ["Conv2d"]},
            **{**FAST, "checkpoint": str(tmp_path / "p.st")},
        ),
        ns.step("sigmaprune", select={"types": ["Linear"]}, k=1.0),
    ]
    result = ns.compress(lenet, steps, data=digits, seed=0)
    model = result.model
    conv_w = torch.cat([model.conv1.weight.reshape(-1), model.conv2.weight.reshape(-1)])
    assert float((conv_w == 0).float().mean()) == pytest.approx(0.8, abs=1e-4)
    assert float((model.fc1.weight == 0).float().mean()) > 0.5
    path = result.save(tmp_path / "m.nsk", report=False)
    assert path.stat().st_size == result.report.storage_bytes
    loaded = ns.load(path)
    x = digits.test.tensors[0][:8]
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_channel_mode_leaves_out_a_layer_whose_pruning_breaks_the_model(split_net, tmp_path):
    model = split_net()
    gen = torch.Generator().manual_seed(0)
    split = torch.utils.data.TensorDataset(torch.randn(64, 1, 16, 16, generator=gen),
                                           torch.arange(64) % 10)
    data = ns.DataSplits(name="toy", train=split, val=split, test=split, num_classes=10,
                         extra={"input_shape": (1, 16, 16)})
    info = ns.ModelInfo("toy", input_shape=(1, 16, 16), num_classes=10, head="fc")
    ctx = CompressionContext(data=data, info=info, seed=0, step_name="rlprune")
    layers = LayerSelector(names=["conv1", "conv2"]).resolve(model, head="fc")
    config = {**FAST, "granularity": "channel", "target_sparsity": 0.3,
              "checkpoint": str(tmp_path / "split.st")}
    out = RLPrune(config).compress(model, layers, ctx)
    records = {r.name: r.details for r in out.records}
    assert "broke module mix" in records["conv1"]["skipped"]
    assert list(out.summary["skipped"]) == ["conv1"]
    assert list(out.summary["ratios"]) == ["conv2"]  # the search ran on the other layer
    assert model.conv1.out_channels == 8 and model.conv2.out_channels < 16
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_channel_budget_counts_layers_that_prune_together():
    """On a residual net the stem and each block's last conv prune together: the budget takes
    the largest of their ratios, so its prediction matches what pruning removes."""
    from netshrink.plugins.rlprune.env import describe_layers, link_channel_sources, prune_channels

    model = ns.load_model("zoo:resnet_small", in_chans=1, num_classes=10, input_size=32).eval()
    info = model_info(model)
    layers = LayerSelector(types=["Conv2d"]).resolve(model, head=info.head)
    x = torch.randn(2, 1, 32, 32)
    infos = describe_layers(model, layers, x)
    link_channel_sources(model, infos, x)
    names = [li.name for li in infos]
    assert infos[names.index("layers.0.0.conv2")].coupled == names.index("stem.0")
    budget = BudgetModel(infos, 0.3, 0.0, 0.9, channel=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ratios = (torch.rand(len(infos), generator=gen) * 0.8).tolist()
        work = copy.deepcopy(model)
        prune_channels(work, names, ratios, [li.out_channels for li in infos], x)
        modules = dict(work.named_modules())
        removed = sum(li.params - modules[li.name].weight.numel() for li in infos)
        assert budget.removed(ratios) == pytest.approx(removed, rel=0.03)
