import pytest
import torch

from lit_compress.models import LeNet5, LeNet300100, create_model, list_models

# (kwargs, input shape) per registered model: every name must appear here.
SHAPES = {
    "maxout_mlp": ({"units": [8, 6], "pieces": 3}, (2, 1, 28, 28)),
    "lenet_300_100": ({}, (2, 1, 28, 28)),
    "lenet5": ({}, (2, 1, 28, 28)),
    "lenet5_small": ({}, (2, 1, 28, 28)),
    "mlp": ({"hidden": [32, 16]}, (2, 1, 28, 28)),
    "mlp_2x800": ({}, (2, 1, 28, 28)),
    "mlp_2x1200": ({}, (2, 1, 28, 28)),
    "resnet": ({"depth": 8, "in_chans": 1}, (2, 1, 28, 28)),
    "resnet8": ({"in_chans": 1}, (2, 1, 28, 28)),
    "resnet14": ({"shortcut": "B"}, (2, 3, 32, 32)),
    "resnet20": ({}, (2, 3, 32, 32)),
    "resnet32": ({"in_chans": 1}, (2, 1, 28, 28)),
    "resnet44": ({}, (2, 3, 32, 32)),
    "resnet56": ({"shortcut": "B"}, (2, 3, 32, 32)),
    "resnet110": ({"in_chans": 1}, (1, 1, 28, 28)),
    "cifarnet": ({}, (2, 3, 32, 32)),
    "binary_mlp": ({"hidden": [32, 16]}, (2, 1, 28, 28)),
    "binary_lenet5": ({"widths": [4, 6, 8]}, (2, 1, 28, 28)),
}


def test_every_registered_model_has_a_shape_test():
    assert sorted(SHAPES) == list_models()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_registered_model_output_shape(name):
    kwargs, shape = SHAPES[name]
    model = create_model(name, num_classes=7, **kwargs)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 7)
    out.sum().backward()  # every model must be trainable end to end
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_published_parameter_counts():
    assert sum(p.numel() for p in LeNet5().parameters()) == 431_080
    assert sum(p.numel() for p in LeNet300100().parameters()) == 266_610
    # He et al. 2016: ResNet-20 has 0.27M parameters on CIFAR (3 input channels, option A shortcuts).
    assert sum(p.numel() for p in create_model("resnet20").parameters()) == 269_722


def test_lenet5_small_is_four_times_smaller_and_widths_are_validated():
    small = create_model("lenet5_small")
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (12, 30, 200)
    assert sum(p.numel() for p in small.parameters()) == 107_552  # 431,080 / 4.01
    with pytest.raises(ValueError, match="widths must be three positive ints"):
        LeNet5(widths=(12, 0, 200))


def test_lenet5_caffe_layout():
    net = LeNet5()
    assert (net.conv1.out_channels, net.conv2.out_channels, net.fc1.out_features) == (20, 50, 500)
    assert net.fc1.in_features == 800
    assert LeNet5(img_size=32, in_chans=3).fc1.in_features == 50 * 5 * 5


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'lenet'.*Did you mean.*lenet5.*Valid names"):
        create_model("lenet")


def test_bad_constructor_arguments_are_clear():
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        create_model("resnet", depth=21)
    with pytest.raises(ValueError, match="dropout must be in"):
        create_model("lenet5", dropout=1.5)
    with pytest.raises(ValueError, match="hidden must be a non-empty list"):
        create_model("mlp", hidden=[])


def test_timm_model_by_prefix():
    model = create_model("timm:resnet18", num_classes=10, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_timm_refuses_hub_download_and_unknown_names():
    with pytest.raises(ValueError, match="never does that"):
        create_model("timm:resnet18", pretrained=True)
    with pytest.raises(ValueError, match="unknown timm model 'resnet19x'"):
        create_model("timm:resnet19x")


def test_local_weights_file_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file

    src = create_model("lenet_300_100")
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    for f in ("w.safetensors", "w.pt"):
        loaded = create_model("lenet_300_100", weights=tmp_path / f)
        assert torch.equal(loaded.fc1.weight, src.fc1.weight)


def test_local_weights_file_refuses_pickled_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    torch.save({"fc1.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refusing to load"):
        create_model("lenet_300_100", weights=tmp_path / "evil.pt")


def test_resnet_stochastic_depth_skips_residuals_per_image_in_training_only():
    torch.manual_seed(0)
    model = create_model("resnet14", in_chans=1, drop_path_rate=0.6)
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    assert [b.drop_path for b in blocks] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # linear (Huang)
    block = blocks[-1].train()  # 64 -> 64 channels, identity shortcut
    x = torch.randn(64, 64, 7, 7)
    with torch.no_grad():
        out = block(x)
    skipped = [torch.equal(out[i], torch.relu(x[i])) for i in range(x.shape[0])]  # branch dropped: relu(x)
    assert 10 < sum(skipped) < 54  # per image, about 60% of 64
    model.eval()
    y = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(y), model(y))  # eval never skips
    with pytest.raises(ValueError, match=r"drop_path_rate .* must be in \[0, 1\), got 1.0"):
        create_model("resnet8", drop_path_rate=1.0)
