"""A non-ResNet Module-API teacher, as our users write them: two branches concatenated, a
grouped and a depthwise convolution, a residual add, FullyConnected + SoftmaxOutput."""
import logging

import mxnet as mx
import numpy as np


def branchy_symbol(num_classes=10, width=16):
    data = mx.sym.var("data")
    x = mx.sym.Convolution(data, num_filter=width, kernel=(3, 3), pad=(1, 1), name="stem_conv")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="stem_bn")
    x = mx.sym.Activation(x, act_type="relu", name="stem_relu")
    a = mx.sym.Convolution(x, num_filter=width, kernel=(1, 1), name="branch_a_conv")
    a = mx.sym.Activation(a, act_type="relu", name="branch_a_relu")
    b = mx.sym.Convolution(x, num_filter=width, kernel=(3, 3), pad=(1, 1), num_group=4, name="branch_b_gconv")
    b = mx.sym.Activation(b, act_type="relu", name="branch_b_relu")
    cat = mx.sym.Concat(a, b, dim=1, name="concat")
    d = mx.sym.Convolution(cat, num_filter=2 * width, kernel=(3, 3), pad=(1, 1), num_group=2 * width,
                           no_bias=True, name="dw_conv")
    d = mx.sym.BatchNorm(d, fix_gamma=False, name="dw_bn")
    d = mx.sym.Activation(d, act_type="relu", name="dw_relu")
    d = mx.sym.Convolution(d, num_filter=2 * width, kernel=(1, 1), name="pw_conv")
    res = mx.sym.elemwise_add(d, cat, name="residual_add")
    res = mx.sym.Activation(res, act_type="relu", name="res_relu")
    p = mx.sym.Pooling(res, kernel=(2, 2), stride=(2, 2), pool_type="max", name="pool")
    f = mx.sym.Flatten(p, name="flatten")
    fc = mx.sym.FullyConnected(f, num_hidden=num_classes, name="fc")
    return mx.sym.SoftmaxOutput(fc, name="softmax")


def train_module(prefix, train, val, epochs=8, batch_size=64, seed=0, width=16):
    """Train :func:`branchy_symbol` with the Module API and ``save_checkpoint(prefix, 0)``."""
    mx.random.seed(seed)
    np.random.seed(seed)
    classes = int(train.y.max()) + 1
    it = mx.io.NDArrayIter(train.x, train.y.astype("float32"), batch_size, shuffle=True,
                           label_name="softmax_label")
    mod = mx.mod.Module(branchy_symbol(classes, width), data_names=["data"], label_names=["softmax_label"])
    logging.getLogger().setLevel(logging.WARNING)
    mod.fit(it, num_epoch=epochs, optimizer="adam", optimizer_params={"learning_rate": 0.005},
            initializer=mx.init.Xavier(), eval_metric="acc")
    mod.save_checkpoint(prefix, 0)
    probs = mod.predict(mx.io.NDArrayIter(val.x, batch_size=batch_size)).asnumpy()  # padding removed
    return float((probs.argmax(1) == val.y).mean() * 100)
