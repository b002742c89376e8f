"""The photos the visualisations use: scikit-image's bundled images (no downloads) or a user's file."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED", "load_image"]

#: Names accepted by ``--image``: scikit-image's bundled photos (``skimage.data``), all shipped in its wheel.
BUNDLED = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry")


def _skimage_data():
    try:
        import skimage.data
    except ImportError as err:
        raise ValueError(
            "the bundled photos need scikit-image: pip install 'visattn[viz]' (or give an image file)"
        ) from err
    return skimage.data


def load_image(source: str | Path):
    """An (H, W, 3) uint8 RGB array: a bundled photo by name (:data:`BUNDLED`) or any image file PIL reads.

    ValueError naming the file, or listing the bundled names, when it cannot be read.
    """
    import numpy as np

    text = str(source)
    if text in BUNDLED and not Path(text).exists():
        img = np.asarray(getattr(_skimage_data(), text)())
    else:
        path = Path(text)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ValueError(
                f"image {text!r} {what}; give an image file or one of the bundled photos: {', '.join(BUNDLED)}"
            )
        from PIL import Image

        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as err:  # noqa: BLE001 - any unreadable file: one error naming it
            raise ValueError(
                f"image {text!r} cannot be read as an image ({type(err).__name__}); give a PNG, JPEG or other "
                "file PIL reads"
            ) from err
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)
