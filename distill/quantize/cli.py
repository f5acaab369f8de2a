"""``distill quantize RUN_DIR|PREFIX``: int8 calibration on MXNet's oneDNN path.

Thin: parse the options (each overrides the recipe's ``quantization:`` key of the same name),
call :func:`distill.quantize.pipeline.quantize_target`.
"""
__all__ = ["add_arguments", "main", "DEFAULT_QAT_EPOCHS"]

DEFAULT_QAT_EPOCHS = 3      # --qat on a recipe without quantization.qat.epochs


def add_arguments(p):
    """Options of ``distill quantize``."""
    p.add_argument("target", help="a run folder (runs/NAME) or a model prefix (the PREFIX of an MXNet symbol + params pair)")
    p.add_argument("--recipe", help="recipe whose data calibrate and evaluate (default: the run folder's resolved recipe; "
                                    "required for a model prefix)")
    g = p.add_argument_group("calibration (each overrides the recipe's quantization: key)")
    g.add_argument("--calib-mode", choices=("naive", "entropy"), help="min/max or KL thresholds")
    g.add_argument("--exclude", metavar="POLICY",
                   help="none | first_last | auto | PATTERN[,PATTERN...]: layers kept in fp32")
    g.add_argument("--budget", type=float, help="points of top-1 `auto` may lose (default 0.5)")
    g.add_argument("--calib-batches", type=int, metavar="N", help="calibration batches")
    g.add_argument("--calib-batch-size", type=int, metavar="N", help="images per calibration batch")
    g.add_argument("--granularity", choices=("channel-wise", "tensor-wise"), help="weight scales")
    t = p.add_argument_group("quantization-aware training (quantization.qat: in the recipe)")
    t.add_argument("--qat", action="store_true",
                   help="after calibration, fine-tune the student fake-quantized, distilled from the fp32 "
                        "teacher; model-int8-* becomes the QAT model (default 3 epochs when the recipe "
                        "sets none)")
    t.add_argument("--qat-epochs", type=int, metavar="N", help="QAT epochs (quantization.qat.epochs; implies --qat)")
    t.add_argument("--qat-lr", type=float, metavar="LR", help="QAT learning rate (quantization.qat.lr)")
    t.add_argument("--resume", action="store_true",
                   help="continue a killed QAT run from its last checkpoint (RUN_DIR/qat/checkpoints)")
    t.add_argument("--trust-checkpoint", action="store_true",
                   help="with --resume: also load a QAT checkpoint in the old pickle format (unpickling "
                        "runs any code the file holds: only for run folders you wrote yourself)")
    o = p.add_argument_group("output")
    o.add_argument("--no-teacher", action="store_true", help="skip the run's dense teacher")
    o.add_argument("--no-sensitivity", action="store_true",
                   help="skip the per-layer table (auto measures it anyway)")
    o.add_argument("--no-layer-latency", action="store_true",
                   help="skip timing each layer alone in fp32 and int8 (quantization.layer_latency: false)")
    o.add_argument("--repeats", type=int, metavar="N", help="latency repeats (default output.latency_repeats)")


def main(args):
    """Run the command; 0 on success (a :class:`~distill.errors.UserError` is handled by the CLI)."""
    from .pipeline import quantize_target
    qat = {"epochs": args.qat_epochs, "lr": args.qat_lr}
    if (args.qat or args.resume or args.qat_lr is not None) and args.qat_epochs is None:
        qat["epochs"] = _recipe_qat_epochs(args) or DEFAULT_QAT_EPOCHS
    overrides = {"qat": qat if any(v is not None for v in qat.values()) else None,"calib_mode": args.calib_mode, "exclude": args.exclude, "budget": args.budget,
                 "calib_batches": args.calib_batches, "calib_batch_size": args.calib_batch_size,
                 "granularity": args.granularity,
                 "layer_latency": False if args.no_layer_latency else None}
    quantize_target(args.target, args.recipe, overrides, teacher=not args.no_teacher,
                    sensitivity=not args.no_sensitivity, repeats=args.repeats, resume=args.resume,
                    trust_checkpoint=args.trust_checkpoint)
    return 0


def _recipe_qat_epochs(args):
    """``quantization.qat.epochs`` of the recipe ``distill quantize`` will read (0 when unset)."""
    from .pipeline import resolve_target
    from ..recipe import load_recipe
    tgt = resolve_target(args.target, args.recipe, teacher=False)
    return load_recipe(tgt.recipe_path).quantization.qat.epochs
