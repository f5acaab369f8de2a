"""``distill launch``: MXNet parameter-server training on this machine, every role a local process.

``distill launch -n WORKERS -s SERVERS -- python train.py RECIPE.yaml [--resume] ...`` starts
ps-lite's scheduler, ``SERVERS`` servers and ``WORKERS`` copies of the command, each with the
``DMLC_*`` environment MXNet's ``dist_sync`` / ``dist_async`` KVStore reads (``DMLC_ROLE``,
``DMLC_PS_ROOT_URI=127.0.0.1``, ``DMLC_PS_ROOT_PORT`` a free port, ``DMLC_NUM_SERVER``,
``DMLC_NUM_WORKER``). A scheduler or server is ``python -c "import mxnet"``: importing MXNet with
``DMLC_ROLE=server`` runs the server loop (``mxnet/kvstore/kvstore_server.py``).

Every line a process prints is shown with its role as prefix. ps-lite numbers workers in the
order they register, not in launch order, so a worker is ``[worker i]`` until it prints the
kvstore rank it got (:func:`distill.distributed.create_kvstore` does), then ``[rank r]``.

If any process dies (non-zero exit, a signal) while the workers still run, the others are
blocked in a push/pull that will never complete: the launch stops every process it started
(each in its own process group: SIGTERM, then SIGKILL after :data:`GRACE_S`) and fails with one
paragraph naming the role, the rank and how it died. Ctrl-C and SIGTERM do the same cleanup.

The recipe must set ``trainer.kvstore: dist_sync`` (or ``dist_async``), for example with
``--set trainer.kvstore=dist_sync`` on the worker command.
"""
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

from .errors import UserError

__all__ = ["add_arguments", "main", "launch", "free_port", "GRACE_S"]
_LOGGER = logging.getLogger(__name__)

GRACE_S = 5.0          # SIGTERM → SIGKILL
POLL_S = 0.1
_RANK_LINE = re.compile(r"^distill: kvstore \S+: worker rank (\d+) of (\d+)")
_SERVER_CMD = [sys.executable, "-c", "import mxnet"]


def free_port(host="127.0.0.1"):
    """A TCP port nothing listens on now (the OS picks it; it may be taken again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Proc:
    """One started process: its role, its output pump and the last lines it printed."""

    def __init__(self, role, index, cmd, env, out, lock):
        self.role, self.index, self.rank = role, index, None
        self.tail = deque(maxlen=8)
        self._out, self._lock = out, lock
        # its own process group: a Ctrl-C in the terminal reaches only the launcher, which then
        # stops each group (the process and anything it spawned) itself. Not its own session:
        # with Linux's autogroup scheduling every session gets an equal CPU share, so a job of
        # W workers would take W shares of a busy machine (and a benchmark would measure that)
        self.popen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, process_group=0)
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    @property
    def label(self):
        if self.role != "worker":
            return self.role if self.role == "scheduler" else f"server {self.index}"
        return f"rank {self.rank}" if self.rank is not None else f"worker {self.index}"

    def describe(self):
        rank = f", kvstore rank {self.rank}" if self.rank is not None else \
            (", before it got a kvstore rank" if self.role == "worker" else "")
        name = f"worker {self.index}" if self.role == "worker" else self.label
        return f"{name} (pid {self.popen.pid}{rank})"

    def _pump(self):
        for raw in iter(self.popen.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            m = _RANK_LINE.match(line)
            if m and self.role == "worker":
                self.rank = int(m.group(1))
            self.tail.append(line)
            with self._lock:
                self._out.write(f"[{self.label}] {line}\n")
                self._out.flush()
        self.popen.stdout.close()

    def poll(self):
        return self.popen.poll()

    def signal_group(self, sig):
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _how(rc):
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _stop(procs, grace=GRACE_S):
    """SIGTERM every process group still running, SIGKILL what is left after ``grace`` s."""
    for p in procs:
        if p.poll() is None:
            p.signal_group(signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    for p in procs:
        p.signal_group(signal.SIGKILL)      # also reaps anything a process left in its group
    for p in procs:
        try:
            p.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        p.pump.join(timeout=1.0)


def launch(command, workers, servers=1, host="127.0.0.1", port=None, exit_timeout=30.0,
           out=None, env=None):
    """Run ``command`` as ``workers`` workers with a scheduler and ``servers`` servers.

    Parameters
    ----------
    command : list of str
        The worker command, e.g. ``["python", "train.py", "RECIPE.yaml"]``.
    workers, servers : int
    host : str
        ``DMLC_PS_ROOT_URI`` and every node's address.
    port : int or None
        ``DMLC_PS_ROOT_PORT``; a free port when None.
    exit_timeout : float
        Seconds the scheduler and servers get to stop by themselves once every worker is done.
    out : file-like
        Where the prefixed output goes (stdout).
    env : dict or None
        Base environment (``os.environ``).

    Returns
    -------
    int
        0 when every worker exited with 0.

    Raises
    ------
    UserError
        A process died while the workers were running (named with its rank and how it died),
        or the command cannot be started.
    """
    if not command:
        raise UserError("distill launch: give the worker command after `--`, e.g. "
                        "`distill launch -n 2 -s 1 -- python train.py RECIPE.yaml "
                        "--set trainer.kvstore=dist_sync`.")
    if workers < 1 or servers < 1:
        raise UserError(f"distill launch: -n (workers, got {workers}) and -s (servers, got "
                        f"{servers}) must be ≥ 1.")
    out = out or sys.stdout
    port = port or free_port(host)
    base = dict(os.environ if env is None else env)
    base.update(DMLC_PS_ROOT_URI=host, DMLC_PS_ROOT_PORT=str(port), DMLC_NUM_SERVER=str(servers),
                DMLC_NUM_WORKER=str(workers), DMLC_NODE_HOST=host, PYTHONUNBUFFERED="1")
    lock = threading.Lock()
    procs = []
    stop_signal = []

    def on_signal(signum, frame):
        stop_signal.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    # SIGINT too: a launcher started in the background inherits SIGINT ignored
    main_thread = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        try:
            procs.append(_Proc("scheduler", 0, _SERVER_CMD, dict(base, DMLC_ROLE="scheduler"), out, lock))
            for i in range(servers):
                procs.append(_Proc("server", i, _SERVER_CMD, dict(base, DMLC_ROLE="server"), out, lock))
            for i in range(workers):
                procs.append(_Proc("worker", i, list(command), dict(base, DMLC_ROLE="worker"), out, lock))
        except OSError as e:
            raise UserError(f"distill launch: cannot start `{' '.join(command)}` ({e.strerror}). "
                            f"Check the command after `--` (use the full path of the program, "
                            f"e.g. {sys.executable}).") from None
        print(f"distill launch: scheduler on {host}:{port}, {servers} server(s), {workers} worker(s): "
              f"{' '.join(command)}", file=out, flush=True)
        return _watch(procs, exit_timeout, out)
    except KeyboardInterrupt:
        _stop(procs)
        why = "Ctrl-C" if not stop_signal or stop_signal[0] == "SIGINT" else stop_signal[0]
        raise UserError(f"distill launch: interrupted ({why}); stopped all {len(procs)} processes "
                        f"it started. Rerun the same launch with --resume on the worker command to "
                        f"continue from the last complete epoch.") from None
    finally:
        if any(p.poll() is None for p in procs):
            _stop(procs)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _watch(procs, exit_timeout, out):
    """Wait for the workers; fail the launch as soon as any process dies before they are done."""
    workers = [p for p in procs if p.role == "worker"]
    quiet_exit = {}        # scheduler/server that exited with 0 → when (the job may be ending)
    while True:
        for p in procs:
            rc = p.poll()
            failed = rc is not None and rc != 0
            if rc == 0 and p.role != "worker" and any(w.poll() is None for w in workers):
                # the scheduler stops once every worker has finalized, maybe a moment before
                # the last worker process is gone; still running GRACE_S later is a failure
                since = quiet_exit.setdefault(p, time.time())
                failed = time.time() - since > GRACE_S
            if failed:
                # a server aborts when a worker dies mid-request: name the worker if one died too
                time.sleep(0.5)
                dead = [q for q in workers if q.poll() not in (None, 0)]
                p = dead[0] if dead and p.role != "worker" else p
                rc = p.poll()
                p.pump.join(timeout=1.0)         # its last lines, for the message
                others = [q for q in procs if q is not p and q.poll() is None]
                _stop(procs)
                tail = " | ".join(l for l in list(p.tail)[-3:] if l.strip())
                raise UserError(
                    f"distill launch: {p.describe()} {_how(rc)} while the workers were running; "
                    f"stopped the other {len(others)} process(es). "
                    + (f"Its last lines: {tail}. " if tail else "")
                    + "Fix the cause and rerun the same launch with --resume on the worker command: "
                      "it continues from the last complete epoch (the checkpoint rank 0 wrote).")
        if all(w.poll() == 0 for w in workers):
            break
        time.sleep(POLL_S)
    # every worker is done: the scheduler and servers stop when the last worker finalizes
    deadline = time.time() + exit_timeout
    rest = [p for p in procs if p.role != "worker"]
    while time.time() < deadline and any(p.poll() is None for p in rest):
        time.sleep(POLL_S)
    left = [p for p in rest if p.poll() is None]
    if left:
        print(f"distill launch: {', '.join(p.label for p in left)} still running {exit_timeout:.0f} s "
              f"after the workers finished: stopped", file=out, flush=True)
    _stop(procs)
    for p in workers:
        p.pump.join(timeout=1.0)
    print(f"distill launch: all {len(workers)} worker(s) finished", file=out, flush=True)
    return 0


def add_arguments(p):
    """``distill launch`` arguments."""
    p.add_argument("-n", "--workers", type=int, required=True, help="number of worker processes")
    p.add_argument("-s", "--servers", type=int, default=1, help="number of parameter servers (1)")
    p.add_argument("--port", type=int, default=None,
                   help="scheduler port (DMLC_PS_ROOT_PORT; default: a free port)")
    p.add_argument("--exit-timeout", type=float, default=30.0,
                   help="seconds the scheduler and servers get to stop after the workers are done")
    p.add_argument("command", nargs="+", metavar="-- COMMAND",
                   help="the worker command, after `--`: python train.py RECIPE.yaml ...")


def main(args):
    """Entry point of ``distill launch``."""
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return launch(cmd, args.workers, args.servers, port=args.port, exit_timeout=args.exit_timeout)


if __name__ == "__main__":       # `python -m distill.launch ...`: without the CLI's other imports
    import argparse

    from .cli import _run
    _parser = argparse.ArgumentParser(prog="python -m distill.launch", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    _parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sys.exit(_run(main, _parser.parse_args()))
