"""Pretrained loading in the model library: strictness that names the key, the head for another
class count, another image size, what files may hold, the reference layout written back, and the
depths that layer-wise learning-rate decay groups by."""

from __future__ import annotations

import argparse
import io

import pytest
import torch

import vitae
from vitae.pretrained import IncompatibleCheckpoint, fit_state_dict, read_checkpoint, reference_checkpoint


def test_a_published_layout_at_224_px_and_1000_classes_initialises_a_small_10_class_model():
    published = vitae.create_model("vitae_t")
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in published.state_dict().items()}, "epoch": 300}
    model = vitae.create_model("vitae_t", num_classes=10, img_size=32)
    report = vitae.load_pretrained(model, checkpoint)
    assert report.head_replaced and report.checkpoint_classes == 1000
    assert report.replaced == ["head.weight", "head.bias"] and report.loaded_keys == 262
    theirs = published.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    assert model.head.weight.shape == (10, 256)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"layers.2.NC.0.mlp.fc1.weight": torch.zeros(3, 3)}),
     r"key layers.2.NC.0.mlp.fc1.weight has shape \[3, 3\] in the checkpoint, \[512, 256\] in the model"),
    (lambda s: s.update({"layers.9.NC.0.norm1.weight": torch.zeros(3)}),
     "key layers.9.NC.0.norm1.weight of the checkpoint is not in the model"),
    (lambda s: [s.pop(k) for k in ("layers.0.RC.attn.w", "layers.1.RC.attn.w")],
     r"key layers.0.RC.attn.w is missing from the checkpoint \(and 1 more\)"),
])
def test_a_key_that_does_not_fit_is_named(change, message):
    state = vitae.create_model("vitae_t", num_classes=10, img_size=32).state_dict()
    change(state)
    with torch.device("meta"):
        target = vitae.create_model("vitae_t", num_classes=10, img_size=32)
    with pytest.raises(IncompatibleCheckpoint, match=message):
        fit_state_dict({"model": state}, target)


def test_position_embeddings_are_resampled_and_reported_with_a_new_head():
    source = vitae.create_model("vitae_b", img_size=64, depth=1)
    with torch.device("meta"):
        target = vitae.create_model("vitae_b", img_size=32, depth=1, num_classes=5)
    state, report = fit_state_dict(source.state_dict(), target)
    assert report.resampled == ["layers.0.RC.pos_embed"] and report.head_replaced
    assert state["layers.0.RC.pos_embed"].shape == (1, 5, 768) and "head.weight" not in state


def test_files_hold_tensors_and_argparse_arguments_only(tmp_path):
    weights = reference_checkpoint(vitae.create_model("vitae_t", img_size=32, depth=1))
    torch.save({**weights, "args": argparse.Namespace(model="vitae_t", lr=5e-4)}, tmp_path / "timm.pth")
    assert read_checkpoint(tmp_path / "timm.pth")["args"].model == "vitae_t"
    torch.save({**weights, "hook": print}, tmp_path / "code.pth")
    with pytest.raises(Exception, match="Weights only load failed"):
        read_checkpoint(tmp_path / "code.pth")


def test_the_reference_layout_written_back_has_the_reference_keys_and_reads_back():
    reference = torch.load("tests/fixtures/reference_logits.pt", weights_only=True)["vitae_t"]["keys_shapes"]
    model = vitae.create_model("vitae_t", num_classes=1000, img_size=32).eval()
    buffer = io.BytesIO()
    torch.save(reference_checkpoint(model), buffer)
    written = read_checkpoint(io.BytesIO(buffer.getvalue()))
    assert list(written) == ["model"]
    assert {k: tuple(v.shape) for k, v in written["model"].items()} == {k: tuple(s) for k, s in reference.items()}
    copy = vitae.create_model("vitae_t", num_classes=1000, img_size=32).eval()
    assert not vitae.load_pretrained(copy, written).head_replaced
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("name, kwargs, cells", [
    # v1: the three reduction cells (the first is the embedding), then the normal cells
    ("vitae_t", {"depth": 2}, ["layers.0.RC", "layers.1.RC", "layers.2.RC", "layers.2.NC.0", "layers.2.NC.1"]),
    # isotropic: the patch embedding cell (stages 1-2 have no parameters), then the normal cells
    ("vitae_b", {"depth": 2, "img_size": 32}, ["layers.0.RC", "layers.2.NC.0", "layers.2.NC.1"]),
    # v2: each stage's reduction cell, then its normal cells
    ("vitaev2_s", {"depth": 1}, ["layers.0.RC", "layers.0.NC.0", "layers.0.NC.1", "layers.1.RC", "layers.1.NC.0",
                                 "layers.1.NC.1", "layers.2.RC", "layers.2.NC.0", "layers.3.RC", "layers.3.NC.0",
                                 "layers.3.NC.1"]),
])
def test_layer_ids_count_cells_in_forward_order_with_the_head_last(name, kwargs, cells):
    with torch.device("meta"):
        model = vitae.create_model(name, **kwargs)
    ids, top = model.layer_ids()
    assert top == len(cells)
    for name_, depth in ids.items():
        if name_.startswith(("head.", "fc_norm.")):
            assert depth == top, name_
        else:
            assert name_.startswith(cells[depth] + "."), (name_, depth)
    assert {ids[n] for n in ids} == set(range(top + 1))
