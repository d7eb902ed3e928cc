"""The WeightSharing callback (Deep Compression's trained quantization) on real Lightning runs."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lit_compress.data import SyntheticDataModule
from lit_compress.deep_compression.sharing_callback import WeightSharing
from lit_compress.models import ImageClassifier
from lit_compress.pruning import OneShot
from lit_compress.pruning.callback import Pruning

STEPS_PER_EPOCH = 8  # SyntheticDataModule(num_train=256, batch_size=32)
TARGETS = ("net.hidden.0.weight", "net.hidden.1.weight", "net.head.weight")


def tiny_classifier(optimizer=None, hidden=(32, 16)) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="mlp",
        model_kwargs={"hidden": list(hidden)},
        optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    )


def trainer(tmp_path, callbacks, max_steps=16, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def check_shared(model: nn.Module, cb, bits: dict[str, int]) -> None:
    """Each target: weight == codebook[index] on members, +0.0 where masked, <= 2**bits distinct values."""
    codebooks = cb.codebooks()
    for name in TARGETS:
        w = model.get_parameter(name).detach()
        mask = cb.masks[name]
        assert torch.equal(w, torch.where(mask, codebooks[name][cb.assignments[name].long()], 0.0)), name
        assert w[~mask].eq(0).all() and not w[~mask].signbit().any(), name  # +0.0, not -0.0
        assert w[mask].ne(0).all(), name
        assert w[mask].unique().numel() <= 2 ** bits[name], name
        assert cb.assignments[name].dtype == torch.uint8


class Probe(L.Callback):
    """Records raw gradients before WeightSharing sums them, and weights at given steps."""

    def __init__(self, grad_step=None, weight_steps=()):
        self.grad_step, self.weight_steps = grad_step, set(weight_steps)
        self.grads, self.weights = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.weight_steps:
            self.weights[trainer.global_step] = {
                n: p.detach().clone() for n, p in pl_module.named_parameters() if n in TARGETS
            }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.grad_step:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if n in TARGETS}


def test_prune_then_share_keeps_zeros_and_at_most_2_to_the_bits_values(tmp_path):
    model = tiny_classifier()
    keys = list(model.state_dict())
    pruning = Pruning(sparsity=0.8, schedule="one_shot")
    sharing = WeightSharing(layer_bits={"net.head": 3})  # Linear: the paper's 5 bits
    probe = Probe(weight_steps=[1])
    trainer(tmp_path, [pruning, sharing, probe], max_steps=12).fit(model, SyntheticDataModule())
    assert sharing.cluster_step == 1  # right after the one-shot pruning event at step 0
    assert list(model.state_dict()) == keys
    bits = {"net.hidden.0.weight": 5, "net.hidden.1.weight": 5, "net.head.weight": 3}
    assert sharing.weight_bits == bits
    check_shared(model, sharing, bits)
    for name in TARGETS:
        assert torch.equal(sharing.masks[name], pruning.masks[name])  # exactly the pruning zeros
        # Enough distinct survivors everywhere: relocation of empty clusters uses every shared value.
        assert sharing.num_clusters[name] == sharing.codebooks()[name].numel() == 2 ** bits[name]
    # Fine-tuned: the shared values moved after clustering.
    before = probe.weights[1]["net.hidden.0.weight"]
    assert not torch.equal(before, model.net.hidden[0].weight)
    summary = sharing.compression_summary()
    assert summary["methods"] == ["weight_sharing:kmeans"]
    assert summary["bits"] == 5 and summary["weight_bits"] == bits
    assert "linear-initialised k-means" in summary["description"]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_one_sgd_step_moves_each_centroid_by_the_sum_of_its_member_gradients(tmp_path, reduce):
    lr = 0.05
    model = tiny_classifier(lambda p: torch.optim.SGD(p, lr=lr))
    probe = Probe(grad_step=3, weight_steps=[3, 4])  # before WeightSharing: sees raw gradients
    sharing = WeightSharing(bits=3, start_step=3, gradient=reduce)
    pruning = Pruning(sparsity=0.5, schedule=OneShot(step=0))
    trainer(tmp_path, [pruning, probe, sharing], max_steps=5).fit(model, SyntheticDataModule())
    assert sharing.cluster_step == 3
    # The probe's step-3 weights were taken before clustering; rebuild the clustered values from the
    # assignments: the codebook at step 3 is each cluster's value right after clustering.
    for name in TARGETS:
        index, mask = sharing.assignments[name].long(), sharing.masks[name]
        after = probe.weights[4][name]
        for j in range(sharing.num_clusters[name]):
            members = mask & (index == j)
            old = _clustered_value(probe.weights[3][name], members)
            total = probe.grads[name][members].double().sum()
            step = total if reduce == "sum" else total / members.sum()
            expected = (old - lr * step).float()
            assert torch.all(after[members] == after[members][0])
            torch.testing.assert_close(after[members][0], expected, rtol=1e-5, atol=1e-6)
        assert torch.all(after[~mask] == 0)


def _clustered_value(weights_before: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """A cluster's value after k-means: the mean of its members' weights before clustering."""
    return weights_before[members].double().mean()


def test_adam_keeps_shared_values_shared_without_the_resnap(tmp_path, monkeypatch):
    """Summed gradients + averaged Adam moments alone keep members equal (the re-snap is only a guard)."""
    model = tiny_classifier(lambda p: torch.optim.Adam(p, lr=1e-3))
    sharing = WeightSharing(bits=4, start_step=6)  # Adam moments are full by step 6
    monkeypatch.setattr(type(sharing), "_snap", lambda self: None)
    trainer(tmp_path, [sharing], max_steps=30).fit(model, SyntheticDataModule())
    for name in TARGETS:
        w = model.get_parameter(name).detach()
        index, mask = sharing.assignments[name].long(), sharing.masks[name]
        for j in range(sharing.num_clusters[name]):
            members = w[mask & (index == j)]
            torch.testing.assert_close(members, members[:1].expand_as(members), rtol=1e-6, atol=1e-8)
        assert w.unique().numel() <= 16 + 1


def test_shared_values_stay_shared_with_adam_over_many_steps(tmp_path):
    model = tiny_classifier(lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4))
    pruning = Pruning(sparsity=0.7, schedule=OneShot(step=2))
    sharing = WeightSharing(bits=4, init="density")
    probe = Probe(weight_steps=[4])
    trainer(tmp_path, [pruning, sharing, probe], max_steps=40).fit(model, SyntheticDataModule())
    check_shared(model, sharing, dict.fromkeys(TARGETS, 4))
    at_4 = probe.weights[4]["net.hidden.1.weight"]
    assert at_4[sharing.masks["net.hidden.1.weight"]].unique().numel() <= 16
    assert not torch.equal(at_4, model.net.hidden[1].weight)  # trained after sharing


def test_gradient_accumulation_clusters_once(tmp_path):
    model = tiny_classifier()
    sharing = WeightSharing(bits=2, start_step=2)
    trainer(tmp_path, [sharing], max_steps=4, accumulate_grad_batches=2).fit(model, SyntheticDataModule())
    assert [h["step"] for h in sharing.history] == [2]
    check_shared(model, sharing, dict.fromkeys(TARGETS, 2))


class StopAt(L.Callback):
    """Ends the run at an optimizer step, as a kill would, without changing max_steps."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.parametrize("start_step", [None, 12])  # cluster before / after the checkpoint at step 8
def test_resume_mid_fine_tuning_equals_uninterrupted_run(tmp_path, start_step):
    def run(root, extra=(), ckpt_path=None):
        model = tiny_classifier(lambda p: torch.optim.Adam(p, lr=1e-3))
        pruning = Pruning(sparsity=0.8, schedule=OneShot(step=2))
        sharing = WeightSharing(bits=4, start_step=start_step, init="random", seed=3)
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH
        )
        fit = trainer(root, [pruning, sharing, checkpoint, *extra], max_steps=20, enable_checkpointing=True)
        fit.fit(model, SyntheticDataModule(shuffle=False), ckpt_path=ckpt_path)
        return model, sharing

    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[StopAt(STEPS_PER_EPOCH)])
    assert part_cb.clustered == (start_step is None)
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert resumed_cb.cluster_step == full_cb.cluster_step == (3 if start_step is None else 12)
    for name in TARGETS:
        assert torch.equal(resumed_cb.assignments[name], full_cb.assignments[name])
        assert torch.equal(resumed_cb.masks[name], full_cb.masks[name])
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_state_dict_round_trip():
    cb = WeightSharing(bits=2)
    cb.clustered, cb.cluster_step = True, 5
    cb.assignments = {"a.weight": torch.tensor([[0, 3]], dtype=torch.uint8)}
    cb.masks = {"a.weight": torch.tensor([[False, True]])}
    cb.num_clusters, cb.weight_bits = {"a.weight": 4}, {"a.weight": 2}
    other = WeightSharing(bits=2)
    other.load_state_dict(cb.state_dict())
    assert other.clustered and other.cluster_step == 5 and other.num_clusters == {"a.weight": 4}
    assert torch.equal(other.assignments["a.weight"], cb.assignments["a.weight"])
    assert torch.equal(other.masks["a.weight"], cb.masks["a.weight"])


def test_too_few_survivors_is_an_error_naming_the_layer(tmp_path):
    model = tiny_classifier()
    pruning = Pruning(sparsity=0.9, schedule="one_shot")  # the head keeps 16 of 160 weights
    sharing = WeightSharing(bits=5)
    message = r"'net.head' has 16 surviving .* fewer than the 32 = 2\*\*5.*'net.head': 4"
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, [pruning, sharing], max_steps=3).fit(model, SyntheticDataModule())


def test_too_few_survivors_reduce_gives_each_its_own_value(tmp_path):
    model = tiny_classifier()
    pruning = Pruning(sparsity=0.9, schedule="one_shot")
    sharing = WeightSharing(bits=5, on_too_few="reduce")
    with pytest.warns(UserWarning, match=r"net.head \(16 < 32\)"):
        trainer(tmp_path, [pruning, sharing], max_steps=1 + 1).fit(model, SyntheticDataModule())
    assert sharing.num_clusters["net.head.weight"] == 16
    check_shared(model, sharing, dict.fromkeys(TARGETS, 5))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(bits=0), ValueError, r"bits must be an int in 1\.\.8.*got 0"),
        (dict(bits=9), ValueError, r"bits must be an int in 1\.\.8.*got 9"),
        (dict(bits={"Linear": 12}), ValueError, r"bits\['Linear'\] must be an int in 1\.\.8.*got 12"),
        (dict(layer_bits={"net.head": 0}), ValueError, r"layer_bits\['net.head'\] must be an int in 1\.\.8"),
        (dict(layer_bits=["net.head"]), TypeError, "layer_bits must be a dict"),
        (dict(init="kmeans++"), ValueError, "init must be one of"),
        (dict(kmeans_iters=0), ValueError, "kmeans_iters must be a positive int"),
        (dict(empty_clusters="drop"), ValueError, "empty_clusters must be one of"),
        (dict(start_step=-1), ValueError, "start_step must be an optimizer step"),
        (dict(on_too_few="skip"), ValueError, "on_too_few must be one of"),
        (dict(gradient="max"), ValueError, "gradient must be one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        WeightSharing(**kwargs)


@pytest.mark.parametrize(
    "callbacks, message",
    [
        (
            lambda: [WeightSharing(include=["net.hiden.*"])],
            r"include pattern 'net.hiden.\*' matches no.*net.hidden.0",
        ),
        (lambda: [WeightSharing(layer_bits={"net.fc9": 3})], "layer_bits pattern 'net.fc9' matches no"),
        (lambda: [WeightSharing(bits={"Conv2d": 8})], r"bits keys \['Conv2d'\] name no targeted layer type"),
        (
            lambda: [Pruning(sparsity=0.5, schedule=OneShot(step=4)), WeightSharing(start_step=3)],
            r"start_step=3\) would cluster while pruning.*step 4.*start_step >= 5",
        ),
        (lambda: [WeightSharing(start_step=16)], "starts at optimizer step 16, but the run has only 16"),
    ],
)
def test_bad_configuration_fails_before_training(tmp_path, callbacks, message):
    model = tiny_classifier()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, callbacks(), max_steps=16).fit(model, SyntheticDataModule())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing trained


def test_bits_by_type_and_glob_override(tmp_path):
    class ConvNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 24 * 24, 10)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = ConvNet()
    sharing = WeightSharing(bits={"Conv2d": 6, "Linear": 2}, layer_bits={"net.0": 3})
    trainer(tmp_path, [sharing], max_steps=2).fit(module, SyntheticDataModule(num_train=64))
    assert sharing.weight_bits == {"net.0.weight": 3, "net.2.weight": 6, "net.4.weight": 2}
    assert sharing.num_clusters["net.2.weight"] <= 64 and sharing.num_clusters["net.4.weight"] <= 4
    for name, bits in sharing.weight_bits.items():
        assert module.get_parameter(name).unique().numel() <= 2**bits
    assert sharing.compression_summary()["bits"] == 6


def test_summary_claims_nothing_before_clustering():
    summary = WeightSharing(bits=4).compression_summary()
    assert summary["methods"] == [] and "bits" not in summary


class SavePerRank(L.Callback):
    """ddp_spawn fits in child processes: each rank writes its weights and its WeightSharing state."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        sharing = next(cb for cb in trainer.callbacks if isinstance(cb, WeightSharing))
        torch.save(
            {
                "weights": {n: p.detach().cpu() for n, p in pl_module.named_parameters()},
                "assignments": sharing.assignments,
                "codebooks": sharing.codebooks(),
            },
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


def test_two_ddp_ranks_share_identical_values(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(model="mlp", model_kwargs={"hidden": [32]})
    fit = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            Pruning(sparsity=0.8, schedule=OneShot(step=1)),
            WeightSharing(bits=3),
            SavePerRank(str(tmp_path)),
        ],
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    fit.fit(model, SyntheticDataModule(num_train=128, batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["assignments"].keys() == {"net.hidden.0.weight", "net.head.weight"}
    for name in ranks[0]["assignments"]:
        assert torch.equal(ranks[0]["assignments"][name], ranks[1]["assignments"][name])
        assert torch.equal(ranks[0]["codebooks"][name], ranks[1]["codebooks"][name])
        assert ranks[0]["weights"][name].unique().numel() <= 8 + 1
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name
