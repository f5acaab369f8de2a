"""The ``distill`` command line. Thin: parse arguments, call library functions.

``distill train RECIPE.yaml [--set KEY=VALUE ...] [--resume [--trust-checkpoint]]`` runs a recipe
(``train.py`` is the same command); ``distill list`` shows the registered students, datasets and
loss terms.
A user mistake prints one paragraph (no traceback; ``--debug`` shows it) and exits with 2.
"""
import argparse
import os
import sys
import textwrap
import traceback

from .errors import UserError

__all__ = ["main", "train_main"]


def _common(p):
    p.add_argument("--debug", action="store_true",
                   help="show Python tracebacks for errors, MXNet's and Gluon's own log lines and "
                        "warnings, and the tool's debug lines")


def _add_train_args(p):
    p.add_argument("recipe", help="the YAML recipe to run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set trainer.epochs=3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in the run folder (the last complete "
                        "epoch, or the last step checkpoint with trainer.checkpoint_every)")
    p.add_argument("--devices", metavar="LIST",
                   help="train on these devices, data parallel: cpu (default), gpu0,gpu1 or "
                        "cpu0,cpu1 (sets trainer.devices; int8 calibration and export stay on the CPU)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="with --resume: also load a checkpoint in the old pickle format (unpickling "
                        "runs any code the file holds: only for run folders you wrote yourself)")
    _common(p)


def _cmd_train(args):
    from .recipe import load_recipe
    from .run import run_training
    overrides = list(args.overrides)
    if getattr(args, "devices", None):
        names = [d.strip() for d in args.devices.split(",") if d.strip()]
        overrides.append(f"trainer.devices=[{', '.join(names)}]")
    recipe = load_recipe(args.recipe, overrides)
    run_training(recipe, resume=args.resume, trust_checkpoint=args.trust_checkpoint)
    return 0


def _cmd_list(args):
    from students import list_students
    from .data import DATASETS
    from .losses import LOSSES
    print("students:  " + ", ".join(list_students()))
    print("datasets:  " + ", ".join(DATASETS.names()))
    print("losses:    " + ", ".join(LOSSES.names()))
    return 0


def _run(fn, args):
    from .quiet import configure
    configure(debug=getattr(args, "debug", False))
    try:
        return fn(args)
    except UserError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        msg = textwrap.fill(str(e), width=100, break_long_words=False, break_on_hyphens=False)
        print(f"\nerror: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the last complete epoch (or, with trainer.checkpoint_every, the last "
              "step checkpoint) is saved; rerun with --resume.", file=sys.stderr)
        return 130


def train_main(argv=None):
    """``python train.py RECIPE.yaml``."""
    p = argparse.ArgumentParser(prog="train.py", description="Run a distillation recipe end to end.")
    _add_train_args(p)
    args = p.parse_args(argv)
    return _run(_cmd_train, args)


# Subcommands that live in their own modules: name -> (module, help). Each module defines
# ``add_arguments(parser)`` and ``main(args) -> int``; it is imported only when used.
SUBCOMMANDS = {
    "inspect": ("distill.inspect", "table of every layer of a model: op, shape, params, MACs, taps"),
    "quantize": ("distill.quantize.cli", "int8 calibration of a run folder's model (oneDNN)"),
    "export": ("distill.export", "export a run folder's model for deployment (mxnet, onnx, ncnn)"),
    "sensitivity": ("distill.pruning.sensitivity", "per-group channel-pruning sensitivity of a recipe"),
    "compare": ("distill.compare", "students side by side: run a comparison recipe or collect run folders"),
    "launch": ("distill.launch", "parameter-server training on this machine: scheduler, servers, "
                                 "workers (dist_sync)"),
}


def _lazy(module):
    def call(args):
        import importlib
        return importlib.import_module(module).main(args)
    return call


def main(argv=None):
    """The ``distill`` console script."""
    import importlib
    import importlib.util
    p = argparse.ArgumentParser(prog="distill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run a recipe end to end")
    _add_train_args(t)
    t.set_defaults(fn=_cmd_train)
    ls = sub.add_parser("list", help="list registered students, datasets and loss terms")
    _common(ls)
    ls.set_defaults(fn=_cmd_list)
    for name, (module, help_) in SUBCOMMANDS.items():
        try:
            if importlib.util.find_spec(module) is None:
                continue                  # not built yet
        except ModuleNotFoundError:
            continue
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_)
        mod.add_arguments(sp)
        _common(sp)
        sp.set_defaults(fn=_lazy(module))
    args = p.parse_args(argv)
    return _run(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
