"""The launcher's environment, read without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.launcher_env import env_int, launched_world_size


def test_env_int_reads_defaults_and_names_a_bad_value(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert env_int("RANK", 0) == 0
    monkeypatch.setenv("RANK", "")
    assert env_int("RANK", 3) == 3
    monkeypatch.setenv("RANK", "2")
    assert env_int("RANK", 0) == 2
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        env_int("RANK", 0)


def test_launched_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "four")  # left to joining the group to name
    assert launched_world_size() == 1
    monkeypatch.delenv("WORLD_SIZE")
    assert launched_world_size() == 1


def test_reading_it_imports_no_torch():
    code = "import sys, engine.launcher_env; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
