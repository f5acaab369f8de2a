"""The PyTorch half of ``bench/peers.py``: our two students written in PyTorch, the weight copy
from an exported MXNet pair, MACs/params counted as :mod:`distill.modelinfo` counts them, and
Torch-Pruning + KD with the loop of :mod:`distill.trainer` (same loss, update, lr and batch order).

This module imports torch at the top: only ``.venv-peers`` (``make bench-peers``) and the test
that runs there import it. It imports no MXNet either (two OpenMP runtimes in one training
process): the MXNet side hands over numpy arrays (:func:`copy_from_mxnet` takes the symbol's
JSON text and a name → array dict).

* :class:`CifarResNet20` is GluonCV's ``cifar_resnet20_v1`` (stem 3×3/16 conv + BatchNorm, no
  ReLU, as GluonCV writes it; three stages of three basic blocks, 16/32/64 channels, a 1×1 strided shortcut where the shape changes).
* :class:`MobileNetV2` is GluonCV's ``MobileNetV2`` with ``multiplier=0.5`` and our adaptation
  to 28×28 (:mod:`students.adapt`: the stem conv at stride 1, total stride 16); its classifier
  is a 1×1 conv without bias, as GluonCV's.

Every conv / BatchNorm / dense layer carries the name the MXNet graph gives it (``stage2_conv2``,
``features_linearbottleneck3_batchnorm1``), derived the way Gluon numbers layers (one counter per
name scope, in construction order), so the copy is by name and checks every shape and attribute.
"""
import logging
import math
import sys

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["CifarResNet20", "MobileNetV2", "build", "copy_from_mxnet", "count_macs_params",
           "kd_loss", "make_optimizer", "train_kd", "predict", "torch_prune", "agp_ratios"]
_LOGGER = logging.getLogger(__name__)

MXNET_BN_EPS = 1e-5        # Gluon's BatchNorm default; checked against the graph's attribute
MXNET_BN_MOMENTUM = 0.9    # running = 0.9 · running + 0.1 · batch, i.e. torch's momentum 0.1


class _Names:
    """Gluon's layer numbering in one name scope: ``conv0, conv1, ...`` and ``batchnorm0, ...``."""

    def __init__(self, scope):
        self.scope, self.count = scope, {}

    def __call__(self, kind):
        k = self.count.get(kind, 0)
        self.count[kind] = k + 1
        return f"{self.scope}{kind}{k}"


def _conv_bn(names, cin, cout, k, stride, groups=1):
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    bn = nn.BatchNorm2d(cout, eps=MXNET_BN_EPS, momentum=1 - MXNET_BN_MOMENTUM)
    conv.mx_name, bn.mx_name = names("conv"), names("batchnorm")
    return conv, bn


class BasicBlockV1(nn.Module):
    """GluonCV's ``CIFARBasicBlockV1``: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, names, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(names, cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(names, cout, cout, 3, 1)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*_conv_bn(names, cin, cout, 1, stride))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet20(nn.Module):
    """``cifar_resnet20_v1``: ``(N, C, H, W)`` → ``(N, classes)`` logits."""

    def __init__(self, channels=1, classes=10):
        super().__init__()
        top = _Names("")
        self.conv0, self.bn0 = _conv_bn(top, channels, 16, 3, 1)
        stages, cin = [], 16
        for s, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            names = _Names(f"stage{s + 1}_")
            blocks = [BasicBlockV1(names, cin if b == 0 else cout, cout, stride if b == 0 else 1)
                      for b in range(3)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, classes)
        self.fc.mx_name = top("dense")

    def forward(self, x):
        x = self.stages(self.bn0(self.conv0(x)))        # GluonCV's stem has no ReLU
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def classifier(self):
        return self.fc


class LinearBottleneck(nn.Module):
    """GluonCV's MobileNetV2 block: 1×1 expand (t ≠ 1), 3×3 depthwise, 1×1 linear projection,
    ReLU6 after the first two, identity shortcut when the stride is 1 and the width unchanged."""

    def __init__(self, names, cin, cout, t, stride):
        super().__init__()
        self.use_shortcut = stride == 1 and cin == cout
        layers, mid = [], cin * t
        if t != 1:
            layers += [*_conv_bn(names, cin, mid, 1, 1), nn.ReLU6()]
        layers += [*_conv_bn(names, mid, mid, 3, stride, groups=mid), nn.ReLU6()]
        layers += list(_conv_bn(names, mid, cout, 1, 1))
        self.out = nn.Sequential(*layers)

    def forward(self, x):
        out = self.out(x)
        return out + x if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """GluonCV's ``MobileNetV2(multiplier)``; ``stem_stride=1`` is our adaptation to 28×28
    (:func:`students.adapt.adapt_strides` removes the stem's downsampling first)."""

    def __init__(self, multiplier=0.5, channels=1, classes=10, stem_stride=1):
        super().__init__()
        feats = _Names("features_")
        m = multiplier
        layers = [*_conv_bn(feats, channels, int(32 * m), 3, stem_stride), nn.ReLU6()]
        ins = [int(x * m) for x in [32] + [16] + [24] * 2 + [32] * 3 + [64] * 4 + [96] * 3 + [160] * 3]
        outs = [int(x * m) for x in [16] + [24] * 2 + [32] * 3 + [64] * 4 + [96] * 3 + [160] * 3 + [320]]
        ts = [1] + [6] * 16
        strides = [1, 2] * 2 + [1, 1, 2] + [1] * 6 + [2] + [1] * 3
        for i, (cin, cout, t, s) in enumerate(zip(ins, outs, ts, strides)):
            layers.append(LinearBottleneck(_Names(f"features_linearbottleneck{i}_"), cin, cout, t, s))
        last = int(1280 * m) if m > 1.0 else 1280
        layers += [*_conv_bn(feats, outs[-1], last, 1, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pred = nn.Conv2d(last, classes, 1, bias=False)
        self.pred.mx_name = "output_pred"

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return torch.flatten(self.pred(x), 1)

    def classifier(self):
        return self.pred


def build(model, channels=1, classes=10):
    """``"resnet20"`` or ``"mobilenetv2"`` (0.5, adapted to 28×28), uninitialised weights."""
    if model == "resnet20":
        return CifarResNet20(channels, classes)
    if model == "mobilenetv2":
        return MobileNetV2(0.5, channels, classes, stem_stride=1)
    raise ValueError(f"unknown model {model!r}: resnet20 or mobilenetv2")


# -- the weight copy ------------------------------------------------------------------------------

def _mx_layers(symbol_json):
    """``{layer name without the net's prefix: (op, attrs)}`` and that prefix, from the graph."""
    import json
    nodes = [n for n in json.loads(symbol_json)["nodes"]
             if n["op"] in ("Convolution", "BatchNorm", "FullyConnected")]
    names = [n["name"][:-len("_fwd")] if n["name"].endswith("_fwd") else n["name"] for n in nodes]
    prefix = names[0].split("_", 1)[0] + "_"
    if not all(n.startswith(prefix) for n in names):
        raise ValueError(f"the graph's layers do not share one prefix ({prefix!r})")
    return {n[len(prefix):]: (node["op"], node.get("attrs", {})) for n, node in zip(names, nodes)}, prefix


def _tuple(s):
    return tuple(int(v) for v in str(s).strip("()").split(",") if v.strip())


def copy_from_mxnet(model, symbol_json, params):
    """Copy an exported MXNet pair's weights into ``model``, in place, checking every layer.

    Parameters
    ----------
    model : torch.nn.Module
        Built by :func:`build` (every conv/BN/dense layer has ``mx_name``).
    symbol_json : str
        The text of ``PREFIX-symbol.json``.
    params : dict
        Name → numpy array, ``arg:``/``aux:`` prefixes dropped (``distill.graphio.load_pair``).

    Returns
    -------
    int
        The number of tensors copied (every parameter of the graph, each exactly once).

    Raises
    ------
    ValueError
        A layer missing on either side, or a shape, stride, padding, group count or BatchNorm
        epsilon that differs: the copy would not compute the MXNet network.
    """
    layers, prefix = _mx_layers(symbol_json)
    used, copied = set(), 0

    def put(tensor, key):
        nonlocal copied
        arr = params.get(prefix + key)
        if arr is None:
            raise ValueError(f"the MXNet params have no {prefix + key}")
        if tuple(arr.shape) != tuple(tensor.shape):
            raise ValueError(f"{prefix + key}: MXNet shape {tuple(arr.shape)}, PyTorch {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)))
        used.add(prefix + key)
        copied += 1

    for path, mod in model.named_modules():
        name = getattr(mod, "mx_name", None)
        if name is None:
            continue
        if name not in layers:
            raise ValueError(f"{path} ({name}) is not a layer of the MXNet graph")
        op, attrs = layers.pop(name)
        if isinstance(mod, nn.Conv2d):
            want = (_tuple(attrs["kernel"]), _tuple(attrs.get("stride", "(1, 1)")),
                    _tuple(attrs.get("pad", "(0, 0)")), int(attrs.get("num_group", 1)))
            have = (tuple(mod.kernel_size), tuple(mod.stride), tuple(mod.padding), mod.groups)
            if op != "Convolution" or want != have:
                raise ValueError(f"{path} ({name}): MXNet {op} kernel/stride/pad/groups {want}, PyTorch {have}")
            put(mod.weight, name + "_weight")
            if mod.bias is not None:
                put(mod.bias, name + "_bias")
        elif isinstance(mod, nn.BatchNorm2d):
            eps = float(attrs.get("eps", 1e-3))
            if op != "BatchNorm" or abs(eps - mod.eps) > 1e-12 or attrs.get("fix_gamma", "True") != "False":
                raise ValueError(f"{path} ({name}): MXNet {op} eps {eps} fix_gamma "
                                 f"{attrs.get('fix_gamma')}, PyTorch eps {mod.eps}")
            for t, k in ((mod.weight, "gamma"), (mod.bias, "beta"), (mod.running_mean, "running_mean"),
                         (mod.running_var, "running_var")):
                put(t, f"{name}_{k}")
        elif isinstance(mod, nn.Linear):
            if op != "FullyConnected":
                raise ValueError(f"{path} ({name}) is a Linear, MXNet's layer is {op}")
            put(mod.weight, name + "_weight")
            put(mod.bias, name + "_bias")
    if layers:
        raise ValueError(f"MXNet layers with no PyTorch counterpart: {', '.join(sorted(layers)[:5])}")
    unused = sorted(set(params) - used)
    if unused:
        raise ValueError(f"MXNet parameters not copied: {', '.join(unused[:5])}")
    return copied


# -- size and cost, as distill.modelinfo counts them ----------------------------------------------

def count_macs_params(model, input_shape):
    """``(MACs of one image, learnable parameters)`` as :mod:`distill.modelinfo` counts them:
    a conv costs ``prod(output) · (C_in / groups) · kh · kw``, a dense layer ``O · I``; BatchNorm
    running statistics are not parameters (``distill.graphio.count_params``)."""
    macs = []

    def hook(mod, inputs, out):
        if isinstance(mod, nn.Conv2d):
            macs.append(out[0].numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size))
        else:
            macs.append(mod.in_features * mod.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return int(sum(macs)), int(sum(p.numel() for p in model.parameters()))


# -- the training loop: distill.trainer's, step for step ------------------------------------------

def kd_loss(student, teacher, labels, terms):
    """The recipe's weighted sum, per image then averaged: ``kd`` = KL(teacher_T ‖ student_T) · T²
    (Hinton et al., 2015; :class:`distill.losses.kd.KDLoss`), ``ce`` = cross-entropy."""
    total = 0.0
    for t in terms:
        if t["loss"] == "kd":
            temp = float(t.get("temperature", 4.0))
            log_ps = F.log_softmax(student / temp, dim=-1)
            log_pt = F.log_softmax(teacher / temp, dim=-1)
            v = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temp * temp
        elif t["loss"] == "ce":
            v = F.cross_entropy(student, labels, reduction="none")
        else:
            raise ValueError(f"loss {t['loss']!r}: the PyTorch side has kd and ce")
        total = total + float(t.get("weight", 1.0)) * v.mean()
    return total


def make_optimizer(model, trainer):
    """:class:`distill.nag.DeterministicNAG` is PyTorch's Nesterov SGD (``g = grad + wd·w;
    m = μm + g; w -= lr·(g + μm)``); no weight decay on BatchNorm affine and biases, as
    ``distill.trainer._make_trainer`` sets."""
    if trainer["optimizer"] not in ("nesterov", "sgd"):
        raise ValueError(f"optimizer {trainer['optimizer']!r}: the PyTorch side has nesterov and sgd")
    decay, no_decay = [], []
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            (no_decay if isinstance(mod, nn.BatchNorm2d) or pname == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": trainer["weight_decay"], "base_decay": trainer["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0, "base_decay": 0.0}]
    return torch.optim.SGD(groups, lr=trainer["lr"], momentum=trainer["momentum"],
                           nesterov=trainer["optimizer"] == "nesterov")


def batches(n, batch_size, seed, epoch):
    """The batch order of ``distill.trainer`` (``_batches`` with ``drop_last``): a permutation
    from ``RandomState(seed · 100003 + epoch)``, the last partial batch dropped."""
    order = np.random.RandomState(seed * 100003 + epoch).permutation(n)
    stop = n - n % batch_size if n > batch_size else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def lr_at(trainer, epoch_float):
    """``distill.optim.lr_at`` for the cosine schedule with warm-up (the recipe's numbers)."""
    lr, warm, epochs = trainer["lr"], trainer.get("warmup_epochs", 0.0), trainer["epochs"]
    if warm > 0 and epoch_float < warm:
        return lr * (epoch_float + 1e-8) / warm
    if trainer["lr_schedule"] == "constant":
        return lr
    if trainer["lr_schedule"] != "cosine":
        raise ValueError(f"lr_schedule {trainer['lr_schedule']!r}: the PyTorch side has cosine and constant")
    prog = min(max((epoch_float - warm) / max(epochs - warm, 1e-8), 0.0), 1.0)
    return 0.5 * lr * (1 + math.cos(math.pi * prog))


def predict(model, x, batch_size=256):
    """Logits ``(N, K)`` (numpy) of ``model`` in eval mode on ``x`` ``(N, C, H, W)``."""
    model.eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def agp_ratios(final, updates):
    """``[0, s_1, ..., s_n]``: our AGP schedule (:class:`distill.pruning.schedules.agp.AGP`,
    ``s_k = s_f · (1 − (1 − k / n)³)``) in the form Torch-Pruning's
    ``iterative_pruning_ratio_scheduler`` returns."""
    return [0.0] + [final * (1.0 - (1.0 - (k + 1) / updates) ** 3) for k in range(updates)]


def torch_prune(model, input_shape, ratio, round_to, updates, method="plain", reg=5e-4):
    """Torch-Pruning, as its README sets it up: the L2 norm of each coupled group of DepGraph
    (``GroupMagnitudeImportance(p=2)``, Fang et al., 2023), the classifier ignored, ``round_to``,
    layer-wise ratios, ``iterative_steps=updates`` on our AGP ratios (one ``pruner.step()`` per
    update, at the epochs ours updates its masks).

    ``method``: ``"plain"`` is its ``BasePruner``; ``"groupnorm-sparse"`` its strongest setting,
    ``GroupNormPruner`` (DepGraph's group-level sparse training: ``pruner.regularize(model)``
    after each backward pushes whole groups toward zero, the weaker ones harder, scaled within
    [1, 2^4]) with ``reg`` and importance normalised by its maximum, as Torch-Pruning's CIFAR
    benchmark (``reproduce/main.py --method group_sl``: ``--reg 5e-4``, and no weight decay while
    it regularizes) sets it up."""
    import torch_pruning as tp
    ratios = agp_ratios(ratio, updates)
    kwargs = dict(importance=tp.importance.GroupMagnitudeImportance(p=2),
                  pruning_ratio=ratio, iterative_steps=updates,
                  iterative_pruning_ratio_scheduler=lambda r, steps: ratios,
                  ignored_layers=[model.classifier()], round_to=round_to, global_pruning=False)
    example = torch.zeros((1,) + tuple(input_shape))
    if method == "plain":
        return tp.pruner.BasePruner(model, example, **kwargs)
    if method == "groupnorm-sparse":
        kwargs["importance"] = tp.importance.GroupMagnitudeImportance(p=2, normalizer="max")
        return tp.pruner.GroupNormPruner(model, example, reg=reg, **kwargs)
    raise ValueError(f"method {method!r}: plain or groupnorm-sparse")


def train_kd(model, data, teacher_logits, recipe, prune=None, sparse_epochs=(), log=print):
    """Train ``model`` as ``distill.trainer.fit`` trains: the recipe's loss terms, optimizer, lr
    schedule (per step), batch order and epochs; ``prune = (pruner, epochs)`` calls
    ``pruner.step()`` at the start of each of those epochs (the optimizer is then rebuilt: the
    parameters changed shape, so their momentum is dropped, as in Torch-Pruning's examples).
    In ``sparse_epochs`` each step calls ``pruner.regularize(model)`` between the backward and the
    update (a ``GroupNormPruner``: Torch-Pruning's sparse training), with weight decay off as its
    benchmark does; its groups are re-read after every pruning step (``update_regularizer``).

    Returns
    -------
    list of dict
        Per epoch: ``epoch``, ``loss``, ``val_top1``, ``macs``, ``seconds``.
    """
    import time
    trainer, terms = recipe["trainer"], recipe["distillation"]
    x, y = data["x_train"], torch.from_numpy(data["y_train"].astype(np.int64))
    t_all = torch.from_numpy(teacher_logits)
    n, history = len(x), []
    pruner, prune_epochs = prune if prune else (None, ())
    opt = make_optimizer(model, trainer)
    shape = x.shape[1:]
    for epoch in range(trainer["epochs"]):
        t0 = time.time()
        if pruner is not None and epoch in prune_epochs:
            model.eval()
            pruner.step()
            if hasattr(pruner, "update_regularizer"):
                pruner.update_regularizer()
            opt = make_optimizer(model, trainer)
        order = batches(n, trainer["batch_size"], trainer["seed"], epoch)
        torch.manual_seed(trainer["seed"] * 100003 + epoch)
        model.train()
        total = 0.0
        for step, idx in enumerate(order):
            lr = lr_at(trainer, epoch + step / len(order))
            for g in opt.param_groups:
                g["lr"] = lr
                g["weight_decay"] = 0.0 if epoch in sparse_epochs else g["base_decay"]
            out = model(torch.from_numpy(x[idx]))
            loss = kd_loss(out, t_all[idx], y[idx], terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if epoch in sparse_epochs:
                pruner.regularize(model)
            opt.step()
            total += float(loss) * len(idx)
        logits = predict(model, data["x_val"])
        top1 = float((logits.argmax(1) == data["y_val"]).mean() * 100.0)
        macs, _ = count_macs_params(model, shape)
        row = {"epoch": epoch + 1, "loss": total / (len(order) * trainer["batch_size"]),
               "val_top1": top1, "macs": macs, "seconds": round(time.time() - t0, 1)}
        history.append(row)
        log(f"epoch {epoch + 1}/{trainer['epochs']}  loss {row['loss']:.4f}  val {top1:.2f}%  "
            f"MACs {macs / 1e6:.2f}M  {row['seconds']:.0f} s")
    return history


# -- the child process: what bench/peers.py and tests/test_peers.py run in .venv-peers -----------

def _load_pair(npz):
    """``(symbol JSON text, params dict)`` from a payload (an ``.npz`` or a dict of its arrays)
    holding ``symbol_json`` and ``param:NAME`` arrays."""
    keys = npz.files if hasattr(npz, "files") else list(npz)
    return str(npz["symbol_json"]), {k[len("param:"):]: npz[k] for k in keys if k.startswith("param:")}


def check_copy(payload):
    """For each model of the payload: copy the MXNet pair, compare logits, count MACs/params; and
    the loop's batch order, lr schedule and AGP ratios, for the caller to compare with ours.

    ``payload`` holds, per model ``m``: ``m:symbol_json``, ``m:param:NAME``, ``m:x``, ``m:ref``
    (MXNet's logits on ``m:x``); and ``trainer`` (JSON), ``agp`` (JSON ``[final, updates]``).
    """
    import json
    out = {"models": {}}
    for m in json.loads(str(payload["models"])):
        sub = {k[len(m) + 1:]: payload[k] for k in payload.files if k.startswith(m + ":")}
        sym, params = _load_pair(sub)
        net = build(m)
        copied = copy_from_mxnet(net, sym, params)
        got = predict(net, np.ascontiguousarray(sub["x"], dtype=np.float32))
        ref = sub["ref"]
        macs, n_params = count_macs_params(net, sub["x"].shape[1:])
        out["models"][m] = {"copied": copied, "max_abs_diff": float(np.abs(got - ref).max()),
                            "scale": float(np.abs(ref).max()), "macs": macs, "params": n_params}
    trainer = json.loads(str(payload["trainer"]))
    out["batches"] = [batches(int(payload["n"]), trainer["batch_size"], trainer["seed"], e)[0].tolist()
                      for e in range(2)]
    out["lr"] = [lr_at(trainer, e / 4) for e in range(4 * trainer["epochs"] + 1)]
    final, updates = json.loads(str(payload["agp"]))
    out["agp"] = agp_ratios(final, updates)
    return out


def run_peer(cfg, log=print):
    """One Torch-Pruning run of ``bench/peers.py`` (``cfg`` from its JSON): copy the dense MXNet
    network, check the copy, prune + KD, export ONNX; returns the result dict (also written)."""
    import json
    import os
    import time
    t0 = time.time()
    with np.load(cfg["data"]) as z:
        data = {k: z[k] for k in ("x_train", "y_train", "x_val", "y_val")}
    teacher_logits = np.load(cfg["teacher_logits"])
    with np.load(cfg["dense"]) as z:
        sym, params = _load_pair(z)
        dense_ref = z["val_logits"]
    net = build(cfg["model"])
    copy_from_mxnet(net, sym, params)
    got = predict(net, data["x_val"])
    diff, scale = float(np.abs(got - dense_ref).max()), float(np.abs(dense_ref).max())
    if not diff <= 1e-4 * max(1.0, scale):
        raise RuntimeError(f"the PyTorch copy of {cfg['model']} differs from MXNet by {diff:.3g} "
                           f"(logit scale {scale:.3g}): the two tools would not start from one network")
    shape = data["x_train"].shape[1:]
    dense_macs, dense_params = count_macs_params(net, shape)
    log(f"copy of the dense MXNet {cfg['model']}: max |Δlogit| {diff:.1e} on {len(got)} val images "
        f"(scale {scale:.1f}); MACs {dense_macs / 1e6:.2f}M, params {dense_params}")
    method = cfg.get("method", "plain")
    pruner = torch_prune(net, shape, cfg["ratio"], cfg["round_to"], len(cfg["prune_epochs"]),
                         method=method, reg=cfg.get("reg", 5e-4))
    # sparse training up to the last pruning update (as ours: pruning.regularize.epochs unset)
    sparse = set(range(max(cfg["prune_epochs"]))) if method == "groupnorm-sparse" else set()
    history = train_kd(net, data, teacher_logits, cfg["recipe"],
                       prune=(pruner, set(cfg["prune_epochs"])), sparse_epochs=sparse, log=log)
    net.eval()
    logits = predict(net, data["x_val"])
    macs, n_params = count_macs_params(net, shape)
    os.makedirs(cfg["out"], exist_ok=True)
    onnx_path = os.path.join(cfg["out"], "model.onnx")
    torch.onnx.export(net, (torch.zeros((1,) + tuple(shape)),), onnx_path, dynamo=False,
                      opset_version=13, input_names=["data"], output_names=["logits"])
    np.save(os.path.join(cfg["out"], "val_logits.npy"), logits)
    widths = {p: m.out_channels for p, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    result = {"tool": "torch-pruning", "config": method, "model": cfg["model"], "ratio": cfg["ratio"],
              "seed": cfg["recipe"]["trainer"]["seed"], "sparse_epochs": sorted(sparse),
              "top1_torch": float((logits.argmax(1) == data["y_val"]).mean() * 100.0),
              "macs": macs, "params": n_params, "dense_macs": dense_macs, "dense_params": dense_params,
              "copy": {"max_abs_diff": diff, "scale": scale}, "history": history, "widths": widths,
              "onnx": onnx_path, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(cfg["out"], "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv):
    """``check PAYLOAD.npz OUT.json`` | ``run CONFIG.json``."""
    import json
    import os
    import warnings
    warnings.filterwarnings("ignore")           # the TorchScript ONNX exporter's deprecation notice
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    if argv[:1] == ["check"] and len(argv) == 3:
        with np.load(argv[1]) as z:
            res = check_copy(z)
        with open(argv[2], "w") as f:
            json.dump(res, f)
        return 0
    if argv[:1] == ["run"] and len(argv) == 2:
        with open(argv[1]) as f:
            run_peer(json.load(f), log=lambda msg: print(msg, flush=True))
        return 0
    print(main.__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
