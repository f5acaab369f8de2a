"""int8 calibration images: one fixed, seeded sample of the train split, written for ncnn too.

The sample ``distill quantize`` calibrates MXNet's int8 model with also calibrates
onnxruntime's int8 model here and, written as PNG files with an image list, ncnn's
``ncnn2table`` on the device side. The PNGs hold the pixels before
``(x - mean) / std``; :func:`ncnn2table_args` gives the ``mean``/``norm`` that redo it inside
ncnn (``(pixel - mean) * norm`` with pixels in 0..255).
"""
import logging
import os

import numpy as np

__all__ = ["calibration_indices", "gather_images", "to_pixels", "write_calibration_images",
           "ncnn2table_args", "ncnn_int8_commands"]
_LOGGER = logging.getLogger(__name__)


# One sample for every int8 path: the MXNet, onnxruntime and ncnn int8 models calibrate on the
# same images (``quantization.calib_batches × calib_batch_size``, seeded by ``trainer.seed``).
from ..quantize.calibrators import calibration_indices, gather_images  # noqa: E402


def to_pixels(x, mean, std):
    """Undo ``(x - mean) / std``: float ``(C, H, W)`` → uint8 ``(H, W)`` gray or ``(H, W, C)`` RGB."""
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, np.float32).reshape(-1, 1, 1)
    p = np.clip(np.rint((x * s + m) * 255.0), 0, 255).astype(np.uint8)
    return p[0] if p.shape[0] == 1 else np.ascontiguousarray(p.transpose(1, 2, 0))


def write_calibration_images(x, indices, mean, std, folder, list_name="images.txt"):
    """Write ``x[indices]`` as PNGs under ``folder`` and a list file, one path per line
    (``x`` is read 32 images at a time: it may be a lazy array of streamed images).

    Paths in the list are relative to the parent of ``folder`` (the export folder): run
    ``ncnn2table`` from there. Returns the list file's path.
    """
    import cv2
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):           # a smaller sample than last time: no leftovers
        if f.endswith(".png"):
            os.unlink(os.path.join(folder, f))
    base = os.path.basename(os.path.normpath(folder))
    lines = []
    indices = np.asarray(indices, np.int64)
    for start in range(0, len(indices), 32):         # x may be streamed: a batch at a time
        batch = indices[start:start + 32]
        for i, xi in zip(batch, x[batch]):
            img = to_pixels(xi, mean, std)
            if img.ndim == 3:
                img = img[:, :, ::-1]          # cv2 writes BGR: the file then holds true RGB
            name = f"train_{int(i):06d}.png"
            cv2.imwrite(os.path.join(folder, name), img)
            lines.append(f"{base}/{name}")
    path = os.path.join(folder, list_name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def ncnn2table_args(mean, std, image_size, channels):
    """``mean=[..] norm=[..] shape=[w,h,c] pixel=..`` for ``ncnn2table`` on this model's input.

    ncnn computes ``(pixel - mean) * norm`` on 0..255 pixels; the model was trained on
    ``(pixel / 255 - m) / s``, so ``mean = 255 m`` and ``norm = 1 / (255 s)``.
    """
    fmt = lambda vs: "[" + ",".join(f"{v:.6g}" for v in vs) + "]"   # noqa: E731
    h, w = image_size
    return (f"mean={fmt([255.0 * m for m in mean])} norm={fmt([1.0 / (255.0 * s) for s in std])} "
            f"shape=[{w},{h},{channels}] pixel={'GRAY' if channels == 1 else 'RGB'}")


def ncnn_int8_commands(list_file, mean, std, image_size, channels, threads=4):
    """The two device-side commands (run in the export folder) that make an int8 ncnn model."""
    return [f"ncnn2table model.ncnn.param model.ncnn.bin {list_file} model.table "
            f"{ncnn2table_args(mean, std, image_size, channels)} thread={threads} method=kl",
            "ncnn2int8 model.ncnn.param model.ncnn.bin model-int8.ncnn.param model-int8.ncnn.bin "
            "model.table"]
