"""napari plugin of histocluster: a thin GUI over the ``engine`` package.

Importing it has no side effects; the widget keeps Triton out of the GUI process (see
``histocluster_napari._triton_guard``).
"""
