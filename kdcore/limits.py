"""Limits on what one sample may be: larger inputs are refused before they are read or decoded (a light
module, so configs can name the defaults without importing numpy or Pillow)."""

DEFAULT_MAX_PIXELS = 64_000_000  # decoded size: larger images are refused as decompression bombs
DEFAULT_MAX_BYTES = 64 << 20  # stored size: larger files, tar members and Parquet cells are refused unread
