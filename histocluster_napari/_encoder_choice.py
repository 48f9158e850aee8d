"""The widget's encoder input: a combo of ``engine.encoders`` registry names plus "file…".

Each registry entry is listed with its output dimension, licence and whether its weights are
present (``engine.encoders.weights_path``); "file…" opens a file dialog for a checkpoint, and any
other spec (a path, ``name:path``, ``resnet18-random``) set from code is added as its own item. The
widget's value is the spec text ``engine.models.load_encoder`` takes, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFileDialog

from engine.encoders import REGISTRY, EncoderEntry, weights_path

FILE = "file…"
"""The item that asks for a checkpoint file."""
RANDOM_SPEC = "resnet18-random"
ENCODER_FILTER = "Encoder checkpoints (*.pt *.pth *.ckpt *.tar *.bin *.safetensors);;All files (*)"


def weights_state(e: EncoderEntry) -> str:
    """``present`` / ``not downloaded`` / ``built in`` (nothing to download, or torchvision's own)."""
    path = weights_path(e)
    if path is None:
        return "built in" if e.family != "torchvision" else "torchvision download"
    return "present" if path.is_file() else "not downloaded"


def entry_label(e: EncoderEntry) -> str:
    licence = e.licence.split(" (")[0].split(";")[0]
    gated = ", gated" if e.gated else ""
    return f"{e.name} — {e.dim}-d, {licence}{gated}, weights {weights_state(e)}"


def entry_tooltip(e: EncoderEntry) -> str:
    path = weights_path(e)
    where = f"\nweights: {path} ({weights_state(e)})" if path else f"\nweights: {weights_state(e)}"
    fetch = (
        f"\nfetch: python -m engine.fetch_weights {e.name}, or pass {e.name}:/path/to/file"
        if path and not path.is_file()
        else ""
    )
    mpp = f", trained at {e.mpp:g} um/px" if e.mpp else ""
    return (
        f"{e.name}: {e.arch}, {e.dim}-d ({e.embedding}), {e.input_px} px input{mpp}\n"
        f"licence: {e.licence}"
        + (" (gated: needs your Hugging Face token)" if e.gated else "")
        + where
        + fetch
    )


class EncoderChoice(ComboBox):
    """Registry names (with dim, licence, weights) + the specs used + "file…"; value = spec text."""

    def __init__(self, value: str, **kwargs: Any) -> None:
        self._extra: list[str] = []
        super().__init__(choices=self._choices, **kwargs)
        # as wide as the dock gives it (its longest label, ~530 px, made the dock that wide);
        # Qt's open list is as wide as its longest label still
        self.native.setSizeAdjustPolicy(
            QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.native.setMinimumContentsLength(24)
        self.value = value
        self.changed.connect(self._on_changed)

    def _choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        items = [(entry_label(e), name) for name, e in REGISTRY.items()]
        items.append((f"{RANDOM_SPEC} — 512-d, random weights (tests)", RANDOM_SPEC))
        known = {data for _, data in items}
        items += [(_spec_label(s), s) for s in self._extra if s not in known]
        return [*items, (FILE, FILE)]

    @property
    def value(self) -> str:  # type: ignore[override]
        """The spec chosen (while the file dialog is open: the one before "file…")."""
        value = str(ComboBox.value.fget(self))  # type: ignore[attr-defined]
        return self._last if value == FILE and hasattr(self, "_last") else value

    @value.setter
    def value(self, spec: str | Path) -> None:
        spec = str(spec).strip()
        if spec and spec not in [d for _, d in self._choices()]:
            self._extra.append(spec)
            self.reset_choices()
        ComboBox.value.fset(self, spec)  # type: ignore[attr-defined]
        if spec != FILE:
            self._last = spec
        self._update_tooltip()

    def choices_with_labels(self) -> list[tuple[str, str]]:
        """(text shown, spec) of every item, "file…" last."""
        return self._choices()

    def choose_file(self, path: str | Path | None) -> None:
        """What choosing a file in the dialog does (None: the dialog was cancelled)."""
        self.value = str(path) if path else self._last

    def _on_changed(self, value: str) -> None:
        if value == FILE:
            QTimer.singleShot(0, self._ask_file)
            return
        self._last = value
        self._update_tooltip()

    def _ask_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.native, "Encoder checkpoint", "", ENCODER_FILTER)
        self.choose_file(path or None)

    def _update_tooltip(self) -> None:
        spec = str(ComboBox.value.fget(self))  # type: ignore[attr-defined]
        e = REGISTRY.get(spec.split(":", 1)[0].lower())
        if e is not None:
            self.tooltip = entry_tooltip(e)
        else:
            self.tooltip = (
                f"{spec}: a checkpoint file load_encoder accepts (engine.pretrain's encoder.pt, "
                "the paper's ResNet-18, a torchvision state_dict), or a registry name"
            )


def _spec_label(spec: str) -> str:
    name, _, path = spec.partition(":")
    if path and name.lower() in REGISTRY:
        e = REGISTRY[name.lower()]
        return f"{e.name} — {e.dim}-d, weights from {Path(path).name}"
    return f"file: {Path(spec).name}" if Path(spec).suffix else spec
