"""The student's evaluation graph (distill.trainer.eval_view): ReLU6-style clips computed as
min(relu(x), M), the same logits bit for bit, following the parameters while they train."""
import json

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from distill.graphnorm import relu_min_for_clip
from distill.trainer import eval_view, predict


def _ops(sym):
    return [n["op"] for n in json.loads(sym.tojson())["nodes"]]


def test_rewrite_is_exact_and_leaves_other_clips_alone():
    x = mx.sym.var("data")
    c = mx.sym.Convolution(x, num_filter=6, kernel=(3, 3), pad=(1, 1), name="c")
    relu6 = mx.sym.clip(c, 0, 6, name="relu6")
    hswish = relu6 * (mx.sym.clip(relu6 + 3, 0, 6, name="hsig") / 6)       # hard-swish
    sym = mx.sym.clip(hswish, -1, 1, name="signed")                         # not a ReLU6: kept
    fast = relu_min_for_clip(sym)
    assert _ops(fast).count("clip") == 1 and _ops(fast).count("_minimum_scalar") == 2
    names = fast.get_internals().list_outputs()
    assert "relu6_output" in names and "hsig_output" in names               # taps keep their names
    rng = np.random.RandomState(0)
    args = {"data": mx.nd.array(rng.randn(2, 3, 5, 5) * 4), "c_weight": mx.nd.array(rng.randn(6, 3, 3, 3)),
            "c_bias": mx.nd.array(rng.randn(6))}
    a = sym.bind(mx.cpu(), args).forward()[0].asnumpy()
    b = fast.bind(mx.cpu(), args).forward()[0].asnumpy()
    assert np.array_equal(a, b)
    assert relu_min_for_clip(mx.sym.Activation(x, act_type="relu")) is None


def test_view_of_a_training_student_gives_its_logits_as_it_trains():
    from gluoncv.model_zoo import get_model
    net = get_model("mobilenetv2_0.25", classes=4)
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    x = np.random.RandomState(0).rand(40, 3, 32, 32).astype("float32")
    view = eval_view(net)
    assert view is not net and eval_view(net) is view                       # built once
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for step in range(3):                   # the view reads the parameters as they change
        np.testing.assert_array_equal(predict(net, x, 16), predict(net, x, 16, fast=True))
        with autograd.record():
            loss = loss_fn(net(mx.nd.array(x[:8])), mx.nd.array([0, 1, 2, 3] * 2))
        loss.backward()
        trainer.step(8)
    np.testing.assert_array_equal(predict(net, x, 16), predict(net, x, 16, fast=True))
    ops = _ops(view._cached_graph[1])
    assert "clip" not in ops and "_minimum_scalar" in ops    # MobileNetV2's ReLU6s, all rewritten


def test_networks_without_relu6_are_evaluated_as_they_are():
    from gluoncv.model_zoo import get_model
    net = get_model("cifar_resnet20_v1", classes=4)
    net.initialize()
    net.hybridize()
    assert eval_view(net) is net
