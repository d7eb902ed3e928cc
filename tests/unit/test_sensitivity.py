"""lit_compress.pruning.sensitivity: per-layer sensitivity tables, budget plans, JSON, Pruning overrides."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.pruning.sensitivity import (
    SensitivityTable,
    classification_error,
    format_table,
    load_plan,
    plan_from_sensitivity,
    plot_sensitivity,
    save_plan,
    sensitivity_analysis,
    sparsity_at_increase,
)


def toy() -> tuple[nn.Module, torch.Tensor]:
    """Two bias-free Linear layers with distinct weight magnitudes and one-hot inputs."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=False))
    with torch.no_grad():
        for layer in net:
            signs = torch.randint(0, 2, layer.weight.shape) * 2 - 1
            magnitudes = torch.randperm(layer.weight.numel()).view_as(layer.weight) + 1.0
            layer.weight.copy_(signs * magnitudes / 10)
    return net, torch.eye(6)


def mse_to(reference: nn.Module, x: torch.Tensor):
    """error = mean squared deviation from the unpruned outputs on ``x``: grows with every removed weight."""
    target = reference(x).detach()

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(model(x), target, reduction="sum"))

    return evaluate


def reference_error(net: nn.Module, x: torch.Tensor, layer: int, sparsity: float, evaluate) -> float:
    """Independent re-implementation: zero the round(s * n) smallest |w| of one layer of a copy."""
    clone = copy.deepcopy(net)
    w = clone[layer].weight
    k = round(sparsity * w.numel())
    order = torch.argsort(w.detach().abs().flatten(), stable=True)
    with torch.no_grad():
        w.view(-1)[order[:k]] = 0.0
    return evaluate(clone)


def test_table_matches_a_reference_and_is_monotonic_where_pruning_hurts():
    net, x = toy()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    evaluate = mse_to(net, x)
    sparsities = [0.2, 0.4, 0.6, 0.8, 0.9]
    table = sensitivity_analysis(net, evaluate, sparsities=sparsities)
    assert list(table) == ["0", "1"]
    assert table.sizes == {"0": 30, "1": 20} and table.baseline == 0.0 and table.criterion == "magnitude"
    for layer in (0, 1):
        row = table[str(layer)]
        assert list(row) == [0.0, *sparsities]
        for s in sparsities:
            assert row[s] == pytest.approx(reference_error(net, x, layer, s, evaluate), rel=1e-6)
        errors = list(row.values())
        assert all(a < b for a, b in itertools.pairwise(errors))  # strictly worse with every extra weight
    # The model itself is untouched (the analysis works on a copy).
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_inplace_analysis_restores_weights_bit_exactly_and_sees_the_model():
    net, x = toy()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def evaluate(model):
        seen.append(model)
        return mse_to(toy()[0], x)(model)

    copied = sensitivity_analysis(net, evaluate, sparsities=[0.5])
    assert all(m is not net for m in seen)
    seen.clear()
    inplace = sensitivity_analysis(net, evaluate, sparsities=[0.5], inplace=True)
    assert all(m is net for m in seen) and inplace == copied
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_targets_and_data_criteria():
    net, x = toy()
    table = sensitivity_analysis(net, mse_to(net, x), sparsities=[0.5], include=["1"])
    assert list(table) == ["1"]
    y = torch.arange(6) % 4
    batches = [(x, y)]
    loss = lambda batch: F.cross_entropy(net(batch[0]), batch[1])  # noqa: E731
    snip = sensitivity_analysis(net, mse_to(net, x), [0.5], criterion="snip", loss_fn=loss, batches=batches)
    assert snip.criterion == "snip" and set(snip) == {"0", "1"}
    # OBS-style criteria are re-scored per (layer, sparsity) and their compensating update is applied.
    wf = sensitivity_analysis(
        net,
        mse_to(net, x),
        [0.5],
        criterion="woodfisher",
        criterion_args={"block_size": 4, "num_gradients": 6},
        loss_fn=loss,
        batches=batches,
    )
    assert all(math.isfinite(v) for row in wf.values() for v in row.values())
    corr = sensitivity_analysis(
        net, mse_to(net, x), [0.5], criterion="correlation", loss_fn=loss, batches=batches
    )
    assert corr.criterion == "correlation"
    with pytest.raises(ValueError, match="needs data"):
        sensitivity_analysis(net, mse_to(net, x), [0.5], criterion="snip")


def test_bad_input_is_refused_with_a_hint():
    net, x = toy()
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        sensitivity_analysis(net, mse_to(net, x), sparsities=[0.5, 1.0])
    with pytest.raises(ValueError, match="at least one value in"):
        sensitivity_analysis(net, mse_to(net, x), sparsities=[0.0])
    with pytest.raises(TypeError, match="evaluate must be a callable"):
        sensitivity_analysis(net, "val_error")
    with pytest.raises(ValueError, match="finite number"):
        sensitivity_analysis(net, lambda m: float("nan"), sparsities=[0.5])
    with pytest.raises(ValueError, match="matches no"):
        sensitivity_analysis(net, mse_to(net, x), sparsities=[0.5], include=["fc9"])


def test_classification_error_counts_misclassified_examples():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        net.bias.zero_()
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [5.0, 1.0, 0.0], [1.0, 4.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 1])  # predictions 0, 1, 0, 1, 1 -> 2 wrong
    loader = [(x[:2], y[:2]), (x[2:], y[2:])]
    assert classification_error(loader)(net) == pytest.approx(2 / 5)
    assert classification_error(loader, max_batches=1)(net) == 0.0
    net.train()
    classification_error(loader)(net)
    assert net.training  # mode restored


def test_sparsity_at_increase_interpolates_the_running_maximum():
    row = {0.0: 0.10, 0.5: 0.105, 0.7: 0.13, 0.8: 0.109, 0.9: 0.2}
    assert sparsity_at_increase(row, 0.10, 0.01) == pytest.approx(0.5 + 0.2 * 0.005 / 0.025)
    assert sparsity_at_increase(row, 0.10, 0.001) == pytest.approx(0.1)
    assert sparsity_at_increase(row, 0.10, 0.03) == pytest.approx(0.8)  # the dip at 0.8 is not trusted
    assert sparsity_at_increase(row, 0.10, 1.0) == 0.9  # never beyond the largest tested sparsity
    assert sparsity_at_increase(row, 0.10, -0.01) == 0.0


def hand_table() -> SensitivityTable:
    errors = {
        "a": {0.0: 0.02, 0.4: 0.021, 0.8: 0.029, 0.9: 0.05},
        "b": {0.0: 0.02, 0.4: 0.025, 0.8: 0.08, 0.9: 0.3},
        "c": {0.0: 0.02, 0.4: 0.06, 0.8: 0.2, 0.9: 0.5},
    }
    return SensitivityTable(errors, baseline=0.02, sizes={"a": 1000, "b": 3000, "c": 500})


def pruned_counts(plan: dict[str, float], sizes: dict[str, int], prefix: str = "") -> dict[str, int]:
    """What Pruning prunes per layer: round(sparsity * numel) (masks._num_to_prune)."""
    return {layer: round(plan[prefix + layer] * n) for layer, n in sizes.items()}


def test_plan_minimises_the_total_increase_by_hand():
    table = hand_table()
    # Increase per pruned weight, segment by segment (already convex): a 0.001/400, 0.008/400, 0.021/100;
    # b 0.005/1200, 0.055/1200, 0.22/300; c 0.04/200, ... Cheapest first: a1, b1, a2, b2, c1, ...
    plan = plan_from_sensitivity(table, budget=0.3)  # 1350 = a1 (400) + 950 of b1
    assert pruned_counts(plan, table.sizes) == {"a": 400, "b": 950, "c": 0}
    plan = plan_from_sensitivity(table, budget=0.5)  # 2250 = a1 + b1 + a2 + 250 of b2
    assert pruned_counts(plan, table.sizes) == {"a": 800, "b": 1450, "c": 0}
    # max_increase caps each layer where it alone costs that much: a 0.6, b 0.4, c 0.05.
    plan = plan_from_sensitivity(table, budget=0.4, max_increase=0.005)  # 1800 = a1 + b1 + 200 of a2
    assert pruned_counts(plan, table.sizes) == {"a": 600, "b": 1200, "c": 0}
    with pytest.raises(ValueError, match=r"max_increase=0\.005 allow at most 0\.4056"):  # 1825 / 4500
        plan_from_sensitivity(table, budget=0.5, max_increase=0.005)


def test_plan_shares_equally_cheap_segments_in_proportion():
    rows = {"x": {0.0: 0.1, 0.5: 0.1, 0.9: 0.5}, "y": {0.0: 0.1, 0.5: 0.1, 0.9: 0.5}}
    table = SensitivityTable(rows, 0.1, {"x": 100, "y": 300})
    assert plan_from_sensitivity(table, 0.25) == {"x": 0.25, "y": 0.25}


def test_equal_increase_allocation_by_hand():
    table = hand_table()
    # For an increase d in [0.001, 0.005]: s_a = 0.4 + 0.4 (d - 0.001) / 0.008, s_b = 0.4 d / 0.005,
    # s_c = 0.4 d / 0.04, so 1000 s_a + 3000 s_b + 500 s_c = 350 + 295000 d = 0.3 * 4500 -> d = 1/295:
    # 519.49, 813.56 and 16.95 weights; the two left after flooring go to the largest remainders (c, b).
    plan = plan_from_sensitivity(table, budget=0.3, allocation="equal_increase")
    assert pruned_counts(plan, table.sizes) == {"a": 519, "b": 814, "c": 17}
    for layer, row in table.items():
        expected = sparsity_at_increase(row, 0.02, 1 / 295)
        assert expected == pytest.approx(plan[layer], abs=1 / table.sizes[layer])
    # A cap on a binds: 450 + 3000 * 80 d + 500 * 10 d = 1350 -> d = 0.0036735: 881.63 and 18.37 weights.
    capped = plan_from_sensitivity(table, budget=0.3, allocation="equal_increase", caps={"a": 0.45})
    assert pruned_counts(capped, table.sizes) == {"a": 450, "b": 882, "c": 18}
    with pytest.raises(ValueError, match=r"at most 0\.2744"):  # (500 + 720 + 15) / 4500 within 0.003
        plan_from_sensitivity(table, budget=0.3, allocation="equal_increase", max_increase=0.003)


@pytest.mark.parametrize("allocation", ["min_total_increase", "equal_increase"])
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.123, 0.3333, 0.5, 0.64])
def test_plan_meets_the_budget_within_one_weight_and_respects_caps(budget, allocation):
    table = hand_table()
    table.sizes = {"a": 997, "b": 3001, "c": 503}
    plan = plan_from_sensitivity(
        table, budget, allocation=allocation, caps={"b": 0.55}, max_sparsity=0.85, prefix="net."
    )
    counts = pruned_counts(plan, table.sizes, prefix="net.")
    assert abs(sum(counts.values()) - budget * sum(table.sizes.values())) <= 0.5 + 1e-9
    assert plan["net.b"] <= 0.55 and plan["net.a"] <= 0.85 and plan["net.c"] <= 0.85


def test_unreachable_budget_and_bad_plan_arguments():
    table = hand_table()
    with pytest.raises(ValueError, match=r"out of reach.*at most 0\.9 "):  # the largest tested sparsity
        plan_from_sensitivity(table, 0.95)
    with pytest.raises(ValueError, match=r"at most 0\.6496"):  # (847 + 1650 + 427) / 4501
        table.sizes = {"a": 997, "b": 3001, "c": 503}
        plan_from_sensitivity(table, 0.66, caps={"b": 0.55}, max_sparsity=0.85)
    with pytest.raises(ValueError, match="matches no layer"):
        plan_from_sensitivity(table, 0.3, caps={"z*": 0.1})
    with pytest.raises(ValueError, match="sizes"):
        plan_from_sensitivity(dict(table), 0.3)
    with pytest.raises(ValueError, match="budget must be a number"):
        plan_from_sensitivity(table, 1.2)
    with pytest.raises(ValueError, match="allocation must be one of"):
        plan_from_sensitivity(table, 0.3, allocation="greedy")


def test_glob_characters_in_layer_names_are_escaped():
    table = SensitivityTable({"blocks[0]": {0.0: 0.1, 0.5: 0.1}}, 0.1, {"blocks[0]": 10})
    plan = plan_from_sensitivity(table, 0.5)
    assert plan == {"blocks[[]0]": 0.5}
    import fnmatch

    assert fnmatch.fnmatchcase("blocks[0]", "blocks[[]0]")


def test_json_round_trips(tmp_path):
    table = hand_table()
    loaded = SensitivityTable.load(table.save(tmp_path / "t.json"))
    assert loaded == table and loaded.sizes == table.sizes and loaded.baseline == table.baseline
    plan = plan_from_sensitivity(table, budget=0.3333)
    assert load_plan(save_plan(plan, tmp_path / "plan.json")) == plan
    (tmp_path / "bad.json").write_text('{"fc1": 1.5}')
    with pytest.raises(ValueError, match=r"bad.json\['fc1'\] must be a number in \[0, 1\)"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a lit_compress sensitivity table"):
        SensitivityTable.load(tmp_path / "plan.json")


def test_pruning_accepts_the_plan_as_layer_sparsity(tmp_path):
    import lightning.pytorch as L

    from lit_compress.data import SyntheticDataModule
    from lit_compress.models.classifier import ImageClassifier
    from lit_compress.pruning.callback import Pruning

    torch.manual_seed(0)
    module = ImageClassifier(
        model="mlp", model_kwargs={"hidden": [12, 8]}, optimizer=lambda p: torch.optim.SGD(p, lr=0)
    )
    loader = SyntheticDataModule(num_train=32, num_val=32)
    loader.setup()
    table = sensitivity_analysis(module.net, classification_error(loader.val_dataloader()), [0.3, 0.6, 0.9])
    assert list(table) == ["hidden.0", "hidden.1", "head"]
    plan = plan_from_sensitivity(table, budget=0.5, prefix="net.")
    cb = Pruning(
        sparsity=0.5, layer_sparsity=load_plan(save_plan(plan, tmp_path / "plan.json")), verbose=False
    )
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    pruned = {name[: -len(".weight")]: int((~mask).sum()) for name, mask in cb.masks.items()}
    assert pruned == pruned_counts(plan, {f"net.{k}": v for k, v in table.sizes.items()})
    assert sum(pruned.values()) == round(0.5 * sum(table.sizes.values()))


def test_format_and_plot(tmp_path):
    table = hand_table()
    text = format_table(table)
    assert [c.strip() for c in text.splitlines()[0].split("|")[1:-1]] == [
        "layer",
        "weights",
        "0%",
        "40%",
        "80%",
        "90%",
    ]
    assert "| b     | 3000    |" in text
    pytest.importorskip("matplotlib")
    path = plot_sensitivity(table, tmp_path / "s.png", max_increase=0.01)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
