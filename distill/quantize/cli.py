"""``distill quantize RUN_DIR|PREFIX``: int8 calibration on MXNet's oneDNN path.

Thin: parse the options (each overrides the recipe's ``quantization:`` key of the same name),
call :func:`distill.quantize.pipeline.quantize_target`.
"""
__all__ = ["add_arguments", "main"]


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
    overrides = {"calib_mode": args.calib_mode, "exclude": args.exclude, "budget": args.budget,
                 "calib_batches": args.calib_batches, "calib_batch_size": args.calib_batch_size,
                 "granularity": args.granularity,
                 "layer_latency": False if args.no_layer_latency else None}
    quantize_target(args.target, args.recipe, overrides, teacher=not args.no_teacher,
                    sensitivity=not args.no_sensitivity, repeats=args.repeats)
    return 0
