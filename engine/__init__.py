"""histocluster engine: slide reading, tiling, encoders, feature stores, clustering, export.

Headless on purpose: nothing here imports Qt or napari.
"""

__version__ = "0.1.0"
