"""Quantization-aware training (issue 17 part 3): the fake quantization computes what the exported QDQ
graph computes (external oracle: onnxruntime on vaepack.quantize's rewrite of the same net): a tensor
read by two Convs and a skip connection is quantized once, for all readers, with the union range; a
module called twice is told apart; gradients pass (STE); the module is plain again afterwards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vaepack.errors import UsageError
from vaepack.quantize import act_qparams
from vaepack.train import qat


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)  # reads the same tensor as b, and so does the skip
        self.d = nn.Conv2d(8, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU()  # called twice: its first output is quantized, its second is not

    def forward(self, x):
        h = self.act(self.a(x))
        return self.d(self.act(self.b(h)) + self.c(h) + h)


def _ranges(net, xs):
    ranges = {}

    def hook(name):
        def f(_m, args):
            lo, hi = float(args[0].min()), float(args[0].max())
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return f

    hs = [m.register_forward_pre_hook(hook(n)) for n, m in qat.convs(net).items()]
    with torch.no_grad():
        for x in xs:
            net(x)
    for h in hs:
        h.remove()
    return ranges


@pytest.fixture
def net_and_data():
    torch.manual_seed(0)
    net = _Net().eval()
    xs = [torch.rand(1, 3, 24, 20) for _ in range(4)]
    return net, xs


def test_fake_quant_matches_the_exported_qdq_graph(net_and_data, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from vaepack.quantize import quantize_model

    net, xs = net_and_data
    ranges = _ranges(net, xs)
    ranges["c"] = [ranges["c"][0], ranges["c"][1] * 0.5]  # b and c now disagree: the export takes the union
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (xs[0],), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)
    model, stats = quantize_model(onnx.load(str(path)), net, {"ranges": ranges, "model": "t", "part": "encoder"})
    assert stats["quantized_convs"] == 4 and stats["quantized_tensors"] == 3
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 24, 20)
    want = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])
    plan = qat.FakeQuantPlan(net, x, ranges)
    assert plan.ranges["b"] == plan.ranges["c"] == [ranges["b"][0], max(ranges["b"][1], ranges["c"][1])]
    assert plan.at_input and set(plan.at_output) == {("act", 0)} and set(plan.at_conv) == {"d"}
    naive = copy.copy(plan)  # each Conv's input quantized with its own range, other readers float
    naive.at_input, naive.at_output = None, {}
    naive.at_conv = {n: act_qparams(r) for n, r in ranges.items()}
    with torch.no_grad():
        plain = net(x)
        with qat.fake_quantized(net, plan):
            got = net(x)
        with qat.fake_quantized(net, naive):
            per_conv = net(x)
    # Equal but for rounding flips: a value within float error of a rounding boundary takes the other
    # code in one of the two, and the next layer carries that one step on.
    scale = float(want.abs().max())

    def off(y):  # the share of outputs that differ from the graph's
        return float(((y - want).abs() > 1e-5 * scale).float().mean())

    assert off(got) <= 0.05 and (got - want).abs().max() <= 0.01 * scale
    assert off(plain) > 0.5 and off(per_conv) > 0.5  # float, or b and c with their own ranges, are not it


def test_gradients_pass_and_the_module_is_plain_afterwards(net_and_data):
    net, xs = net_and_data
    keys = set(net.state_dict())
    ranges = _ranges(net, xs)
    with qat.fake_quantized(net, qat.FakeQuantPlan(net, xs[0], ranges)):
        net(xs[0]).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert set(net.state_dict()) == keys
    assert not any(m._forward_pre_hooks for m in net.modules())


def test_unknown_conv_in_the_calibration_is_refused(net_and_data):
    net, _ = net_and_data
    with pytest.raises(UsageError, match="does not have"):
        qat.FakeQuantPlan(net, torch.rand(1, 3, 8, 8), {"nope": [0.0, 1.0]})


def test_cli_errors_are_one_line(tmp_path, run_cli, clean_error):
    code, _, err = run_cli("train-qat", "--out", tmp_path / "run", "--export-only")
    assert code == 2
    clean_error(err, "holds no QAT checkpoint", "train-qat --data")
    code, _, err = run_cli("train-qat", "--out", tmp_path / "run")
    assert code == 2
    clean_error(err, "--data is required")
    (tmp_path / "d").mkdir()
    code, _, err = run_cli("train-qat", "--out", tmp_path / "run", "--data", tmp_path / "d", "--loss", "huber")
    assert code == 2
    clean_error(err, "unknown --loss")
