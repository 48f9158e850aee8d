"""Generated datasets with known answers for the evaluation-suite tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the machine's cores are shared, and OpenMP threads that spin
    waiting for a busy core make small convolutions several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: class name -> mean RGB; far apart so colour alone separates the classes
COLOURS = {"blue": (60, 70, 200), "green": (60, 190, 80), "red": (200, 60, 60)}


def write_colour_folder(
    root: Path, per_class: int, px: int = 32, seed: int = 0, colours=COLOURS
) -> Path:
    """ImageFolder ``root/<colour>/<i>.png``: noisy patches whose mean colour is the class."""
    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 25, size=(px, px, 3))
            img = np.clip(np.asarray(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 colour classes x 40 images of 32 px."""
    return write_colour_folder(tmp_path_factory.mktemp("colours") / "data", per_class=40)


@pytest.fixture(scope="session")
def random_encoder():
    """The real ``resnet18-random`` encoder (seeded), to be fed 32 px images."""
    from engine.models import load_encoder

    return load_encoder("resnet18-random")
