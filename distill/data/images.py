"""Pixel helpers shared by the loaders: channel conversion, bilinear resize, the evaluation
geometry (``data.val_resize``), and turning a list of decoded images of any size into one
``(N, C, H, W)`` float32 array. The streamed datasets (:mod:`distill.data.stream`) call the same
functions per image, so their pixels are bit-identical to the in-memory path.
"""
import logging

import cv2
import numpy as np

from ..errors import UserError

__all__ = ["parse_image_size", "target_channels", "to_channels", "resize", "eval_resize",
           "as_unit", "conform", "assemble", "decode_all"]
_LOGGER = logging.getLogger(__name__)

# ITU-R 601-2 luma, the weights Pillow's ``convert("L")`` uses.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def parse_image_size(image_size):
    """``data.image_size`` (int, ``[s]`` or ``[H, W]``, or None) as ``(H, W)`` or None."""
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    sizes = list(image_size)
    return (int(sizes[0]), int(sizes[-1]))


def target_channels(grayscale, all_gray):
    """1 or 3 from ``data.grayscale`` (True/False/None); None means "1 if every image is gray"."""
    if grayscale is None:
        return 1 if all_gray else 3
    return 1 if grayscale else 3


def to_channels(x, channels):
    """Convert a float ``(C, H, W)`` image to ``channels`` (1 ↔ 3; RGB → gray by luma)."""
    c = x.shape[0]
    if c == channels:
        return x
    if channels == 1:
        return np.tensordot(_LUMA, x[:3], axes=1)[None].astype(np.float32)
    return np.repeat(x[:1], channels, axis=0)


def resize(x, size):
    """Bilinear resize of a float ``(C, H, W)`` image to ``size = (H, W)`` (no-op if equal)."""
    if size is None or tuple(x.shape[1:]) == tuple(size):
        return x
    hwc = np.ascontiguousarray(x.transpose(1, 2, 0))
    out = cv2.resize(hwc, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if out.ndim == 2:                     # cv2 drops a single channel axis
        out = out[:, :, None]
    return out.transpose(2, 0, 1)


def eval_resize(x, size, val_resize=None):
    """The evaluation geometry of a float ``(C, H, W)`` image.

    ``val_resize`` None: :func:`resize` to ``size``. Otherwise GluonCV's ImageNet evaluation
    (``transforms.Resize(val_resize, keep_ratio=True)`` then ``CenterCrop(size)``): the shorter
    side bilinear-resized to ``val_resize`` (``mx.image.resize_short``), then MXNet's centre crop
    of ``size`` (scaled down to fit when the image is smaller, then resized to ``size``).
    """
    if val_resize is None or size is None:
        return resize(x, size)
    from .augment import center_crop_box
    h, w = x.shape[1:]
    short = (val_resize * h // w, val_resize) if h > w else (val_resize, val_resize * w // h)
    x = resize(x, short)
    y0, x0, ch, cw = center_crop_box(short[0], short[1], size)
    return resize(np.ascontiguousarray(x[:, y0:y0 + ch, x0:x0 + cw]), size)


def conform(x, channels, size):
    """Apply :func:`to_channels` and :func:`resize` to a batch ``(N, C, H, W)``.

    Returns a new float32 C-contiguous array, or ``x`` itself when nothing changes. A streamed
    ``x`` (:class:`~distill.data.stream.StreamedImages`) gets a view that converts while it
    decodes.
    """
    if getattr(x, "is_streamed", False):
        return x.with_spec(channels=channels, size=tuple(size) if size is not None else None)
    n, c, h, w = x.shape
    size = tuple(size) if size is not None else (h, w)
    if c == channels and (h, w) == size:
        return x
    out = np.empty((n, channels) + size, np.float32)
    for i in range(n):
        out[i] = resize(to_channels(x[i], channels), size)
    return out


def as_unit(img):
    """A decoded ``(H, W)`` or ``(H, W, C)`` integer/float image as float32 ``(C, H, W)`` in [0, 1]."""
    # a contiguous (C, H, W) result makes every later step faster; one float32 pass
    img = img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    if np.issubdtype(img.dtype, np.integer):
        out = np.empty(img.shape, np.float32)
        np.divide(img, float(np.iinfo(img.dtype).max), out=out, dtype=np.float32)
    else:
        out = np.clip(img.astype(np.float32), 0.0, 1.0)
    return out


def assemble(images, names, grayscale, image_size, what, val_resize=None):
    """Stack decoded images into one float32 ``(N, C, H, W)`` array in [0, 1].

    Parameters
    ----------
    images : list of np.ndarray
        Each ``(H, W)`` (gray) or ``(H, W, 3)`` (RGB), uint8/uint16 or float in [0, 1].
    names : list of str
        A name per image (file path, record key) used in error messages.
    grayscale : bool or None
        ``data.grayscale``: True → 1 channel, False → 3, None → 1 if every image is gray.
    image_size : tuple of int or None
        ``(H, W)`` to resize to; None requires every image to have the same size.
    what : str
        Dataset name for messages.
    val_resize : int or None
        ``data.val_resize``: the evaluation geometry of :func:`eval_resize` instead of a plain
        resize (needs ``image_size``).

    Returns
    -------
    x : np.ndarray
        float32 ``(N, C, H, W)``.
    """
    if not images:
        raise ValueError("assemble() needs at least one image")
    channels = target_channels(grayscale, all(im.ndim == 2 for im in images))
    size = image_size
    if size is None:
        size = images[0].shape[:2]
        for im, name in zip(images, names):
            if im.shape[:2] != size:
                raise UserError(
                    f"{what}: images have different sizes ({names[0]} is {size[0]}×{size[1]}, "
                    f"{name} is {im.shape[0]}×{im.shape[1]}, height×width) and `data.image_size` "
                    f"is not set: set `data.image_size` to an integer or [height, width] so every "
                    f"image is resized to it.")
    out = np.empty((len(images), channels) + tuple(size), np.float32)
    for i, im in enumerate(images):
        out[i] = eval_resize(to_channels(as_unit(im), channels), size, val_resize)
    return out


def decode_all(items, decode, skip_corrupt, what, fix):
    """Decode every item, skipping (and counting) or rejecting the unreadable ones.

    Parameters
    ----------
    items : iterable of (name, label, payload)
        ``decode(payload)`` returns an image array or raises any exception / returns None.
    decode : callable
    skip_corrupt : bool
        ``data.skip_corrupt``.
    what : str
        Dataset name for messages.
    fix : str
        What the user can do about a bad item (appended to the error).

    Returns
    -------
    images, names, labels, bad : lists
        Decoded images with their names and labels; ``bad`` holds the names skipped.
    """
    images, names, labels, bad = [], [], [], []
    for name, label, payload in items:
        try:
            img = decode(payload)
            err = None if img is not None else "not a decodable image"
        except Exception as e:    # any decoder failure means "unreadable" here  # noqa: BLE001
            img, err = None, f"{type(e).__name__}: {e}"
        if img is None:
            if not skip_corrupt:
                raise UserError(f"{what}: cannot read {name} as an image ({err}). {fix} Or set "
                                f"`data.skip_corrupt: true` to skip unreadable images.")
            bad.append(name)
            continue
        images.append(img)
        names.append(name)
        labels.append(label)
    if bad:
        shown = ", ".join(str(b) for b in bad[:3]) + (", ..." if len(bad) > 3 else "")
        _LOGGER.warning("%s: skipped %d unreadable image(s) (data.skip_corrupt is true): %s",
                        what, len(bad), shown)
    return images, names, labels, bad
