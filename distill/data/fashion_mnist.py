"""``fashion_mnist``: Zalando's Fashion-MNIST from its four original idx files (no download).

60,000 training and 10,000 test images, 28×28, one channel, 10 classes (Xiao, Rasul & Vollgraf,
2017). The files are read from ``data.root``, by default ``/usr/share/datasets/fashion-mnist``,
where Debian's package ``dataset-fashion-mnist`` puts them.

Splits: ``val`` (what every report, ``metrics.json``'s ``data.val`` and the per-epoch figure
use) is the full 10,000-image **test set**. Anything that selects (int8 ``auto`` policies,
sensitivity, prune-to-target) reads ``select``, a stratified holdout of the training set of
``data.val_split`` (fixed internal seed), which is removed from the training images: the test
set never decides anything. Results are the last epoch's.

Recipe example::

    data: {name: fashion_mnist, mean: [0.2860], std: [0.3530], val_split: 0.05}
"""
import gzip
import logging
import os
import struct

import numpy as np

from ..errors import UserError
from .base import DATASETS, SourceData, stratified_split

__all__ = ["load_fashion_mnist", "read_idx", "DEFAULT_ROOT", "FILES", "CLASS_NAMES", "SPLIT_SEED"]
_LOGGER = logging.getLogger(__name__)

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
         "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot"]
SPLIT_SEED = 0
_HOW_TO_GET = ("Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu: they go "
               "to /usr/share/datasets/fashion-mnist), or put the four files "
               f"{', '.join(FILES.values())} from the Zalando repository "
               "(github.com/zalandoresearch/fashion-mnist, folder data/fashion) into `data.root`.")


def read_idx(path, ndim):
    """Read one (optionally gzipped) idx file of unsigned bytes: images ``(N, 28, 28)`` for
    ``ndim`` 3, labels ``(N,)`` for ``ndim`` 1, as uint8.

    The format (LeCun's MNIST page): a big-endian magic ``0x00000800 + ndim`` (unsigned byte
    data), ``ndim`` big-endian uint32 sizes, then the bytes. A wrong magic, a size that does not
    match the bytes, or a truncated file is a :class:`UserError` naming the file."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"fashion_mnist: {path} cannot be read ({type(e).__name__}: {e}). "
                        f"{_HOW_TO_GET}") from None
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise UserError(f"fashion_mnist: {path} is truncated ({len(raw)} bytes, not even the "
                        f"{head}-byte header). {_HOW_TO_GET}")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != 0x800 + ndim:
        raise UserError(f"fashion_mnist: {path} is not an idx file of {ndim}-D unsigned bytes "
                        f"(magic {magic:#010x}, expected {0x800 + ndim:#010x}). {_HOW_TO_GET}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:head])
    n = int(np.prod(dims))
    if len(raw) - head != n:
        raise UserError(f"fashion_mnist: {path} holds {len(raw) - head} data bytes but its header "
                        f"says {'×'.join(map(str, dims))} = {n}: the file is truncated or "
                        f"damaged. {_HOW_TO_GET}")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def _paths(root):
    paths = {k: os.path.join(root, f) for k, f in FILES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        where = (f"`data.root` {root}" if os.path.isdir(root)
                 else f"`data.root` {root} (the folder does not exist)")
        raise UserError(f"fashion_mnist: {len(missing)} of the 4 files are missing from {where}: "
                        f"{', '.join(os.path.basename(p) for p in missing)}. {_HOW_TO_GET}")
    return paths


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(cfg, seed):
    """Load ``fashion_mnist`` (``seed`` is ignored: the holdout is fixed for a ``val_split``).

    Parameters
    ----------
    cfg : DataConfig
        ``root`` (default :data:`DEFAULT_ROOT`) and ``val_split`` (the selection holdout).
    seed : int

    Returns
    -------
    SourceData
        ``x`` float32 ``(N, 1, 28, 28)`` in [0, 1]; ``x_val`` the 10,000 test images,
        ``x_select`` the holdout of the training images.
    """
    root = os.path.expanduser(cfg.root or DEFAULT_ROOT)
    p = _paths(root)
    x_all, y_all = read_idx(p["train_images"], 3), read_idx(p["train_labels"], 1)
    x_test, y_test = read_idx(p["test_images"], 3), read_idx(p["test_labels"], 1)
    for x, y, what in ((x_all, y_all, "train"), (x_test, y_test, "t10k")):
        if len(x) != len(y):
            raise UserError(f"fashion_mnist: {root}: the {what} files hold {len(x)} images but "
                            f"{len(y)} labels. {_HOW_TO_GET}")
        if len(y) and int(y.max()) >= len(CLASS_NAMES):
            raise UserError(f"fashion_mnist: {root}: {what} label {int(y.max())} is not one of "
                            f"the 10 classes. {_HOW_TO_GET}")
    tr, sel = stratified_split(y_all.astype(np.int32), cfg.val_split, SPLIT_SEED)

    def images(a):
        return (a.astype(np.float32) / 255.0)[:, None]

    return SourceData(x_train=images(x_all[tr]), y_train=y_all[tr].astype(np.int32),
                      x_val=images(x_test), y_val=y_test.astype(np.int32),
                      x_select=images(x_all[sel]), y_select=y_all[sel].astype(np.int32),
                      class_names=list(CLASS_NAMES),
                      source=f"fashion_mnist: {len(tr)} Fashion-MNIST training images from {root} "
                             f"({len(sel)} more held out for selection; val = the "
                             f"{len(y_test)}-image test set)")
