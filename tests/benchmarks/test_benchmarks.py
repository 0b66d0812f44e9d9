"""The fast parts of the benchmarks (the benchmarks themselves are run by hand, see README.md):
the GPU-readiness script on a machine without a GPU and its MFU arithmetic on the CPU, and the
plain training loop of the training-step benchmark with the per-phase step timing it reads, and
the transfer benchmark's loading of its pretrained arm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_readiness import measure_mfu, peak_flops
from benchmarks.train_step import PHASES, plain_loop
from pipelines.training.config import TrainConfig
from tests.support.train_helpers import make_shapes_folder, prepare_dataset, tiny_config
from vitae.flops import model_stats

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def test_gpu_readiness_without_a_gpu_says_so_and_exits_cleanly():
    completed = subprocess.run([sys.executable, "-m", "benchmarks.gpu_readiness"], cwd=REPO, capture_output=True,
                               text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "gpu_readiness: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure"]
    assert "Traceback" not in completed.stderr


def test_mfu_is_images_per_s_times_training_flops_over_the_peak():
    peak = 1e12
    result = measure_mfu("vitae_t", img_size=32, batch_size=2, steps=1, warmup=0, device="cpu", compile=False,
                         channels_last=False, peak=peak)
    forward_flops = model_stats("vitae_t", img_size=32, num_classes=1000)["gmacs"] * 2e9
    assert result["train_flops_per_image"] == pytest.approx(3 * forward_flops, rel=1e-12)
    assert result["images_per_s"] > 0
    assert result["achieved_flops"] == pytest.approx(result["images_per_s"] * 3 * forward_flops)
    assert result["mfu"] == pytest.approx(result["images_per_s"] * 3 * forward_flops / peak)


@pytest.mark.parametrize("device_name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("Some Future GPU", None),
])
def test_peak_flops_by_device_name(device_name, tflops):
    assert peak_flops(device_name) == (tflops and tflops * 1e12)


def test_plain_loop_reports_where_the_step_time_goes(tmp_path):
    data_url = prepare_dataset(str(make_shapes_folder(tmp_path / "shapes", per_class=40)), str(tmp_path / "data"),
                               shard_max_samples=50)
    config = TrainConfig.model_validate(tiny_config("plain", data_url, str(tmp_path / "runs"),
                                                    data={"batch_size": 16, "loader_workers": 0},
                                                    schedule={"epochs": 2}))
    torch.set_num_threads(1)
    history = plain_loop(config)
    assert [epoch["epoch"] for epoch in history] == [1, 2]
    for epoch in history:
        phases_ms = [epoch[phase] for phase in PHASES]
        step_ms = 1000 * config.data.batch_size / epoch["images_per_s"]
        assert all(ms > 0 for ms in phases_ms), epoch
        assert sum(phases_ms) <= step_ms  # the phases are parts of a step; the rest is bookkeeping
        assert sum(phases_ms) > 0.8 * step_ms
    assert history[1]["step"] == 2 * history[0]["step"] > 0  # one optimiser step per batch


def test_transfer_fine_tunes_both_arms_from_the_same_fresh_head(tmp_path):
    """The transfer benchmark's pieces: the pretrained arm takes every non-head tensor of the
    checkpoint through `model.pretrained`'s path and keeps the run's own fresh head."""
    from benchmarks.transfer import load_keeping_the_head, run_config
    from pipelines.training.initial_weights import read_initial_weights
    from pipelines.training.worker import build_model
    from vitae.pretrained import reference_checkpoint

    torch.manual_seed(0)
    source = build_model(run_config("source", 2, 8, 1e-3), 5)
    with torch.no_grad():
        for value in source.parameters():
            value.add_(1.0)  # unlike any fresh initialisation
    path = tmp_path / "source.pth"
    torch.save(reference_checkpoint(source), path)
    config = run_config("target", 2, 8, 1e-3, pretrained=str(path))
    torch.manual_seed(1)
    model = build_model(config, 5)
    fresh = {key: value.clone() for key, value in model.state_dict().items()}
    load_keeping_the_head(model, read_initial_weights(config, 5))
    for key, value in model.state_dict().items():
        expected = fresh[key] if key.startswith("head.") else source.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
