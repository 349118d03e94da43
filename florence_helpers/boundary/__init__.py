"""The boundary: the one way in and the one way out.

``inputs`` (limits and checks for everything from outside: sizes, pixels, deadlines, settings,
local paths), ``fetching`` (URLs under the address policy and one deadline), ``images`` (any
image source as an upright RGB image), ``file_structure`` (TIFF directories, PNG chunks, GIF
blocks and EXIF data checked before Pillow walks them), ``outputs`` (files written without
overwriting inputs, whole or not at all).

Layer 0: imports nothing from the rest of the package.
"""
