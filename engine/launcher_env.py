"""What a launcher (torchrun) tells each process through its environment, read without torch.

``engine.distributed`` reads the ranks from it when it joins the process group; ``engine.extract``
asks only whether several processes were launched, before it imports torch.
"""

from __future__ import annotations

import os


def env_int(name: str, default: int) -> int:
    """The integer in environment variable ``name``, or ``default`` when it is unset or empty."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when unset or not an
    integer: joining the process group then names the bad value)."""
    try:
        return env_int("WORLD_SIZE", 1)
    except ValueError:
        return 1
