"""engine.fetch_weights: cache location, a download from a local file:// URL, and clean offline failure.

Nothing here touches the internet: the success path downloads a checkpoint written by the test
through a file:// URL, and the failure paths use a port that refuses connections.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from engine import cli
from engine.errors import HistoclusterError
from engine.fetch_weights import (
    FILENAME,
    RELEASE_URL,
    FetchConfig,
    cached_weights_path,
    default_cache_dir,
    fetch_weights,
    main,
    run,
)

torch.set_num_threads(1)

REFUSED = "http://127.0.0.1:9/" + FILENAME  # the discard port: connection refused at once


def test_release_url_is_the_papers_file() -> None:
    assert RELEASE_URL == (
        "https://github.com/ozanciga/self-supervised-histopathology/releases/download/"
        "nativetenpercent/pytorchnative_tenpercent_resnet18.ckpt"
    )
    assert RELEASE_URL.endswith("/" + FILENAME)


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HISTOCLUSTER_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "histocluster"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "histocluster"
    monkeypatch.setenv("HISTOCLUSTER_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert cached_weights_path() == tmp_path / "env" / FILENAME
    parse = lambda argv: cli.parse_config(FetchConfig, argv)  # noqa: E731
    assert parse([]).cache() == tmp_path / "env"
    assert parse(["--cache-dir", str(tmp_path / "flag")]).cache() == tmp_path / "flag"


@pytest.fixture()
def ciga_file(tmp_path: Path) -> Path:
    """A small checkpoint in the released layout (model.resnet.* + projection head), on local disk."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None)
    state = {
        f"model.resnet.{k}": v for k, v in model.state_dict().items() if not k.startswith("fc.")
    }
    state["model.resnet.fc.1.weight"] = torch.zeros(512, 512)
    state["model.resnet.fc.1.bias"] = torch.zeros(512)
    state["model.resnet.fc.3.weight"] = torch.zeros(128, 512)
    state["model.resnet.fc.3.bias"] = torch.zeros(128)
    src = tmp_path / "release" / FILENAME
    src.parent.mkdir()
    torch.save({"state_dict": state}, src)
    return src


def test_download_from_file_url_then_cached(tmp_path: Path, ciga_file: Path, capsys) -> None:
    cache = tmp_path / "cache"
    url = ciga_file.as_uri()
    stages: list[tuple[str, int, int]] = []
    dest = fetch_weights(url, cache, progress=lambda *a: stages.append(a))
    assert stages[0] == (f"download {FILENAME}", 0, ciga_file.stat().st_size)
    assert stages[-1][1] == stages[-1][2] == ciga_file.stat().st_size
    assert dest == cache / FILENAME
    assert dest.read_bytes() == ciga_file.read_bytes()
    assert not list(cache.glob("*.part"))

    ciga_file.unlink()  # the cached copy is used; nothing is fetched again
    assert fetch_weights(url, cache) == dest
    with pytest.raises(HistoclusterError):
        fetch_weights(url, cache, force=True)
    assert dest.is_file()  # a failed --force download leaves the cached file alone


def test_cli_downloads_verifies_and_records(tmp_path: Path, ciga_file: Path, capsys) -> None:
    cache = tmp_path / "cache"
    assert main(["--url", ciga_file.as_uri(), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert str(cache / FILENAME) in out and "loads as a resnet18 encoder" in out
    record = json.loads((cache / (FILENAME + ".json")).read_text())
    assert record["url"] == ciga_file.as_uri() and record["bytes"] == ciga_file.stat().st_size
    assert len(record["sha256"]) == 64


def test_cli_rejects_a_file_that_is_not_an_encoder(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src" / FILENAME
    src.parent.mkdir()
    src.write_bytes(b"<html>rate limited</html>")
    assert main(["--url", src.as_uri(), "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a readable" in err


def test_offline_fails_with_one_line(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(HistoclusterError) as e:
        fetch_weights(REFUSED, cache, timeout_s=5)
    message = str(e.value)
    assert "\n" not in message and "cannot download" in message and "internet" in message
    assert not list(cache.glob("*"))  # no partial file left behind

    assert main(["--url", REFUSED, "--cache-dir", str(cache), "--timeout", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {REFUSED}: cannot download")
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_default_url_offline_via_refusing_proxy(tmp_path: Path) -> None:
    """The real command on the real release URL, through a proxy that refuses: never downloads."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HISTOCLUSTER_CACHE": str(tmp_path / "cache"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "engine.fetch_weights", "--timeout", "5"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {RELEASE_URL}: cannot download")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert str(tmp_path / "cache" / FILENAME) in proc.stderr


def test_help_documents_every_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "engine.fetch_weights", "--help"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    for flag in (
        "--cache-dir",
        "--url",
        "--timeout",
        "--force",
        "--no-verify",
        "--quiet",
        "--list",
    ):
        assert flag in proc.stdout


def test_list_prints_the_registry_and_what_is_cached(
    tmp_path: Path, ciga_file: Path, capsys
) -> None:
    assert main(["--list", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    for name in ("ciga-resnet18", "uni", "uni2-h", "virchow2", "h-optimus-0", "phikon", "sample"):
        assert name in lines
    assert "2560" in lines["virchow2"] and "gated, not cached" in lines["virchow2"]
    assert "Apache-2.0" in lines["h-optimus-0"] and "not cached" in lines["ciga-resnet18"]
    run(FetchConfig(url=ciga_file.as_uri(), cache_dir=str(tmp_path / "c"), no_verify=True))
    assert main(["--list", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "cached" in capsys.readouterr().out.splitlines()[2]


def test_unknown_name_and_gated_offline_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert main(["nonsense", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "uni, uni2-h" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["uni", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf:MahmoodLab/UNI" in err
    assert "--encoder uni:/path/to/pytorch_model.bin" in err
