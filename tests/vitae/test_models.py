"""The model library against the reference implementation: its parameter counts (the table in
docs/models.md) and its outputs (tests/fixtures/make_reference_logits.py)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from torch import nn

import vitae
from pipelines.cli import main as cli_main
from tests.support.reference_weights import deterministic_state_dict
from vitae.cells import PerformerBlock, ReductionCell
from vitae.flops import model_stats
from vitae.layers import drop_path_rates
from vitae.pretrained import IncompatibleCheckpoint

SPEC_PARAMS = {  # (total, trainable) of the reference implementation's models, as docs/models.md lists them
    "vitae_t": (4_886_888, 4_882_792), "vitae_6m": (6_614_120, None), "vitae_13m": (10_834_728, None),
    "vitae_s": (24_032_136, 24_009_096), "vitae_b": (89_341_672, None), "vitae_l": (311_724_008, None),
    "vitae_h": (644_528_360, None), "vitaev2_s": (19_355_688, None), "vitaev2_48m": (48_674_632, None),
    "vitaev2_b": (89_693_352, None),
}
V1 = ["vitae_t", "vitae_6m", "vitae_13m", "vitae_s"]
ISOTROPIC = ["vitae_b", "vitae_l", "vitae_h"]
V2 = ["vitaev2_s", "vitaev2_48m", "vitaev2_b"]


@pytest.fixture(scope="module")
def reference():
    return torch.load("tests/fixtures/reference_logits.pt", weights_only=True)


def test_registry_lists_every_family():
    assert vitae.list_models() == V1 + ISOTROPIC + V2
    assert vitae.list_models("vitaev2_*") == V2
    with pytest.raises(ValueError, match="unknown model 'vitae_x'.*vitae_t"):
        vitae.create_model("vitae_x")


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_parameter_counts_match_spec(name):
    total, trainable = SPEC_PARAMS[name]
    stats = model_stats(name)
    assert stats["params"] == total
    if trainable is not None:
        assert stats["trainable_params"] == trainable


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_state_dict_matches_reference_keys_and_shapes(name, reference):
    with torch.device("meta"):
        state = vitae.create_model(name).state_dict()
    expected = {key: tuple(shape) for key, shape in reference[name]["keys_shapes"].items()}
    assert {key: tuple(t.shape) for key, t in state.items()} == expected


@pytest.mark.parametrize("name, count", [("vitae_t", 264), ("vitae_s", 460), ("vitaev2_s", 532)])
def test_state_dict_key_counts_and_names(name, count):
    keys = set(vitae.create_model(name).state_dict())
    assert len(keys) == count
    if name.startswith("vitae_"):
        assert {"layers.0.RC.PCM.0.weight", "layers.0.RC.PCM.2.weight", "layers.0.RC.PCM.3.running_var",
                "layers.0.RC.PCM.5.weight", "layers.0.RC.PRM.convs.3.0.bias", "layers.1.RC.PRM.convs.2.0.weight",
                "layers.0.RC.attn.w", "layers.0.RC.attn.kqv.weight", "layers.0.RC.attn.proj.bias",
                "layers.0.RC.attn.norm1.weight", "layers.0.RC.attn.norm2.bias", "layers.0.RC.attn.mlp.0.weight",
                "layers.0.RC.attn.mlp.2.bias", "layers.2.RC.PRM.convs.1.0.weight", "layers.2.NC.0.norm1.weight",
                "layers.2.NC.0.attn.qkv.bias", "layers.2.NC.0.attn.proj.weight", "layers.2.NC.0.mlp.fc1.weight",
                "layers.2.NC.0.mlp.fc2.bias", "layers.2.NC.0.PCM.0.weight", "layers.2.NC.0.PCM.1.running_mean",
                "layers.2.NC.0.PCM.4.weight", "layers.2.NC.0.PCM.6.weight", "head.weight"} <= keys
        assert not any(key.startswith("layers.2.RC.PCM") or key.startswith("layers.2.RC.attn") for key in keys)
    else:
        assert {"layers.0.RC.attn.norm1.weight", "layers.0.RC.attn.attn.qkv.bias", "layers.0.RC.attn.attn.proj.weight",
                "layers.0.RC.attn.attn.relative_position_index", "layers.0.RC.attn.norm2.weight",
                "layers.0.RC.attn.mlp.fc1.weight", "layers.0.RC.attn.mlp.fc2.bias", "layers.2.RC.attn.attn.qkv.weight",
                "layers.0.NC.0.attn.qkv.weight", "layers.0.NC.0.attn.relative_position_index",
                "layers.3.NC.1.PCM.6.bias", "head.bias"} <= keys
        assert "layers.2.RC.attn.attn.qkv.bias" not in keys
        assert not any("attn_mask" in key for key in keys)


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_outputs_match_reference_implementation(name, reference):
    """Weights filled deterministically by key; logits computed by the reference code (fixture)."""
    entry = reference[name]
    model = vitae.create_model(name).eval()
    report = vitae.load_pretrained(model, {"state_dict": deterministic_state_dict(model.state_dict(),
                                                                                  seed=entry["weights_seed"])})
    assert report.loaded_keys == entry["num_keys"] and not report.head_replaced
    images = torch.randn(entry["batch"], 3, 224, 224, generator=torch.Generator().manual_seed(entry["input_seed"]))
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits, entry["logits"], atol=2e-5, rtol=1e-5)


def test_layer_norm_eps_follow_reference():
    for name in ("vitae_t", "vitaev2_s", "vitae_b"):
        model = vitae.create_model(name, img_size=64 if name == "vitaev2_s" else 32)
        for module_name, module in model.named_modules():
            if isinstance(module, nn.LayerNorm):
                expected = 1e-5 if ".RC." in f".{module_name}" else 1e-6
                assert module.eps == expected, module_name


@pytest.mark.parametrize("name", list(SPEC_PARAMS))
def test_forward_shapes_at_224(name):
    with torch.device("meta"):
        model = vitae.create_model(name, num_classes=7).eval()
        images = torch.empty(2, 3, 224, 224)
        assert model(images).shape == (2, 7)
        assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize("name", V1 + ISOTROPIC)
@pytest.mark.parametrize("img_size", [32, 64])
def test_v1_and_isotropic_run_on_small_images(name, img_size):
    device = "meta" if name in ("vitae_l", "vitae_h") else "cpu"  # their weights alone are 1-2.5 GB
    with torch.device(device):
        model = vitae.create_model(name, num_classes=10, img_size=img_size).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, img_size, img_size))
    assert logits.shape == (2, 10)
    tokens = (img_size // 16) ** 2 + (1 if name in ISOTROPIC else 0)
    assert model.forward_features(torch.zeros(1, 3, img_size, img_size, device=device)).shape[1] == tokens
    if device == "cpu":
        assert torch.isfinite(logits).all()


def test_v2_built_for_64px():
    model = vitae.create_model("vitaev2_s", num_classes=10, img_size=64).eval()
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 4, 512)  # 64 / 32 = 2x2 tokens; windows padded 2->7 and cropped
    with pytest.raises(ValueError, match="divisible by 32"):
        vitae.create_model("vitaev2_s", img_size=48)


def test_image_size_validation():
    with pytest.raises(ValueError, match="divisible by 16"):
        vitae.create_model("vitae_t", img_size=40)


def test_depth_and_mlp_ratio_overrides():
    tiny = vitae.create_model("vitae_t", img_size=32, depth=3, mlp_ratio=3.0)
    cells = tiny.layers[2].NC
    assert len(cells) == 3
    assert cells[0].mlp.fc1.out_features == 768 and cells[0].PCM[0].out_channels == 768
    v2 = vitae.create_model("vitaev2_s", img_size=64, depth=4, mlp_ratio=2.0)
    assert [len(stage.NC) for stage in v2.layers] == [2, 2, 4, 2]
    assert all(cell.mlp.fc1.out_features == 2 * cell.mlp.fc1.in_features for stage in v2.layers for cell in stage.NC)
    assert all(stage.RC.attn.mlp.fc1.out_features == stage.RC.attn.mlp.fc1.in_features for stage in v2.layers)
    with torch.device("meta"):
        iso = vitae.create_model("vitae_b", img_size=32, depth=5)
    assert [len(stage.NC) for stage in iso.layers] == [0, 0, 5]
    with pytest.raises(ValueError, match="mlp_ratio=2.1"):
        vitae.create_model("vitae_t", mlp_ratio=2.1)  # 537 hidden channels cannot form 64 groups


def test_drop_path_schedule_keeps_reference_start_index():
    depths = (2, 2, 8, 2)
    rates = torch.linspace(0, 0.1, 14).tolist()
    reference = drop_path_rates(depths, 0.1)
    assert reference[2] == rates[2:10] and reference[3] == rates[8:10]
    cumulative = drop_path_rates(depths, 0.1, cumulative=True)
    assert cumulative[2] == rates[4:12] and cumulative[3][-1] == pytest.approx(0.1)
    model = vitae.create_model("vitaev2_s", img_size=64, drop_path_rate=0.1)
    assert model.layers[2].NC[0].drop_path.drop_prob == pytest.approx(rates[2])


@pytest.mark.parametrize("name, img_size", [("vitae_t", 32), ("vitaev2_s", 64), ("vitae_b", 32)])
def test_gradients_reach_every_trainable_parameter(name, img_size):
    torch.manual_seed(0)
    model = vitae.create_model(name, num_classes=10, img_size=img_size, drop_path_rate=0.1).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, img_size, img_size)), torch.arange(4))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(n.endswith(".attn.w") for n in frozen) and (frozen or name != "vitae_t")


@pytest.mark.parametrize("name, img_size", [("vitae_t", 64), ("vitaev2_s", 64), ("vitae_b", 32)])
def test_bf16_autocast_is_finite_and_close(name, img_size):
    torch.manual_seed(0)
    model = vitae.create_model(name, num_classes=10, img_size=img_size).eval()
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(images)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max() + 0.05


def test_performer_features_stay_float32_under_autocast(monkeypatch):
    seen = []
    original = PerformerBlock.random_features

    def spy(self, x):
        out = original(self, x)
        seen.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(PerformerBlock, "random_features", spy)
    model = vitae.create_model("vitae_t", img_size=32).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 32, 32))
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)


@pytest.mark.parametrize("name, img_size", [("vitae_t", 64), ("vitaev2_s", 64), ("vitae_b", 32)])
def test_fused_and_explicit_attention_agree(name, img_size):
    model = vitae.create_model(name, img_size=img_size).eval()
    images = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        fused = model(images)
        assert vitae.set_fused_attn(model, False) > 0
        explicit = model(images)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-4)


def test_channels_last_and_compile_capture_whole_graph():
    model = vitae.create_model("vitae_t", num_classes=10, img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        channels_last = model.to(memory_format=torch.channels_last)(images.to(memory_format=torch.channels_last))
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    torch.testing.assert_close(channels_last, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = vitae.create_model("vitaev2_s", num_classes=10, img_size=64).train()
    images = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(images).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.set_grad_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert vitae.create_model("vitae_b", img_size=32).no_weight_decay() == {"layers.0.RC.cls_token",
                                                                           "layers.0.RC.pos_embed"}


def _save_reference_layout(model: nn.Module, path, wrapper: str) -> None:
    torch.save({wrapper: {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 300}, path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_pretrained_round_trips_reference_layout(tmp_path, wrapper):
    source = vitae.create_model("vitae_t", img_size=32).eval()
    _save_reference_layout(source, tmp_path / "ckpt.pth", wrapper)
    target = vitae.create_model("vitae_t", img_size=32).eval()
    report = vitae.load_pretrained(target, tmp_path / "ckpt.pth")
    assert report.loaded_keys == 264 and not report.head_replaced
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_load_pretrained_swaps_head_and_reports_it(tmp_path, caplog):
    source = vitae.create_model("vitaev2_s", img_size=64)
    _save_reference_layout(source, tmp_path / "ckpt.pth", "model")
    target = vitae.create_model("vitaev2_s", img_size=64, num_classes=10)
    with caplog.at_level(logging.WARNING):
        report = vitae.load_pretrained(target, tmp_path / "ckpt.pth")
    assert report.head_replaced and report.checkpoint_classes == 1000
    assert "1000 classes, model has 10" in caplog.text
    assert target.head.weight.shape == (10, 512)
    torch.testing.assert_close(target.layers[3].NC[1].mlp.fc2.weight, source.layers[3].NC[1].mlp.fc2.weight)


def test_load_pretrained_rejects_foreign_weights():
    model = vitae.create_model("vitae_t", img_size=32)
    state = model.state_dict()
    state.pop("layers.2.NC.0.attn.qkv.bias")
    with pytest.raises(IncompatibleCheckpoint, match="key layers.2.NC.0.attn.qkv.bias is missing"):
        vitae.load_pretrained(model, {"model": state})


def test_load_pretrained_resamples_position_embedding():
    source = vitae.create_model("vitae_b", img_size=64, depth=1)
    target = vitae.create_model("vitae_b", img_size=32, depth=1)
    report = vitae.load_pretrained(target, source.state_dict())
    assert report.resampled == ["layers.0.RC.pos_embed"]
    assert target.layers[0].RC.pos_embed.shape == (1, 5, 768)
    torch.testing.assert_close(target.layers[0].RC.pos_embed[:, 0], source.layers[0].RC.pos_embed[:, 0])


def test_article_api_constructors_and_behaviour():
    signature = inspect.signature(vitae.ViTAETransformer)
    assert {k: v.default for k, v in signature.parameters.items()} == dict(
        img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12,
        mlp_ratio=4.0, qkv_bias=True)
    model = vitae.ViTAETransformer(img_size=32, num_classes=5, embed_dim=64, depth=2, num_heads=4).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 5)
    assert model.pos_embed.shape == (1, 4, 64) and model.cls_token.shape == (1, 1, 64)
    assert isinstance(model.blocks[0].attn, vitae.EfficientAttention) and model.blocks[0].attn.qkv.bias is not None

    block = vitae.ViTAEBlock(64, num_heads=4)
    assert block.attn.qkv.bias is None and block.mlp.fc1.out_features == 256
    reduction = vitae.ReductionModule(64, reduction_ratio=4)
    assert [type(m) for m in reduction.reduction] == [nn.Linear, nn.GELU, nn.Linear]
    assert reduction.reduction[0].out_features == 16 and reduction(torch.randn(2, 9, 64)).shape == (2, 9, 64)


def test_efficient_attention_uses_sdpa_and_matches_explicit(monkeypatch):
    calls = []
    sdpa = nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    efficient = vitae.EfficientAttention(64, num_heads=4, qkv_bias=True)
    explicit = vitae.MultiHeadAttention(64, num_heads=4, qkv_bias=True)
    explicit.load_state_dict(efficient.state_dict())
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(efficient(x), explicit(x), atol=1e-5, rtol=1e-4)
    assert len(calls) == 1


def test_reduction_cell_skip_connection_comes_from_pcm_and_mlp():
    cell = vitae.create_model("vitae_t", img_size=32).layers[0].RC
    assert isinstance(cell, ReductionCell) and cell.attn.w.requires_grad is False
    assert cell.attn.w.shape == (32, 64)


def test_models_command_prints_every_model(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name, (total, _) in SPEC_PARAMS.items():
        assert f"{name} " in out and f"{total:,}" in out
