"""Read and write images of every common kind, with clear errors and atomic writes.

Codecs, all maintained C libraries (no pixel is decoded in Python):

- 16-bit colour PNG (grey+alpha, RGB, RGBA) is read and written by ``imagecodecs`` (libpng).
- TIFF of grey or RGB(A) samples of 8 or 16 bits, uncompressed or LZW, PackBits, Deflate, zstd
  or LZMA, in strips or tiles, contiguous or planar, is read by ``tifffile`` with the codecs of
  ``imagecodecs`` (the first page of a multi-page file). Every TIFF is written by ``tifffile``:
  Deflate with the horizontal predictor.
- Everything else, including 8-bit PNG, 16-bit grey PNG and the other TIFFs (palette, CMYK,
  YCbCr, JPEG-compressed...), goes through Pillow, which has no 16-bit colour modes (it keeps
  only the high byte of 16-bit RGB PNGs).

Why imagecodecs + tifffile rather than OpenCV (the other maintained option): they return the
stored samples exactly (OpenCV returns BGR and turns grey+alpha into four channels), raise
exceptions that say what is wrong (``cv2.imdecode`` returns None), expose every TIFF tag (size,
layout, ICC profile, EXIF) before any pixel is decoded, and install at half the size. Both use
libpng, which refuses PNGs wider or taller than 1,000,000 pixels: 16-bit grey PNGs of that
shape are read by Pillow, 16-bit colour ones are refused with that reason.

Colour management is not applied: the stored sample values are returned as they are. The ICC
profile and the EXIF block are returned with the pixels (:attr:`Image.icc_profile`,
:attr:`Image.exif`) and written back by :func:`write_image` where the format holds them (PNG,
JPEG, TIFF, WebP). EXIF orientation is applied on reading, and the carried EXIF then says
"upright".

Modules: :mod:`~nlsr.io.image` (the :class:`Image` type, errors, extensions, pixel limit),
:mod:`~nlsr.io.reading` and :mod:`~nlsr.io.writing` (files: codec choice, orientation, atomic
writes), the codecs :mod:`~nlsr.io.png` (16-bit colour PNG), :mod:`~nlsr.io.tiff` and
:mod:`~nlsr.io.pillow` (the rest) with what they share in :mod:`~nlsr.io.codec`, and the ICC
and EXIF handling in :mod:`~nlsr.io.metadata`.
"""

from nlsr.io.codec import ZLIB_LEVEL
from nlsr.io.image import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Image,
    ImageReadError,
    ImageWriteError,
    default_max_pixels,
)
from nlsr.io.reading import read_image
from nlsr.io.writing import write_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ZLIB_LEVEL",
    "Image",
    "ImageReadError",
    "ImageWriteError",
    "default_max_pixels",
    "read_image",
    "write_image",
]
