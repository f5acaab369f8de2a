"""``image_folder``: a folder with one subfolder per class, read with Pillow.

Two layouts::

    root/train/<class>/*.png   root/val/<class>/*.png    # explicit split (``test/`` also works)
    root/<class>/*.png                                   # split by data.val_split (seed)

or ``data.train`` / ``data.val`` naming the two class folders directly. Class names are the
sorted subfolder names; files are found recursively and hidden files (``.DS_Store``) are
ignored. Unreadable files are skipped and counted (``data.skip_corrupt: true``, the default)
or rejected with the file named.

Streamed (the default, ``data.stream`` unset or true): the splits are
:class:`~distill.data.stream.StreamedImages` over the files, decoded when read. With
``data.grayscale`` or ``data.image_size`` unset, every file's *header* is read at start (Pillow
opens it without decoding the pixels): the channels are 1 when every file has a gray mode, as
in memory, and the sizes must agree (else the error asks for ``data.image_size``). A file that
cannot even be opened there is left out and counted. Unreadable pixels found later (a
truncated file) read as zeros and are counted once. With both keys set nothing is read at
start. ``data.stream: false`` decodes every file into memory as before.

Recipe example::

    data: {name: image_folder, root: data/flowers, image_size: [64, 64], grayscale: false}
"""
import logging
import os
import time

import numpy as np

from ..errors import UserError
from .base import DATASETS, SourceData, stratified_split
from .images import assemble, decode_all, parse_image_size, target_channels
from .stream import ImageSource, StreamedImages, TransformSpec

__all__ = ["load_image_folder", "find_classes", "list_images", "FolderSource"]
_LOGGER = logging.getLogger(__name__)

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")
_VAL_NAMES = ("val", "test")
_FIX = "Remove or replace the file."


def _read_image(path):
    """Decode ``path`` fully: ``(H, W)`` for gray modes, ``(H, W, 3)`` RGB otherwise."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()                      # decodes the whole file: truncation shows up here
        mode = im.mode
        if mode in ("I", "I;16", "I;16L", "I;16B"):
            return np.clip(np.asarray(im, dtype=np.float64) / 65535.0, 0, 1).astype(np.float32)
        if mode == "F":
            return np.clip(np.asarray(im, dtype=np.float32), 0, 1)
        if mode in _GRAY_MODES:
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))


def find_classes(folder, what="image_folder"):
    """Sorted names of the non-hidden subfolders of ``folder``; UserError if there are none."""
    if not os.path.isdir(folder):
        raise UserError(f"{what}: folder {folder} does not exist (looked in "
                        f"{os.path.abspath(folder)}); it must hold one subfolder of images "
                        f"per class.")
    classes = sorted(d for d in os.listdir(folder)
                     if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise UserError(f"{what}: {folder} has no class subfolders. Put the images of each "
                        f"class in their own subfolder ({folder}/<class>/image.png), or use "
                        f"{folder}/train/<class>/ and {folder}/val/<class>/.")
    return classes


def list_images(folder, classes, what="image_folder"):
    """``[(path, label)]`` for every non-hidden file under ``folder/<class>/`` (recursive, sorted).

    Raises UserError naming the first class folder with no files.
    """
    out = []
    for label, name in enumerate(classes):
        cdir = os.path.join(folder, name)
        files = []
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
        if not files:
            raise UserError(f"{what}: class folder {cdir} is empty. Add images of class "
                            f"{name!r} to it, or remove the folder.")
        out.extend((f, label) for f in files)
    return out


def _resolve(cfg):
    """``(train_dir, val_dir or None)`` from ``data.root`` or ``data.train``/``data.val``."""
    if cfg.train:
        for key, path in (("data.train", cfg.train), ("data.val", cfg.val)):
            if path and not os.path.isdir(path):
                raise UserError(f"image_folder: `{key}` {path} does not exist or is not a folder "
                                f"(looked in {os.path.abspath(path)}); it must hold one subfolder "
                                f"of images per class.")
        return cfg.train, cfg.val
    if not cfg.root:
        raise UserError("image_folder: set `data.root` to a folder with one subfolder of images "
                        "per class (or root/train/<class>/ and root/val/<class>/), or set "
                        "`data.train` (and `data.val`) to such class folders.")
    root = cfg.root
    if not os.path.isdir(root):
        raise UserError(f"image_folder: `data.root` {root} does not exist or is not a folder "
                        f"(looked in {os.path.abspath(root)}).")
    train = os.path.join(root, "train")
    if os.path.isdir(train):
        for v in _VAL_NAMES:
            if os.path.isdir(os.path.join(root, v)):
                return train, os.path.join(root, v)
        return train, None
    return root, None


def _check_same_classes(train_dir, train_classes, val_dir, val_classes):
    if train_classes == val_classes:
        return
    only_t = sorted(set(train_classes) - set(val_classes))
    only_v = sorted(set(val_classes) - set(train_classes))
    parts = []
    if only_t:
        parts.append(f"only in {train_dir}: {', '.join(only_t)}")
    if only_v:
        parts.append(f"only in {val_dir}: {', '.join(only_v)}")
    raise UserError(f"image_folder: the train and val folders have different classes "
                    f"({'; '.join(parts)}). Both need the same class subfolders so labels match.")


@DATASETS.register("image_folder")
def load_image_folder(cfg, seed):
    """Load an ``image_folder`` dataset.

    Parameters
    ----------
    cfg : DataConfig
        Uses ``root``/``train``/``val``, ``val_split``, ``grayscale``, ``image_size``,
        ``skip_corrupt``, ``stream`` and the decoding keys (``val_resize``, ``workers``, ...).
    seed : int
        Seed of the stratified split when there is no val folder.

    Returns
    -------
    SourceData
        Channels and size already as the config asks; ``x_train``/``x_val`` are
        :class:`~distill.data.stream.StreamedImages` unless ``data.stream`` is false.
    """
    what = "image_folder"
    train_dir, val_dir = _resolve(cfg)
    classes = find_classes(train_dir, what)
    if len(classes) == 1:
        _LOGGER.warning("%s: %s has a single class folder (%s)", what, train_dir, classes[0])
    items = [(p, lab, "train") for p, lab in list_images(train_dir, classes, what)]
    if val_dir:
        val_classes = find_classes(val_dir, what)
        _check_same_classes(train_dir, classes, val_dir, val_classes)
        items += [(p, lab, "val") for p, lab in list_images(val_dir, classes, what)]
    if cfg.stream is not False:
        return _load_streamed(cfg, seed, items, classes, train_dir, val_dir)

    images, names, tagged, bad = decode_all(
        ((p, (lab, side), p) for p, lab, side in items), _read_image, cfg.skip_corrupt, what, _FIX)
    labels = np.array([lab for lab, _ in tagged], np.int32)
    is_val = np.array([side == "val" for _, side in tagged], bool)
    _check_classes(labels, is_val, classes, train_dir, val_dir, len(bad))

    x = assemble(images, names, cfg.grayscale, parse_image_size(cfg.image_size), what,
                 cfg.val_resize)
    tr, va, where = _sides(labels, is_val, val_dir, train_dir, cfg, seed)
    return SourceData(x_train=x[tr], y_train=labels[tr], x_val=x[va], y_val=labels[va],
                      class_names=list(classes), skipped=len(bad),
                      source=f"image_folder: {len(tr)} images from {where}")


# load_data leaves the images on disk (StreamedImages) unless data.stream is false
load_image_folder.streams = True


def _sides(labels, is_val, val_dir, train_dir, cfg, seed):
    """``(train positions, val positions, where)``: the val folder's files, or a stratified
    ``data.val_split`` of the train folder."""
    if val_dir:
        return np.flatnonzero(~is_val), np.flatnonzero(is_val), train_dir
    tr, va = stratified_split(labels, cfg.val_split, seed)
    return tr, va, f"{train_dir} (stratified split, seed {seed})"


def _check_classes(labels, is_val, classes, train_dir, val_dir, n_bad):
    """UserError naming the first class folder left without readable images."""
    for side, mask, folder in (("train", ~is_val, train_dir), ("val", is_val, val_dir)):
        if side == "val" and not val_dir:
            continue
        present = set(labels[mask].tolist())
        missing = [c for i, c in enumerate(classes) if i not in present]
        if missing:
            raise UserError(f"image_folder: class folder {os.path.join(folder, missing[0])} has no "
                            f"readable images ({n_bad} unreadable file(s) were skipped). "
                            f"Add images to it or remove the folder.")


def _header(path):
    """``(mode, (H, W))`` from the file's header (Pillow reads no pixels here)."""
    from PIL import Image
    with Image.open(path) as im:
        return im.mode, (im.size[1], im.size[0])


class FolderSource(ImageSource):
    """:class:`~distill.data.stream.ImageSource` over image files (decoded with Pillow)."""

    def __init__(self, paths, ids, skip_corrupt=True):
        super().__init__("image_folder", ids, skip_corrupt, _FIX)
        self.paths = list(paths)

    def name(self, i):
        return self.paths[i]

    def decode(self, i):
        return _read_image(self.paths[i])


def _load_streamed(cfg, seed, items, classes, train_dir, val_dir):
    """The streamed dataset: paths and labels in memory, images decoded on demand."""
    what = "image_folder"
    ids = np.arange(len(items))                 # file order numbers, before anything is left out
    size = parse_image_size(cfg.image_size)
    channels = None if cfg.grayscale is None else (1 if cfg.grayscale else 3)
    bad = {}
    if channels is None or size is None:
        t0, keep, modes, sizes = time.time(), [], [], []
        for k, (path, _, _) in enumerate(items):
            try:
                mode, hw = _header(path)
            except Exception as e:   # any failure to open means "unreadable"  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
                if not cfg.skip_corrupt:
                    raise UserError(f"{what}: cannot read {path} as an image ({err}). {_FIX} Or "
                                    f"set `data.skip_corrupt: true` to skip unreadable images.") from None
                bad[path] = err
                continue
            keep.append(k)
            modes.append(mode)
            sizes.append(hw)
        _LOGGER.info("%s: read the headers of %d files in %.1f s to choose the channels and check "
                     "the sizes (`data.grayscale`/`data.image_size` unset)",
                     what, len(items), time.time() - t0)
        if bad:
            shown = ", ".join(list(bad)[:3]) + (", ..." if len(bad) > 3 else "")
            _LOGGER.warning("%s: skipped %d unreadable image(s) (data.skip_corrupt is true): %s",
                            what, len(bad), shown)
        ids = ids[keep]
        items = [items[k] for k in keep]
        if channels is None:
            channels = target_channels(None, all(m in _GRAY_MODES for m in modes))
        if size is None and sizes:
            size = sizes[0]
            for (path, _, _), hw in zip(items, sizes):
                if hw != size:
                    raise UserError(
                        f"{what}: images have different sizes ({items[0][0]} is {size[0]}×{size[1]}, "
                        f"{path} is {hw[0]}×{hw[1]}, height×width) and `data.image_size` is not "
                        f"set: set `data.image_size` to an integer or [height, width] so every "
                        f"image is resized to it.")
    labels = np.array([lab for _, lab, _ in items], np.int32)
    is_val = np.array([side == "val" for _, _, side in items], bool)
    _check_classes(labels, is_val, classes, train_dir, val_dir, len(bad))
    tr, va, where = _sides(labels, is_val, val_dir, train_dir, cfg, seed)
    src = FolderSource([p for p, _, _ in items], ids, cfg.skip_corrupt)
    src.bad.update(bad)
    spec = TransformSpec(channels=channels, size=size, val_resize=cfg.val_resize,
                         min_random_area=cfg.min_random_area, jitter=cfg.jitter,
                         pca_noise=cfg.pca_noise, workers=cfg.workers)
    return SourceData(x_train=StreamedImages(src, tr, spec), y_train=labels[tr],
                      x_val=StreamedImages(src, va, spec), y_val=labels[va],
                      class_names=list(classes), skipped=0,
                      source=f"image_folder: {len(tr)} images from {where}")
