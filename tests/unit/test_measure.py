"""lit_compress.measure: exact counts on hand-built reference nets, extension points, report, callback."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.measure import (
    CompressionReport,
    compression_report,
    count_macs,
    count_params,
    file_bytes,
    fp32_bytes,
    layer_params,
    mac_counter_for,
    measure_latency,
    register_mac_counter,
    state_dict_bytes,
    unregister_mac_counter,
)


def lenet5() -> nn.Module:
    """LeNet-5, Caffe variant (Han et al.): 431,080 parameters, 2,293,000 MACs on 1x28x28."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, 10),
    )


def lenet300() -> nn.Module:
    """LeNet-300-100: 266,610 parameters, 266,200 MACs."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


# -- exact reference numbers ------------------------------------------------------------------------------


def test_lenet5_params_and_macs_exact():
    net = lenet5()
    counts = count_params(net)
    assert (counts.total, counts.nonzero, counts.trainable) == (431_080, 431_080, 431_080)
    macs = count_macs(net, input_shape=[1, 28, 28])
    assert macs.dense == macs.effective == 2_293_000
    assert isinstance(macs.dense, int)
    assert [(m.name, m.type, m.dense) for m in macs.layers] == [
        ("0", "Conv2d", 288_000),
        ("2", "Conv2d", 1_600_000),
        ("5", "Linear", 400_000),
        ("7", "Linear", 5_000),
    ]


def test_lenet300_params_macs_bytes_exact():
    net = lenet300()
    assert count_params(net).total == 266_610
    assert count_macs(net, [1, 28, 28]).dense == 266_200  # shape given positionally
    assert fp32_bytes(net) == 1_066_440
    assert state_dict_bytes(net) == 1_066_440  # fp32, no buffers
    assert sum(r.params for r in layer_params(net)) == 266_610


def test_batch_size_independence_and_ints():
    net = lenet5()
    one = count_macs(net, torch.randn(1, 1, 28, 28))
    five = count_macs(net, torch.randn(5, 1, 28, 28))
    assert one.layers == five.layers and (one.dense, one.effective) == (five.dense, five.effective)
    assert five.batch_size == 5 and all(isinstance(m.dense, int) for m in five.layers)


# -- conv and linear variants -----------------------------------------------------------------------------


def test_zeroing_half_a_conv_halves_effective_macs():
    conv = nn.Conv2d(4, 8, 3)
    with torch.no_grad():
        conv.weight.view(-1)[: conv.weight.numel() // 2] = 0
        conv.weight.view(-1)[conv.weight.numel() // 2 :] = 1  # no accidental zeros in the other half
    macs = count_macs(conv, input_shape=[4, 10, 10])
    assert macs.dense == 8 * 64 * 4 * 9
    assert macs.effective * 2 == macs.dense
    assert count_params(conv).nonzero == conv.weight.numel() // 2 + 8  # plus the bias
    assert macs.reduction == 2.0


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=2, groups=4), [8, 16, 16]),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), [8, 10, 10]),  # depthwise
        (nn.Conv1d(6, 4, 3, groups=2), [6, 20]),
        (nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2)), [2, 3, 9, 9]),
    ],
)
def test_grouped_strided_dilated_convs(conv: nn.Module, shape: list[int]):
    out = conv(torch.zeros(1, *shape))
    positions = out[0, 0].numel()
    k = torch.tensor(conv.kernel_size).prod().item()
    expected = conv.out_channels * positions * (conv.in_channels // conv.groups) * k
    assert count_macs(conv, input_shape=shape).dense == expected


def test_depthwise_conv_value():
    assert count_macs(nn.Conv2d(8, 8, 3, padding=1, groups=8), input_shape=[8, 10, 10]).dense == 8 * 100 * 9


def test_conv_transpose_counts_input_positions():
    deconv = nn.ConvTranspose2d(4, 6, 3, stride=2)
    assert count_macs(deconv, input_shape=[4, 5, 5]).dense == 25 * 4 * 6 * 9


def test_linear_on_sequence_input():
    lin = nn.Linear(6, 4)
    macs = count_macs(lin, torch.randn(3, 5, 6))
    assert macs.dense == 5 * 6 * 4 and macs.effective == 5 * 6 * 4


def test_linear_subclass_uses_builtin_counter_via_mro():
    class MyLinear(nn.Linear):
        pass

    assert count_macs(MyLinear(3, 2), input_shape=[3]).dense == 6


def test_unused_and_repeated_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 100)

        def forward(self, x):
            return self.a(self.a(x))  # called twice: counted twice

    macs = count_macs(Net(), input_shape=[4])
    assert macs.by_name()["a"].dense == 32 and macs.by_name()["unused"].dense == 0 and macs.dense == 32


# -- extension points ----------------------------------------------------------------------------------------


class SkippedBlock(nn.Module):
    """A gated block: counts dense MACs always, effective only for the examples it runs on (here: first)."""

    def __init__(self, c_in: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(c_in, 2, 3, padding=1)
        self.inner = nn.Linear(2, 2)

    def forward(self, x):
        return self.conv(x)

    def compression_macs(self, inputs, output):
        batch = inputs[0].shape[0]
        per_example = output[0].numel() * self.conv.in_channels * 9
        return batch * per_example, per_example  # only one example executed the block


def test_compression_macs_takes_over_subtree_and_gives_float_means():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), SkippedBlock())
    macs = count_macs(net, torch.randn(8, 1, 5, 5))
    assert [m.name for m in macs.layers] == ["0", "1"]  # 1.conv and 1.inner are not listed
    block = macs.by_name()["1"]
    assert block.type == "SkippedBlock"
    assert block.dense == 50 * 18 and block.effective == 50 * 18 / 8
    assert isinstance(block.effective, float)
    assert macs.dense == 2 * 25 + 50 * 18  # no double counting of the inner conv


def test_counted_module_called_inside_counted_module_counts_once():
    shared = nn.Linear(3, 3)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = shared

        def forward(self, x):
            return self.lin(x)

        def compression_macs(self, inputs, output):
            return 1, 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = Wrapper()
            self.lin = shared  # also reachable outside the wrapper, so it is hooked

        def forward(self, x):
            return self.lin(self.w(x))

    macs = count_macs(Net(), input_shape=[3])
    assert macs.by_name()["w"].dense == 1 and macs.by_name()["lin"].dense == 9 and macs.dense == 10


def test_compression_macs_method_beats_the_registry():
    class GatedConv(nn.Conv2d):
        def compression_macs(self, inputs, output):
            return torch.tensor(10), torch.count_nonzero(torch.zeros(3))  # tensors are accepted

    macs = count_macs(GatedConv(1, 1, 1), input_shape=[1, 2, 2])
    assert (macs.dense, macs.effective) == (10, 0) and macs.reduction == float("inf")


class Scaler(nn.Module):
    def __init__(self, n: int = 4):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.child = nn.Linear(n, n)  # inside a registered type: not counted separately

    def forward(self, x):
        return self.child(x * self.scale)


def test_registered_counter_mro_override_and_errors():
    class SubScaler(Scaler):
        pass

    @register_mac_counter(Scaler)
    def count_scaler(module, inputs, output):
        return inputs[0].shape[0] * 7, inputs[0].shape[0] * 5

    try:
        assert mac_counter_for(SubScaler()) is count_scaler
        macs = count_macs(nn.Sequential(Scaler(), SubScaler()), torch.randn(3, 4))
        assert [(m.name, m.type, m.dense, m.effective) for m in macs.layers] == [
            ("0", "Scaler", 7, 5),
            ("1", "SubScaler", 7, 5),
        ]
        with pytest.raises(ValueError, match="override=True"):
            register_mac_counter(Scaler)(count_scaler)
        register_mac_counter(Scaler, override=True)(lambda m, i, o: (1, 1, 1))
        with pytest.raises(TypeError, match="dense, effective"):
            count_macs(Scaler(), input_shape=[4])
    finally:
        unregister_mac_counter(Scaler)
    assert mac_counter_for(Scaler()) is None
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_mac_counter(int)


# -- modes, hooks, threads, inputs ---------------------------------------------------------------------------


def test_modes_restored_and_hooks_removed_even_on_error():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout())
    net.train()
    net[1].eval()  # a frozen BN inside a training model keeps its own mode
    count_macs(net, input_shape=[4])
    assert [m.training for m in net.modules()] == [True, True, False, True]

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    bad = nn.Sequential(nn.Linear(4, 4), Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        count_macs(bad, input_shape=[4])
    assert bad.training and not bad[0]._forward_hooks and not bad[0]._forward_pre_hooks


def test_input_validation():
    net = lenet300()
    with pytest.raises(ValueError, match="exactly one"):
        count_macs(net)
    with pytest.raises(ValueError, match="exactly one"):
        count_macs(net, torch.zeros(1, 784), input_shape=[784])
    with pytest.raises(ValueError, match="positive ints"):
        count_macs(net, input_shape=[0, 28])


def test_latency_restores_threads_and_mode():
    net = lenet300().train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = measure_latency(net, [1, 28, 28], batch_sizes=(1, 4), repeats=2, warmup=1, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert net.training and sorted(results) == [1, 4]
    assert all(0 < r.min_ms <= r.median_ms and r.threads == 1 for r in results.values())
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(net, [784], repeats=0)


def test_latency_on_given_inputs_cycles_through_windows_of_them():
    seen: list[torch.Tensor] = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x[:, 0].clone())
            return x

    images = torch.arange(5.0).view(5, 1)
    measure_latency(Recorder(), [1], batch_sizes=(2,), repeats=3, warmup=1, inputs=images)
    # warm-up [0, 1], then [2, 3], a wrap-around (only 1 image left) to [0, 1], then [2, 3]
    assert [t.tolist() for t in seen] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match=r"inputs must have shape \[N, 3\]"):
        measure_latency(Recorder(), [3], batch_sizes=(1,), repeats=1, inputs=images)


def test_importing_measure_does_not_import_lightning():
    code = "import sys, lit_compress.measure; print(any(m.startswith('lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- sizes and report ----------------------------------------------------------------------------------------


def test_tied_weights_counted_once():
    a, b = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)
    b.weight = a.weight
    net = nn.Sequential(a, b)
    assert count_params(net).total == 25 == sum(r.params for r in layer_params(net))
    assert state_dict_bytes(net) == 100 and fp32_bytes(net) == 100


def test_state_dict_bytes_includes_buffers_with_dtypes():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    # 6 linear + 4 bn params + running mean/var (2 x 2 fp32) + num_batches_tracked (int64)
    assert state_dict_bytes(net) == (6 + 4 + 4) * 4 + 8
    assert fp32_bytes(net) == 10 * 4


def test_report_rows_roundtrip_and_table(tmp_path: Path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), SkippedBlock(c_in=4))
    with torch.no_grad():
        net[0].weight[0] = 0
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    report = compression_report(
        net,
        input_shape=[1, 6, 6],
        latency=True,
        latency_options={"batch_sizes": (1, 2), "repeats": 2, "warmup": 0},
        file_path=path,
    )
    rows = {r.name: r for r in report.layers}
    assert list(rows) == ["0", "1", "2", "2.conv", "2.inner"]
    assert rows["0"].macs_dense == 16 * 36 and rows["0"].macs_effective == 16 * 27
    assert rows["1"].macs_dense is None and rows["1"].params == 8
    assert rows["2"].params == 0 and rows["2.conv"].macs_dense is None
    assert report.file_bytes == file_bytes(path) == path.stat().st_size
    assert report.compression_ratio == report.params_total / report.params_nonzero
    assert report.input_shape == [1, 6, 6] and sorted(report.latency) == [1, 2]

    data = json.loads(json.dumps(report.to_dict()))
    assert CompressionReport.from_dict(data) == report
    assert data["derived"]["mac_reduction"] == pytest.approx(report.mac_reduction)

    table = report.format_table()
    for text in (
        "2.conv",
        "BatchNorm2d",
        "TOTAL",
        f"{report.params_total:,}",
        "latency batch 2",
        "file bytes",
    ):
        assert text in table
    with pytest.raises(ValueError, match="format"):
        CompressionReport.from_dict({"layers": []})
    with pytest.raises(FileNotFoundError):
        file_bytes(tmp_path / "missing.pt")


def test_report_from_example_tensor_and_lenet5_table():
    report = compression_report(lenet5(), torch.randn(2, 1, 28, 28))
    assert report.input_shape == [1, 28, 28] and report.macs_dense == 2_293_000
    assert "2,293,000" in report.format_table() and report.fp32_bytes == 1_724_320


# -- callback ------------------------------------------------------------------------------------------------


def tiny_module_class(base: type) -> type:
    class Tiny(base):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
            self.loss_fn = nn.CrossEntropyLoss()

        def _step(self, batch):
            x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
            return F.cross_entropy(self.net(x), y)

        def training_step(self, batch, batch_idx):
            return self._step(batch)

        def test_step(self, batch, batch_idx):
            self.log("test_loss", self._step(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny


class DictData(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": torch.randn(1, 4, 4), "label": i % 2}


def tuple_loader():
    ds = torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,)))
    return torch.utils.data.DataLoader(ds, batch_size=4)


TRAINER_KW = dict(
    max_steps=2, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False
)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_callback_lightning_csv_logger_and_checkpoint_dir(tmp_path: Path):
    import lightning.pytorch as lp
    from lightning.pytorch.loggers import CSVLogger

    from lit_compress.measure import CompressionSummary

    cb = CompressionSummary()  # input shape from the first (x, y) batch; measures module.net
    logger = CSVLogger(tmp_path, name="csv")
    trainer = lp.Trainer(
        callbacks=[cb], logger=logger, default_root_dir=tmp_path, log_every_n_steps=1, **TRAINER_KW
    )
    trainer.fit(tiny_module_class(lp.LightningModule)(), train_dataloaders=tuple_loader())

    assert cb.last_report_path == Path(trainer.checkpoint_callback.dirpath) / "compression_report.json"
    data = json.loads(cb.last_report_path.read_text())
    assert data["params_total"] == 16 * 8 + 8 + 8 * 2 + 2 and data["macs_dense"] == 16 * 8 + 8 * 2
    assert data["input_shape"] == [1, 4, 4] and data["model"] == "Sequential"
    assert CompressionReport.from_dict(data) == cb.last_report
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("compression/params_total")]
    assert logged and float(logged[-1]["compression/macs_dense"]) == 144.0
    assert float(logged[-1]["compression/ratio"]) == 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_callback_without_logger_or_checkpoint_and_dict_batches(tmp_path: Path):
    import lightning.pytorch as lp

    from lit_compress.measure import CompressionSummary

    cb = CompressionSummary(report_name="summary.json", verbose=False)
    trainer = lp.Trainer(
        callbacks=[cb], logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **TRAINER_KW
    )
    module = tiny_module_class(lp.LightningModule)()
    loader = torch.utils.data.DataLoader(DictData(), batch_size=4)
    trainer.fit(module, train_dataloaders=loader)
    assert cb.last_report_path == tmp_path / "summary.json" and cb.last_report.input_shape == [1, 4, 4]
    (tmp_path / "summary.json").unlink()
    trainer.test(module, dataloaders=loader, verbose=False)
    assert (tmp_path / "summary.json").is_file()
    assert not list(tmp_path.glob(".summary.json.*"))  # no temp files left behind


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_callback_pytorch_lightning_flavour(tmp_path: Path):
    import pytorch_lightning as pl

    from lit_compress._flavour import make_flavour, registered_implementations
    from lit_compress.measure import CompressionSummary  # noqa: F401  (registers the implementation)

    PLSummary = make_flavour(registered_implementations()["CompressionSummary"], pl.Callback, "tests")
    cb = PLSummary(input_shape=[1, 4, 4], model_attr="net", verbose=False)
    assert isinstance(cb, pl.Callback)
    trainer = pl.Trainer(
        callbacks=[cb], logger=False, enable_checkpointing=False, default_root_dir=tmp_path, **TRAINER_KW
    )
    trainer.fit(tiny_module_class(pl.LightningModule)(), train_dataloaders=tuple_loader())
    assert cb.last_report_path == tmp_path / "compression_report.json"
    assert cb.last_report.macs_dense == 144 and cb.last_report_path.is_file()


def test_callback_argument_validation_and_resolution():
    from lit_compress.measure import CompressionSummary

    with pytest.raises(ValueError, match="positive ints"):
        CompressionSummary(input_shape=[1, -4])
    with pytest.raises(ValueError, match="plain file name"):
        CompressionSummary(report_name="dir/report.json")
    with pytest.raises(ValueError, match="True or False"):
        CompressionSummary(latency="yes")
    with pytest.raises(ValueError, match="attribute name"):
        CompressionSummary(model_attr="net.0")

    module = nn.Module()
    module.backbone = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"no nn.Module attribute 'net'.*\['backbone'\]"):
        CompressionSummary(model_attr="net").setup(None, module, "fit")
    assert CompressionSummary()._target(module) is module  # no `net`: the whole module

    cb = CompressionSummary()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(input_shape=(3, 8, 8)))
    assert cb._resolve_input_shape(trainer) == [3, 8, 8]
    assert CompressionSummary(input_shape=[1, 2])._resolve_input_shape(trainer) == [1, 2]
