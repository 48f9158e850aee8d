"""Package data of histocluster: the synthetic sample slide and the sample encoder.

Installed as ``histocluster_sample_data`` (see ``pyproject.toml``); find the files with
``engine.sample_data.sample_slide_path()`` and ``sample_encoder_path()``, never by a path
beside the checkout. ``make_sample_slide.py`` regenerates the slide and its mask.
"""
