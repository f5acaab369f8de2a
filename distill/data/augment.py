"""Per-image training augmentations over float ``(H, W, C)`` numpy images in [0, 1].

Each function takes one image and a ``numpy.random.RandomState`` and returns a new float32
``(H, W, C)`` image; nothing here reads files or logs. :class:`distill.data.stream.StreamedImages`
calls them per image with a generator seeded from ``(seed, record id)``, so an image's
augmentation does not depend on which thread decoded it.

The definitions follow MXNet's ``mx.image`` augmenters, which GluonCV's ImageNet recipe uses
(``transforms.RandomResizedCrop``, ``RandomColorJitter``, ``RandomLighting``;
``ImageRecordIter(random_resized_crop=True, brightness=..., pca_noise=...)``):

- :func:`random_resized_crop`: ``mx.image.random_size_crop`` — up to 10 tries of an area
  uniform in ``[min_area, 1]`` of the image and a log-uniform aspect ratio in [3/4, 4/3];
  otherwise MXNet's centre crop; then a bilinear resize to ``size``;
- :func:`color_jitter`: ``mx.image.ColorJitterAug`` — brightness, contrast and saturation, each
  with ``alpha = 1 + U(-jitter, jitter)``, in a random order; contrast and saturation mix in the
  luma (0.299, 0.587, 0.114);
- :func:`lighting`: ``mx.image.LightingAug`` — AlexNet's PCA noise (Krizhevsky et al., 2012),
  ``alpha ~ N(0, pca_noise)`` over the ImageNet eigenvalues/eigenvectors (0–255 scale, so
  divided by 255 here);
- :func:`pad_crop`: the ``crop`` of :func:`distill.trainer.augment_batch` for one image —
  reflect-pad by 1/8 of each side and crop back at a random offset;
- :func:`hflip`: a left-right flip with probability 1/2.

MXNet works on uint8 and saturates; here the colour steps clip to [0, 1], the same thing on
this scale. On a one-channel image saturation and lighting do nothing (they are defined on RGB).
"""
import logging

import cv2
import numpy as np

__all__ = ["random_resized_crop_box", "random_resized_crop", "center_crop_box", "resize_hwc",
           "hflip", "pad_crop", "color_jitter", "lighting", "IMAGENET_EIGVAL", "IMAGENET_EIGVEC"]
_LOGGER = logging.getLogger(__name__)

# mx.image.CreateAugmenter / GluonCV transforms.RandomLighting (0-255 scale)
IMAGENET_EIGVAL = np.array([55.46, 4.794, 1.148])
IMAGENET_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                            [-0.5808, -0.0045, -0.8140],
                            [-0.5836, -0.6948, 0.4203]])
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def resize_hwc(img, size):
    """Bilinear resize of ``(H, W, C)`` to ``size = (H, W)``, keeping the channel axis."""
    if tuple(img.shape[:2]) == tuple(size):
        return img
    out = cv2.resize(np.ascontiguousarray(img), (int(size[1]), int(size[0])),
                     interpolation=cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


def center_crop_box(h, w, size):
    """``(y0, x0, ch, cw)`` of MXNet's ``center_crop``: ``size`` (H, W), scaled down to fit."""
    ch, cw = float(size[0]), float(size[1])
    if h < ch:                                    # mx.image.scale_down
        cw, ch = cw * h / ch, h
    if w < cw:
        cw, ch = w, ch * w / cw
    ch, cw = int(ch), int(cw)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop_box(h, w, rng, min_area=0.08, ratio=(3.0 / 4.0, 4.0 / 3.0), size=None):
    """The crop ``(y0, x0, ch, cw)`` of ``mx.image.random_size_crop`` on an ``h × w`` image.

    Ten tries of ``area ~ U(min_area, 1) · h·w`` and ``log(aspect) ~ U(log 3/4, log 4/3)``; the
    first that fits is taken at a uniform offset. When none fits: MXNet's centre crop of
    ``size`` (H, W; the whole image when None).
    """
    area = h * w
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = rng.uniform(min_area, 1.0) * area
        aspect = np.exp(rng.uniform(*log_ratio))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = rng.randint(0, w - cw + 1)       # random.randint is inclusive of both ends
            y0 = rng.randint(0, h - ch + 1)
            return y0, x0, ch, cw
    return center_crop_box(h, w, size or (h, w))


def random_resized_crop(img, size, rng, min_area=0.08, ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """Crop ``(H, W, C)`` by :func:`random_resized_crop_box`, then bilinear-resize to ``size``."""
    y0, x0, ch, cw = random_resized_crop_box(img.shape[0], img.shape[1], rng, min_area, ratio, size)
    return resize_hwc(img[y0:y0 + ch, x0:x0 + cw], size)


def hflip(img, rng):
    """Flip ``(H, W, C)`` left-right with probability 1/2."""
    return img[:, ::-1] if rng.rand() < 0.5 else img


def pad_crop(img, rng):
    """Reflect-pad ``(H, W, C)`` by ``max(1, H // 8)``/``max(1, W // 8)`` and crop back at a
    uniform offset (``crop`` of :func:`distill.trainer.augment_batch`, per image)."""
    h, w = img.shape[:2]
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = np.pad(img, ((ph, ph), (pw, pw), (0, 0)), mode="reflect")
    dy, dx = rng.randint(0, 2 * ph + 1), rng.randint(0, 2 * pw + 1)
    return padded[dy:dy + h, dx:dx + w]


def _gray(img):
    return img[:, :, :1] if img.shape[2] == 1 else (img[:, :, :3] @ _LUMA)[:, :, None]


def color_jitter(img, rng, brightness=0.4, contrast=0.4, saturation=0.4):
    """Brightness, contrast and saturation jitter in a random order (``mx.image.ColorJitterAug``).

    Parameters
    ----------
    img : np.ndarray
        float ``(H, W, C)`` in [0, 1], C = 1 or 3.
    rng : np.random.RandomState
    brightness, contrast, saturation : float
        Each factor is ``1 + U(-v, v)``; 0 leaves that step out (as MXNet does).

    Returns
    -------
    np.ndarray
        float32 ``(H, W, C)``, clipped to [0, 1].
    """
    x = img.astype(np.float32, copy=True)
    steps = [(k, v) for k, v in (("b", brightness), ("c", contrast), ("s", saturation)) if v > 0]
    for i in rng.permutation(len(steps)):
        kind, v = steps[i]
        alpha = np.float32(1.0 + rng.uniform(-v, v))
        if kind == "b":
            x *= alpha
        elif kind == "c":
            x = x * alpha + np.float32(1.0 - alpha) * np.float32(_gray(x).mean())
        elif x.shape[2] == 3:                          # saturation: RGB only
            x = x * alpha + np.float32(1.0 - alpha) * _gray(x)
    return np.clip(x, 0.0, 1.0, out=x)


def lighting(img, rng, alphastd=0.1, eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC):
    """AlexNet PCA lighting noise (``mx.image.LightingAug``) on an RGB ``(H, W, 3)`` in [0, 1].

    ``alpha ~ N(0, alphastd)`` per eigenvector; the RGB offset ``(eigvec · alpha) @ eigval`` is in
    0–255 units, so it is divided by 255. A one-channel image is returned unchanged.
    """
    if img.shape[2] != 3 or alphastd <= 0:
        return img
    alpha = rng.normal(0, alphastd, size=(3,))
    rgb = np.dot(eigvec * alpha, eigval) / 255.0
    return np.clip(img + rgb.astype(np.float32), 0.0, 1.0).astype(np.float32)
