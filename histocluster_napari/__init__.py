"""napari plugin of histocluster: a thin GUI over the ``engine`` package."""
