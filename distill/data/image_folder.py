"""``image_folder``: a folder with one subfolder per class, read with Pillow.

Two layouts::

    root/train/<class>/*.png   root/val/<class>/*.png    # explicit split (``test/`` also works)
    root/<class>/*.png                                   # split by data.val_split (seed)

or ``data.train`` / ``data.val`` naming the two class folders directly. Class names are the
sorted subfolder names; files are found recursively and hidden files (``.DS_Store``) are
ignored. Unreadable files are skipped and counted (``data.skip_corrupt: true``, the default)
or rejected with the file named.

Recipe example::

    data: {name: image_folder, root: data/flowers, image_size: [64, 64], grayscale: false}
"""
import logging
import os

import numpy as np

from ..errors import UserError
from .base import DATASETS, SourceData, stratified_split
from .images import assemble, decode_all, parse_image_size

__all__ = ["load_image_folder", "find_classes", "list_images"]
_LOGGER = logging.getLogger(__name__)

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")
_VAL_NAMES = ("val", "test")


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
        ``skip_corrupt``.
    seed : int
        Seed of the stratified split when there is no val folder.

    Returns
    -------
    SourceData
        Channels and size already as the config asks.
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

    images, names, tagged, bad = decode_all(
        ((p, (lab, side), p) for p, lab, side in items), _read_image, cfg.skip_corrupt, what,
        "Remove or replace the file.")
    labels = np.array([lab for lab, _ in tagged], np.int32)
    is_val = np.array([side == "val" for _, side in tagged], bool)
    for side, mask, folder in (("train", ~is_val, train_dir), ("val", is_val, val_dir)):
        if side == "val" and not val_dir:
            continue
        present = set(labels[mask].tolist())
        missing = [c for i, c in enumerate(classes) if i not in present]
        if missing:
            raise UserError(f"{what}: class folder {os.path.join(folder, missing[0])} has no "
                            f"readable images ({len(bad)} unreadable file(s) were skipped). "
                            f"Add images to it or remove the folder.")

    x = assemble(images, names, cfg.grayscale, parse_image_size(cfg.image_size), what)
    if val_dir:
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        where = train_dir
    else:
        tr, va = stratified_split(labels, cfg.val_split, seed)
        where = f"{train_dir} (stratified split, seed {seed})"
    return SourceData(x_train=x[tr], y_train=labels[tr], x_val=x[va], y_val=labels[va],
                      class_names=list(classes), skipped=len(bad),
                      source=f"image_folder: {len(tr)} images from {where}")
