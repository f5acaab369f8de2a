"""``distill export RUN_DIR``: the run's model for deployment, each format checked in its runtime.

Formats (registered on :data:`FORMATS`, one file each; ``--format`` takes several):

* ``mxnet``: ``model-symbol.json`` + ``model-0000.params``, logits only (training heads and
  unused parameters removed), reloaded with ``gluon.SymbolBlock.imports`` *and* the Module API.
* ``onnx``: ``model.onnx`` from ``mxnet.onnx.export_model``, run in onnxruntime.
* ``onnx-int8``: ``model.int8.onnx``, onnxruntime static QDQ quantization of ``model.onnx``
  calibrated on a fixed, seeded sample of the recipe's train split.
* ``ncnn``: ``model.ncnn.param`` + ``model.ncnn.bin``, ONNX → ``pnnx``, run in ncnn's runtime.
* ``ncnn-int8``: ``model-int8.ncnn.param`` + ``model-int8.ncnn.bin`` + ``model.table``, the
  fp32 ncnn pair quantized by distill with MXNet's calibration, run in ncnn's int8 runtime.

Every format runs on the test split in its own runtime (onnxruntime and ncnn in a child
process, so a crash is a failed check) and is compared with MXNet: max abs logit difference
≤ ``--atol`` + ``--rtol`` × the largest MXNet logit, top-1 agreement beside it; a mismatch
names the first layer at fault where it can be found. Latency at batch 1 is timed in each
runtime. A ``MODEL_CARD.md`` + ``model_card.json`` are written next to the files. Exports go to
``RUN_DIR/export/`` (the run's student), ``RUN_DIR/export/teacher/`` (``--model teacher``) or
``RUN_DIR/export/<name>/`` (``--model PREFIX``; any MXNet pair, e.g. a pruned or int8 variant).

This module is the command line only (kept light: the CLI imports it to list subcommands);
the work is in :mod:`distill.export.core`.
"""
import logging

__all__ = ["add_arguments", "main", "export_run", "ExportOptions"]
_LOGGER = logging.getLogger(__name__)


def __getattr__(name):          # library API without importing mxnet when the CLI starts
    if name == "export_run":
        from . import core
        return core.export_run
    if name == "ExportOptions":
        from . import options
        return options.ExportOptions
    raise AttributeError(name)


def add_arguments(p):
    """The ``distill export`` arguments."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (its resolved recipe gives the data)")
    g = p.add_argument_group("what to export")
    g.add_argument("--format", "-f", dest="formats", action="append", default=[], metavar="FMT",
                   help="mxnet, onnx, onnx-int8, ncnn, ncnn-int8 or all; repeat or comma-separate "
                        "(default: all whose runtime is installed)")
    g.add_argument("--model", default=None, metavar="PREFIX",
                   help="export the MXNet pair at PREFIX (symbol + PREFIX-%%04d.params) instead of the run's "
                        "student (a pruned or int8 variant, a Module-API checkpoint); "
                        "`teacher` exports the run's teacher")
    g.add_argument("--epoch", type=int, default=0, help="which PREFIX-%%04d.params (default 0)")
    g.add_argument("--logits", default=None, metavar="LAYER",
                   help="name of the logits layer, if not the graph's output (after stripping "
                        "SoftmaxOutput and other loss heads)")
    g.add_argument("--input-name", default="data", help="the graph's input variable (default data)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default RUN_DIR/export[/teacher or /<model name>])")
    g = p.add_argument_group("checks and options")
    g.add_argument("--fp16", action="store_true",
                   help="ncnn: fp16 weights (half the file) and fp16 compute; checked by top-1 "
                        "agreement instead of logit difference")
    g.add_argument("--atol", type=float, default=1e-3,
                   help="fp32 formats: absolute floor of the allowed max-abs logit difference "
                        "against MXNet (default 1e-3); the check is max |Δ| ≤ atol + rtol × max |logit|")
    g.add_argument("--rtol", type=float, default=1e-4,
                   help="fp32 formats: allowed max-abs logit difference relative to the largest "
                        "MXNet logit on the test split (default 1e-4; float32 rounding grows with "
                        "the logits' scale)")
    g.add_argument("--min-agreement", type=float, default=99.0,
                   help="--fp16: smallest top-1 agreement with MXNet in %% (default 99)")
    g.add_argument("--calib-size", type=int, default=None, metavar="N",
                   help="int8 calibration images from the train split (default: the recipe's "
                        "quantization.calib_batches × calib_batch_size, the sample distill quantize uses)")
    g.add_argument("--calib-mode", choices=("naive", "entropy"), default=None,
                   help="onnx-int8 calibration: naive = min/max, entropy = KL (default: the "
                        "recipe's quantization.calib_mode)")
    g.add_argument("--int8-exclude", action="append", default=[], metavar="LAYER",
                   help="onnx-int8, ncnn-int8: keep this MXNet layer (or ncnn layer) in fp32 (repeatable; the layers distill "
                        "quantize kept in fp32, the run metrics' int8.excluded, are kept too)")
    g.add_argument("--int8-max-drop", type=float, default=1.0,
                   help="onnx-int8: largest top-1 drop in points against fp32 MXNet (default 1)")
    g.add_argument("--ncnn-calib", choices=("mxnet", "kl"), default="mxnet",
                   help="ncnn-int8 blob scales: mxnet = MXNet's thresholds (the int8 model of distill "
                        "quantize and onnx-int8), kl = ncnn2table's KL method on ncnn's blobs")
    g.add_argument("--policies", dest="ncnn_policies", action="store_true",
                   help="ncnn-int8: also measure full int8, first_last and auto in ncnn (top-1, "
                        "size, latency)")
    g.add_argument("--onnx-weight-bits", choices=("auto", "7", "8"), default="auto",
                   help="onnx-int8 weights: 7 bits (onnxruntime's reduce_range: its u8×s8 kernels "
                        "saturate on x86 CPUs without VNNI), 8, or auto = 7 when this CPU has no "
                        "VNNI; set it for the CPU the model will run on")
    g.add_argument("--int8-max-diff", type=float, default=1.0,
                   help="onnx-int8: largest top-1 difference in points from MXNet's int8 model "
                        "built from the same thresholds (default 1)")
    g.add_argument("--threads", type=int, default=None,
                   help="threads for onnxruntime and ncnn (default: OMP_NUM_THREADS or all cores; "
                        "MXNet follows OMP_NUM_THREADS)")
    g.add_argument("--repeats", type=int, default=None,
                   help="latency: best of this many repeats (default output.latency_repeats)")
    g.add_argument("--no-latency", dest="latency", action="store_false", help="skip the timings")


def _split_formats(values):
    out = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def main(args):
    """Run ``distill export``; print the report; 0 when every check passed."""
    from .core import export_run
    from .options import ExportOptions
    from .report import export_table
    opts = ExportOptions(fp16=args.fp16, atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement,
                         calib_size=args.calib_size, calib_mode=args.calib_mode,
                         int8_exclude=tuple(args.int8_exclude), int8_max_drop=args.int8_max_drop,
                         int8_max_diff=args.int8_max_diff,
                         threads=args.threads, repeats=args.repeats, latency=args.latency,
                         input_name=args.input_name, logits=args.logits,
                         ncnn_calib=args.ncnn_calib, ncnn_policies=args.ncnn_policies,
                         onnx_weight_bits=args.onnx_weight_bits)
    card = export_run(args.run_dir, formats=_split_formats(args.formats) or None, model=args.model,
                      epoch=args.epoch, out_dir=args.out, options=opts, raise_on_failure=False)
    print(export_table(card))
    failures = [f"{name}: {e['check']['message']}" for name, e in card["exports"].items()
                if not e["check"]["passed"]]
    if failures:
        from .parity import ExportMismatch
        raise ExportMismatch("export check failed (files kept for inspection, marked failed in "
                             "model_card.json): " + " | ".join(failures))
    return 0
