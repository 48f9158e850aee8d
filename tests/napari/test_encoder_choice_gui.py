"""The widget's encoder combo (real viewer, Xvfb): registry names with dim, licence and weights
state, "file…" through the file dialog, and specs set from code (a store's encoder)."""

from __future__ import annotations

import pytest

from engine.encoders import REGISTRY, weights_path
from engine.models import default_encoder_spec
from histocluster_napari import _encoder_choice
from histocluster_napari._encoder_choice import FILE
from histocluster_napari._widget import HistoClusterWidget

pytestmark = pytest.mark.gui


def test_encoder_combo_lists_the_registry_and_takes_a_file(
    make_napari_viewer, qtbot, isolated_cache, tmp_path, monkeypatch
):
    present = weights_path(REGISTRY["uni"])
    present.parent.mkdir(parents=True)
    present.write_bytes(b"weights")
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    combo = widget.encoder
    labels = {data: text for text, data in combo.choices_with_labels()}
    assert list(labels)[: len(REGISTRY)] == list(REGISTRY) and list(labels)[-1] == FILE
    assert labels["uni"] == "uni — 1024-d, CC-BY-NC-ND-4.0, gated, weights present"
    assert labels["virchow2"].endswith("weights not downloaded")
    assert "2560-d" in labels["virchow2"]
    assert combo.value == default_encoder_spec() == widget.encoder_spec()
    combo.value = "uni"
    assert "CC-BY-NC-ND-4.0" in combo.tooltip and str(present) in combo.tooltip
    combo.value = "resnet18-random"
    assert widget.encoder_spec() == "resnet18-random"
    # "file…": the dialog's answer becomes the value; cancelling it goes back.
    ckpt = tmp_path / "encoder.pt"
    ckpt.write_bytes(b"x")
    answers = iter([(str(ckpt), ""), ("", "")])
    monkeypatch.setattr(
        _encoder_choice.QFileDialog, "getOpenFileName", lambda *a, **k: next(answers)
    )
    combo.value = FILE
    assert widget.encoder_spec() == "resnet18-random"  # while the dialog is open
    qtbot.waitUntil(lambda: combo.value == str(ckpt))
    assert widget.encoder_spec() == str(ckpt)
    assert labels.keys() <= {d for _, d in combo.choices_with_labels()}
    combo.value = FILE
    qtbot.waitUntil(lambda: combo.current_choice != FILE)
    assert combo.value == str(ckpt)
    # A spec from code (a store's encoder, name:path) gets its own item.
    combo.value = f"lunit-dino-vits16:{ckpt}"
    assert combo.value == f"lunit-dino-vits16:{ckpt}"
    assert "lunit-dino-vits16 — 384-d, weights from encoder.pt" in [
        t for t, _ in combo.choices_with_labels()
    ]


def test_the_encoder_list_is_narrow_closed_and_shows_whole_labels_open(qtbot):
    combo = _encoder_choice.EncoderChoice(label="encoder", value="resnet18-random")
    box = combo.native
    qtbot.addWidget(box)
    metrics = box.view().fontMetrics()
    texts = [box.itemText(i) for i in range(box.count())]
    widest = max(metrics.horizontalAdvance(t) for t in texts)
    assert box.minimumSizeHint().width() < widest  # it does not make the dock that wide
    box.resize(300, box.sizeHint().height())
    box.show()
    box.showPopup()
    qtbot.wait(50)
    assert box.view().viewport().width() >= widest  # each label whole in the open list
    box.hidePopup()
