"""``mxnet``: the inference pair, reloaded with Gluon and with the Module API.

``model-symbol.json`` + ``model-0000.params`` hold the logits graph only (loss heads and unused
parameters removed, input named ``data``, ``arg:``/``aux:`` parameter names): the pair
``gluon.SymbolBlock.imports``, ``mx.mod.Module``, ncnn's ``mxnet2ncnn`` and MXNet Model Server
take. The check reloads the written files both ways and compares them with the source model
as it was loaded before the export.
"""
import logging
import os
import shutil
import warnings

import mxnet as mx
import numpy as np

from ..graphio import load_symbol_block, make_block, pair_files
from ..runfolder import MODEL
from ..trainer import predict
from .formats import FORMATS, ExportFormat, check_result, files_bytes
from .parity import check_close, close_rule, compare_logits

__all__ = ["MXNetFormat", "module_predict"]
_LOGGER = logging.getLogger(__name__)


def module_predict(prefix, x, batch_size=256, epoch=0):
    """Logits of ``PREFIX`` loaded with the Module API (``mx.model.load_checkpoint``), ``(N, K)``.

    ``x`` (N, C, H, W) is read ``batch_size`` images at a time (it may be a lazy array of
    streamed images); the module is bound to one batch shape, so the last batch is padded with
    zeros and their rows dropped, as ``NDArrayIter``'s ``pad`` does."""
    sym, arg, aux = mx.model.load_checkpoint(prefix, epoch)
    n = len(x)
    bs = max(1, min(batch_size, n))
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (bs,) + tuple(x.shape[1:]))], for_training=False)
    mod.set_params(arg, aux, allow_missing=False, allow_extra=False)
    outs = []
    for i in range(0, n, bs):
        xb = np.asarray(x[i:i + bs], np.float32)
        k = len(xb)
        if k < bs:
            xb = np.concatenate([xb, np.zeros((bs - k,) + xb.shape[1:], np.float32)])
        mod.forward(mx.io.DataBatch([mx.nd.array(xb)]), is_train=False)
        outs.append(mod.get_outputs()[0].asnumpy()[:k])
    return np.concatenate(outs)


@FORMATS.register("mxnet")
class MXNetFormat(ExportFormat):
    """The MXNet inference pair (always available)."""
    order = 0
    files = tuple(os.path.basename(f) for f in pair_files(MODEL))

    def export(self, job):
        for f in self.files:
            shutil.copyfile(os.path.join(job.work_dir, f), os.path.join(job.out_dir, f))
        prefix = os.path.join(job.out_dir, MODEL)
        bs = job.options.eval_batch_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            original = predict(make_block(job.source.symbol, job.source.params,
                                          job.source.input_name, trainable=False), job.x_test, bs)
        gluon_out = predict(load_symbol_block(prefix), job.x_test, bs)
        module_out = module_predict(prefix, job.x_test, bs)
        gluon = compare_logits(original, gluon_out, job.y_test)
        module = compare_logits(original, module_out, job.y_test)
        atol, rtol = job.options.atol, job.options.rtol
        reason = check_close(gluon, atol, rtol)
        reason = reason and f"SymbolBlock.imports: {reason}"
        if reason is None and check_close(module, atol, rtol):
            reason = f"Module API: {check_close(module, atol, rtol)}"
        worst = gluon if gluon["max_abs_diff"] >= module["max_abs_diff"] else module
        return {"files": list(self.files), "bytes": files_bytes(job.out_dir, self.files),
                "runtime": f"mxnet {mx.__version__}",
                "parity": worst, "reloads": {"gluon.SymbolBlock.imports": gluon, "mx.mod.Module": module},
                "latency_ms": None,              # the reference row holds MXNet's latency
                "input": "data", "output": job.source.symbol.list_outputs()[0],
                "removed_head": job.source.removed_head, "removed_params": job.source.removed_params,
                "check": check_result(reason, f"reloaded with SymbolBlock.imports and the Module API, "
                                              f"{close_rule(atol, rtol)} of the source model")}
