"""Safe, atomic checkpoints: no code in them, and a crash while writing keeps the previous one.

A checkpoint is one MXNet NDArray file, ``checkpoints/epoch-NNNN.ckpt``, in the format
``mx.nd.save`` writes (the ``.params`` binary format: a header, then named arrays; it holds no
code and is read without pickle). Its arrays, by name:

``params/<structural name>``
    The trained parameters (the student's and the loss terms' own).
``optimizer/states/<updater>/<param index>[/<position>...]``
    The optimizer's state arrays (momentum, Adam's mean and variance, ...), read from the
    Trainer's updaters, not from ``Trainer.save_states``: MXNet pickles those.
``state/...``, ``rng/...``
    Arrays inside modifier state (pruning mask bits, Taylor gradients) and NumPy's RNG key,
    each with its exact dtype.
``meta.json``
    A ``uint8`` array holding UTF-8 JSON of everything else: the format version, the epoch,
    the history, the resolved recipe (or QAT signature), the modifiers' state, the RNG states
    and the optimizer's counters (``num_update`` and the per-parameter update counts: Adam's
    bias correction and a bit-exact resume need them). Each array above appears in that JSON
    as ``{"__array__": NAME, "dtype": ..., "shape": ...}`` (NumPy) or ``{"__ndarray__": NAME}``
    (MXNet), so the JSON alone says where every value goes.

One file keeps the checkpoint one atomic step and its name the one every other part of the run
folder expects. It is written to a temporary ``.tmp-*`` file in the same folder, flushed to
disk (fsync), then renamed to its final name (``os.replace`` is atomic on POSIX): a checkpoint
is complete exactly when ``epoch-NNNN.ckpt`` exists, and a write cut off at any point leaves
only a ``.tmp-*`` file, which :func:`latest_checkpoint` removes. The newest :data:`KEEP` are kept.

Checkpoints written before this format were pickles. Unpickling runs whatever code the file
holds, so one is loaded only when the caller trusts it (``--trust-checkpoint``); otherwise
:func:`read_checkpoint` raises a :class:`~distill.errors.UserError` saying so.
"""
import base64
import glob
import json
import logging
import os
import random
import re
import tempfile

import mxnet as mx
import numpy as np

from .errors import UserError
from .replicas import first, set_all

__all__ = ["atomic_write_bytes", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "apply_checkpoint", "optimizer_state", "restore_optimizer",
           "latest_checkpoint", "is_legacy_checkpoint", "net_state", "load_net_state", "KEEP",
           "FORMAT_VERSION"]
_LOGGER = logging.getLogger(__name__)
# epoch-NNNN.ckpt: epoch NNNN (0-based) done; epoch-NNNN-step-SSSSSS.ckpt: SSSSSS steps of
# epoch NNNN done (trainer.checkpoint_every)
_PATTERN = re.compile(r"epoch-(\d+)(?:-step-(\d+))?\.ckpt$")
KEEP = 2
FORMAT_VERSION = 1
_FORMAT = "distill-checkpoint"
_META = "meta.json"
# the first 8 bytes of an mx.nd.save file: kMXAPINDArrayListMagic (0x112), little-endian uint64
_ND_MAGIC = (0x112).to_bytes(8, "little")
# a pickle of protocol 2 or later starts with the PROTO opcode (the old checkpoints: HIGHEST_PROTOCOL)
_PICKLE_PROTO = b"\x80"
# dtypes an NDArray file stores natively (mx.nd.save keeps them exactly); others go as raw bytes
_ND_DTYPES = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.uint8, np.int8,
                                          np.int32, np.int64, np.bool_))
_TAGS = ("__array__", "__ndarray__", "__tuple__", "__items__", "__scalar__", "__bytes__")


def _atomic_replace(path, write, sync_folder=False):
    """Create ``path`` via a temporary file in its folder: ``write(tmp_path)``, fsync, rename.

    A crash at any point leaves ``path`` as it was (and at most a ``.tmp-*`` file).
    ``sync_folder``: also fsync the folder, so that the rename itself survives a power cut."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if not sync_folder:
        return
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` via a temporary file + fsync + rename."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    _atomic_replace(path, write)


def net_state(net):
    """Parameters of a Gluon block by structural name (independent of name-scope counters).

    On several devices, replica 0's values: the optimizer keeps the trained parameters identical
    on every replica, and the loop averages the BatchNorm running statistics over the replicas
    (:func:`distill.replicas.sync_running_stats`) before it checkpoints."""
    return {k: first(v).asnumpy() for k, v in net._collect_params_with_prefix().items()}


def load_net_state(net, state, where="checkpoint"):
    """Load :func:`net_state` output back into ``net``; names and shapes must match.

    Every replica is set (:func:`distill.replicas.set_all`), whatever the device count the
    state was saved from."""
    params = net._collect_params_with_prefix()
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise UserError(f"{where}: parameters do not match the network (missing: {missing[:5]}, "
                        f"unexpected: {extra[:5]}). Was it written by a different recipe?")
    for k, p in params.items():
        if tuple(p.shape) != tuple(state[k].shape):
            raise UserError(f"{where}: parameter {k!r} has shape {state[k].shape}, the network "
                            f"expects {p.shape}.")
        set_all(p, mx.nd.array(state[k], dtype=state[k].dtype))


# -- JSON with arrays beside it --------------------------------------------------------------------

class _Malformed(ValueError):
    """The JSON of a checkpoint does not describe what this module writes."""


class _Packer:
    """Turns nested Python state into JSON-able values, moving arrays into :attr:`arrays`.

    Exact for what the loop and the modifiers hold: None, bool, int, float (NaN and Inf too),
    str, bytes, list, tuple, dict (any hashable keys of these types), NumPy scalars and arrays
    (dtype kept), MXNet NDArrays. Anything else is a programming error (TypeError), caught
    when the checkpoint is written, not when it is read back.
    """

    def __init__(self):
        self.arrays = {}

    def _key(self, path):
        base = "/".join(path)
        key, n = base, 1
        while key in self.arrays:           # a str dict key holding "/" could repeat a name
            key, n = f"{base}#{n}", n + 1
        return key

    def pack(self, obj, path):
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, mx.nd.NDArray):
            key = self._key(path)
            self.arrays[key] = obj
            return {"__ndarray__": key}
        if isinstance(obj, np.ndarray):
            return self._pack_array(obj, path)
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject or obj.dtype.kind in "cVSUMm":
                raise TypeError(f"checkpoint: cannot store a {obj.dtype} scalar at {'/'.join(path)}")
            return {"__scalar__": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, bytes):
            return {"__bytes__": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, list):
            return [self.pack(v, path + (str(i),)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v, path + (str(i),)) for i, v in enumerate(obj)]}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
                return {k: self.pack(v, path + (k,)) for k, v in obj.items()}
            return {"__items__": [[self.pack(k, path + ("key",)), self.pack(v, path + (str(k),))]
                                  for k, v in obj.items()]}
        raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {'/'.join(path)} "
                        f"(state_dict values must be plain data, NumPy or MXNet arrays)")

    def _pack_array(self, a, path):
        if a.dtype.hasobject or a.dtype.kind in "cVSUMm":
            raise TypeError(f"checkpoint: cannot store a {a.dtype} array at {'/'.join(path)}")
        head = {"dtype": a.dtype.str, "shape": [int(s) for s in a.shape]}
        if a.ndim == 0 or a.size == 0:      # MXNet's legacy shapes cannot hold these: inline
            return {"__array__": None, **head, "data": a.tolist()}
        key = self._key(path)
        if a.dtype in _ND_DTYPES and a.dtype.isnative:
            self.arrays[key] = mx.nd.array(a, dtype=a.dtype)
            return {"__array__": key, **head}
        raw = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)
        self.arrays[key] = mx.nd.array(raw, dtype=np.uint8)
        return {"__array__": key, **head, "raw": True}


def _dtype(s):
    try:
        dt = np.dtype(s)
    except (TypeError, ValueError):
        raise _Malformed(f"unknown dtype {s!r}") from None
    if dt.hasobject or dt.kind in "cVSUMm":
        raise _Malformed(f"dtype {s!r} is not stored by checkpoints")
    return dt


def _unpack(obj, arrays):
    """Inverse of :meth:`_Packer.pack`; raises :class:`_Malformed` on anything unexpected."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_unpack(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        raise _Malformed(f"unexpected JSON value {type(obj).__name__}")
    tag = next((t for t in _TAGS if t in obj), None)
    if tag is None:
        return {k: _unpack(v, arrays) for k, v in obj.items()}
    val = obj[tag]
    if tag == "__tuple__":
        return tuple(_unpack(v, arrays) for v in _list_of(val))
    if tag == "__items__":
        out = {}
        for pair in _list_of(val):
            if not isinstance(pair, list) or len(pair) != 2:
                raise _Malformed("a dict item is not a [key, value] pair")
            k = _unpack(pair[0], arrays)
            try:
                out[k] = _unpack(pair[1], arrays)
            except TypeError:
                raise _Malformed("a dict key is not hashable") from None
        return out
    if tag == "__bytes__":
        try:
            return base64.b64decode(str(val), validate=True)
        except ValueError:
            raise _Malformed("bad base64") from None
    if tag == "__scalar__":
        return np.array(obj.get("value"), dtype=_dtype(val))[()]
    if tag == "__ndarray__":
        return _array(arrays, val)
    # __array__
    dt, shape = _dtype(obj.get("dtype")), obj.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _Malformed(f"bad shape {shape!r}")
    if val is None:
        return np.array(obj.get("data"), dtype=dt).reshape(shape)
    nd = _array(arrays, val)
    if obj.get("raw"):
        raw = nd.asnumpy().tobytes()
        if len(raw) != dt.itemsize * int(np.prod(shape)):
            raise _Malformed(f"array {val!r} has {len(raw)} bytes, not {shape} of {dt}")
        return np.frombuffer(raw, dt).reshape(shape).copy()
    a = nd.asnumpy()
    if list(a.shape) != shape:
        raise _Malformed(f"array {val!r} has shape {a.shape}, the JSON says {shape}")
    return a.astype(dt, copy=False)


def _list_of(val):
    if not isinstance(val, list):
        raise _Malformed("expected a list")
    return val


def _array(arrays, key):
    if not isinstance(key, str) or key not in arrays:
        raise _Malformed(f"array {key!r} is not in the file")
    return arrays[key]


# -- optimizer state -------------------------------------------------------------------------------

def _states_on_servers(trainer):
    """``dist_async``: the optimizer state lives on the parameter servers, which cannot save it
    (MXNet: "Cannot save states for distributed training"); a resumed run restarts it."""
    kv = getattr(trainer, "_kvstore", None)
    return bool(kv is not None and "dist" in kv.type and getattr(trainer, "_update_on_kvstore", False))


def _updaters(trainer):
    """The :class:`mx.optimizer.Updater` objects holding ``trainer``'s state: one per device, or
    the local KVStore's one when it updates; None when the state is on parameter servers."""
    # what Trainer.save_states/load_states do first: the updaters exist only after this
    if not trainer._kv_initialized:
        trainer._init_kvstore()
    if trainer._params_to_init:
        trainer._init_params()
    if _states_on_servers(trainer):
        return None
    if trainer._update_on_kvstore:
        return [trainer._kvstore._updater]
    return list(trainer._updaters)


def optimizer_state(trainer):
    """What :meth:`Updater.get_states` pickles, as plain data: every updater's ``states``
    (param index → NDArray, tuple/list of NDArrays or None) and the optimizer's counters."""
    updaters = _updaters(trainer)
    if updaters is None:
        return None
    opt = updaters[0].optimizer
    current = next((d for d, c in opt._all_index_update_counts.items()
                    if c is opt._index_update_count), None)
    return {"optimizer": type(opt).__name__.lower(), "lr": opt.lr, "num_update": opt.num_update,
            "begin_num_update": opt.begin_num_update,
            "index_update_counts": opt._all_index_update_counts, "current_device": current,
            "states": [u.states for u in updaters]}


def restore_optimizer(trainer, st, path):
    updaters = _updaters(trainer)
    if updaters is None:
        _LOGGER.warning("%s: this run keeps the optimizer state on its parameter servers "
                        "(dist_async), which cannot load it: momentum restarts from zero", path)
        return
    opt = updaters[0].optimizer
    try:
        name, per = st["optimizer"], st["states"]
        counts, current = st["index_update_counts"], st["current_device"]
        if not isinstance(per, list) or not per or not all(isinstance(s, dict) for s in per) \
                or not isinstance(counts, dict) or not all(isinstance(c, dict) for c in counts.values()):
            raise _Malformed("optimizer state")
        num_update, begin, lr = int(st["num_update"]), int(st["begin_num_update"]), st["lr"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"checkpoint {path}: its optimizer state is malformed. Delete it to resume "
                        f"from the one before, or start again without --resume.") from None
    if name != type(opt).__name__.lower():
        raise UserError(f"checkpoint {path} holds {name} optimizer state, but this run uses "
                        f"{type(opt).__name__.lower()}. Resume with the recipe that wrote it, or "
                        f"start again without --resume.")
    n_params = len(trainer._params)
    for states in per:
        bad = [i for i in states if not isinstance(i, int) or not 0 <= i < n_params]
        if bad:
            raise UserError(f"checkpoint {path}: optimizer state for parameter index {bad[0]!r}, "
                            f"but the network has {n_params} parameters. Was it written by a "
                            f"different recipe?")
    if len(per) != len(updaters):
        # another device count: every device gets the first one's (as Trainer.load_states does)
        per = [per[0]] + [_copy_state(per[0]) for _ in updaters[1:]]
    for u, states in zip(updaters, per):
        u.states = states
        # the arrays were loaded on the CPU: the updater moves each to its weight's device first
        u.states_synced = dict.fromkeys(states, False)
    opt.lr, opt.num_update, opt.begin_num_update = lr, num_update, begin
    opt._all_index_update_counts = {d: dict(c) for d, c in counts.items()} or {0: {}}
    opt._index_update_count = opt._all_index_update_counts.setdefault(
        current if current is not None else 0, {})
    _counts_for_every_device(trainer, opt)


def _counts_for_every_device(trainer, opt):
    """Give every device this trainer updates on the saved update counts.

    MXNet's optimizer counts updates per device id (``Updater`` calls
    ``_set_current_context(weight.context.device_id)``); a device id missing from the restored
    counts starts from zero, so with another device list (one device saved, two loaded, or
    ``gpu(1)`` saved and ``gpu(0)`` loaded) Adam's bias correction would differ between replicas
    and from the uninterrupted run. Missing ids get a copy of the current device's counts (all
    devices count the same updates); 0 is included for a KVStore that updates on ``cpu_pinned(0)``.
    An empty entry counts as missing: the optimizer starts with ``{0: {}}`` whatever its devices."""
    counts = opt._all_index_update_counts
    ref = opt._index_update_count
    ids = {c.device_id for c in getattr(trainer, "_contexts", [])} | {0}
    for d in sorted(ids):
        if not counts.get(d) and counts.get(d) is not ref:
            counts[d] = dict(ref)


def _copy_state(state):
    if isinstance(state, mx.nd.NDArray):
        return state.copy()
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(s) for s in state)
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    return state


# -- writing and reading ---------------------------------------------------------------------------

def save_checkpoint(folder, epoch, net, trainer, extra, step=None):
    """Write ``epoch-NNNN.ckpt`` atomically and keep the newest :data:`KEEP` checkpoints.

    Parameters
    ----------
    folder : str
        The checkpoints folder (created when missing).
    epoch : int
        The 0-based epoch just finished (-1: none yet, for a step checkpoint in the first).
    net : gluon.Block
        Whose parameters are saved by structural name.
    trainer : gluon.Trainer
        Whose optimizer state is saved (none under ``dist_async``: it is on the servers).
    extra : dict
        More state to restore (history, recipe, modifiers' ``state_dict``, ...): plain data,
        NumPy or MXNet arrays (see :class:`_Packer`).
    step : (int, int) or None
        ``(epoch in progress, steps done)`` for a mid-epoch checkpoint
        (``epoch-NNNN-step-SSSSSS.ckpt``, ``trainer.checkpoint_every``).

    Returns
    -------
    str
        The checkpoint's path.
    """
    os.makedirs(folder, exist_ok=True)
    packer = _Packer()
    # replica 0 of each parameter (see net_state): a checkpoint does not depend on the devices
    arrays = {f"params/{k}": first(p) for k, p in net._collect_params_with_prefix().items()}
    meta = {"format": _FORMAT, "version": FORMAT_VERSION, "epoch": int(epoch),
            "optimizer": packer.pack(optimizer_state(trainer), ("optimizer",)),
            "rng": packer.pack({"python": random.getstate(), "numpy": np.random.get_state()}, ("rng",))}
    for k, v in extra.items():
        if k in meta or k == "params":
            raise ValueError(f"save_checkpoint: extra key {k!r} is reserved")
        meta[k] = packer.pack(v, ("state", k))
    clash = set(arrays) & set(packer.arrays)
    assert not clash, clash
    arrays.update(packer.arrays)
    text = json.dumps(meta, allow_nan=True, separators=(",", ":")).encode("utf-8")
    arrays[_META] = mx.nd.array(np.frombuffer(text, np.uint8), dtype=np.uint8)
    name = f"epoch-{epoch:04d}.ckpt" if step is None else f"epoch-{step[0]:04d}-step-{step[1]:06d}.ckpt"
    path = os.path.join(folder, name)
    _atomic_replace(path, lambda tmp: mx.nd.save(tmp, arrays), sync_folder=True)
    for old in sorted(_list(folder))[:-KEEP]:
        os.unlink(old[1])
    return path


def _list(folder):
    out = []
    for p in glob.glob(os.path.join(folder, "epoch-*.ckpt")):
        m = _PATTERN.search(p)
        if m and os.path.isfile(p):
            # order: epoch e done comes after every step checkpoint of epoch e
            key = (int(m.group(1)) + 1, 0) if m.group(2) is None else (int(m.group(1)), int(m.group(2)))
            out.append((key, p))
    return out


def latest_checkpoint(folder, clean=True):
    """Path of the newest complete checkpoint in ``folder``, or ``None``.

    Temporary files of a write that was cut off (``.tmp-*``; ``.states-*`` of the pickle format
    before) are removed: only renamed, complete files count. ``clean=False`` only looks (a
    ``dist_*`` worker other than rank 0: the folder is rank 0's)."""
    stale = glob.glob(os.path.join(folder, ".tmp-*")) + glob.glob(os.path.join(folder, ".states-*"))
    for path in stale if clean else ():
        os.unlink(path)
    found = sorted(_list(folder))
    return found[-1][1] if found else None


def _head(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(_ND_MAGIC))
    except OSError as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}). Delete it to resume from the "
                        f"one before, or start again without --resume.") from None


def is_legacy_checkpoint(path):
    """True when ``path`` is a checkpoint in the old pickle format (read without unpickling)."""
    return bool(path) and _head(path)[:1] == _PICKLE_PROTO


def _untrusted(path):
    return UserError(
        f"checkpoint {path} is in the old pickle format. Loading it means unpickling it, and "
        f"unpickling runs whatever code the file holds: a run folder from someone else could run "
        f"anything on this machine. If you wrote this run folder yourself, resume with "
        f"--trust-checkpoint (the next checkpoints are written in the safe format); otherwise "
        f"start again without --resume.")


def read_checkpoint(path, trust=False):
    """The content of a checkpoint, without touching any network or trainer.

    Parameters
    ----------
    path : str
    trust : bool
        Also read a checkpoint of the old pickle format (``--trust-checkpoint``): unpickling
        runs any code the file holds, so only for files this user wrote.

    Returns
    -------
    dict
        ``epoch``, ``params`` (structural name → NumPy array), ``rng``, ``history``,
        ``modifiers``, ``recipe``, ... (whatever the writer passed as ``extra``), and
        ``optimizer`` (plain data with NDArrays; None under ``dist_async``). An old pickle has
        ``trainer_states`` (MXNet's pickled bytes) instead of ``optimizer``.

    Raises
    ------
    UserError
        An old pickle without ``trust``, or a file that is not a complete checkpoint.
    """
    head = _head(path)
    if head[:1] == _PICKLE_PROTO:
        if not trust:
            raise _untrusted(path)
        return _read_pickle(path)
    broken = (f"checkpoint {path} is not a complete checkpoint written by distill ({{}}). Delete "
              f"it to resume from the one before, or start again without --resume.")
    if head != _ND_MAGIC:
        raise UserError(broken.format("not an MXNet NDArray file"))
    try:
        arrays = mx.nd.load(path)
    except mx.base.MXNetError as e:
        raise UserError(broken.format(str(e).strip().splitlines()[-1][:200])) from None
    if not isinstance(arrays, dict) or _META not in arrays:
        raise UserError(broken.format(f"no {_META}"))
    try:
        meta = json.loads(arrays.pop(_META).asnumpy().tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise _Malformed(f"{_META} is not a {_FORMAT}")
        if meta.get("version") != FORMAT_VERSION:
            raise UserError(f"checkpoint {path} has format version {meta.get('version')!r}; this "
                            f"distill reads version {FORMAT_VERSION}. Resume with the distill that "
                            f"wrote it, or start again without --resume.")
        params = {k[len("params/"):]: v.asnumpy() for k, v in arrays.items() if k.startswith("params/")}
        payload = {k: _unpack(v, arrays) for k, v in meta.items() if k not in ("format", "version")}
        payload["epoch"] = int(payload["epoch"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UserError(broken.format(f"{_META}: {e}")) from None
    payload["params"] = params
    return payload


def _read_pickle(path):
    import pickle  # the old format, trusted by the user (--trust-checkpoint): nowhere else
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"checkpoint {path} cannot be read ({e}). Delete it to resume from the "
                        f"one before, or start again without --resume.") from None
    if not isinstance(payload, dict) or "params" not in payload:
        raise UserError(f"checkpoint {path} is not a checkpoint written by distill. Delete it to "
                        f"resume from the one before, or start again without --resume.")
    return payload


def load_checkpoint(path, net, trainer, before_states=None, trust=False):
    """Restore ``net`` and ``trainer`` from ``path``; return the payload (epoch, history, ...).

    ``before_states()`` runs between the parameters and the optimizer state (a ``dist_*`` run
    puts the loaded parameters into its KVStore there: :meth:`Cluster.init_trainer`).
    ``trust``: also load the old pickle format (see :func:`read_checkpoint`)."""
    return apply_checkpoint(read_checkpoint(path, trust=trust), path, net, trainer, before_states)


def apply_checkpoint(payload, path, net, trainer, before_states=None):
    """:func:`load_checkpoint` in two halves: restore ``net``, ``trainer`` and the RNGs from a
    ``payload`` that :func:`read_checkpoint` read (the loop reads the modifiers' state first: a
    student rebuilt smaller by channel pruning needs its shapes before its parameters)."""
    load_net_state(net, payload["params"], where=path)
    if before_states is not None:
        before_states()
    legacy = "trainer_states" in payload
    states = payload["trainer_states"] if legacy else payload.get("optimizer")
    if states is None:
        _LOGGER.warning("%s holds no optimizer state (dist_async keeps it on the servers): "
                        "momentum restarts from zero", path)
    elif legacy:
        _load_pickled_states(trainer, states)
    else:
        restore_optimizer(trainer, states, path)
    try:
        py, npr = payload["rng"]["python"], payload["rng"]["numpy"]
        random.setstate(py)
        np.random.set_state(npr)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"checkpoint {path}: its RNG state is malformed. Delete it to resume from "
                        f"the one before, or start again without --resume.") from None
    return payload


def _load_pickled_states(trainer, states):
    # The old format only (trusted): MXNet loads its pickled optimizer state from a file. Not in
    # the checkpoints folder: there, rank 0 of a dist job removes stale temporaries while the
    # other ranks load theirs.
    fd, tmp_states = tempfile.mkstemp(prefix="distill-states-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(states)
        trainer.load_states(tmp_states)
    finally:
        os.unlink(tmp_states)
    updaters = _updaters(trainer)
    if updaters:
        _counts_for_every_device(trainer, updaters[0].optimizer)
