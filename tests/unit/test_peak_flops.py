"""MFU's denominator: the dense bf16 peak is found by the device's exact name, as a pure function of that name
(no GPU needed), and an unknown device gets no MFU and one log note naming it."""

from __future__ import annotations

import logging

import pytest

from gptoss.train.metrics import peak_flops, peak_flops_of


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A40", 149.7),
    ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA H100 80GB HBM3", 989.4),  # SXM
    ("NVIDIA H100 PCIe", 756),  # not the SXM part's peak
    ("NVIDIA H200", 989.4),
    ("NVIDIA L40S", 362.05),
])
def test_known_devices_by_exact_name(name, tflops):
    assert peak_flops_of(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", [
    "NVIDIA RTX A4000",  # contains "A40"
    "NVIDIA RTX A4000 Laptop GPU",
    "NVIDIA A100X",  # contains "A100"
    "NVIDIA GeForce RTX 4090",
    "",
])
def test_lookalike_and_unknown_names_get_no_peak(name):
    assert peak_flops_of(name) is None


def test_unknown_device_is_noted(caplog):
    with caplog.at_level(logging.INFO, logger="gptoss.train.metrics"):
        assert peak_flops_of("NVIDIA RTX A4000") is None
        assert peak_flops_of("NVIDIA A40") == pytest.approx(149.7e12)
    notes = [r.getMessage() for r in caplog.records if r.name == "gptoss.train.metrics"]
    assert len(notes) == 1 and "'NVIDIA RTX A4000'" in notes[0] and "MFU is not reported" in notes[0]


def test_no_peak_without_cuda(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert peak_flops() is None


def test_the_cuda_device_name_is_what_is_looked_up(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert peak_flops() == pytest.approx(756e12)
