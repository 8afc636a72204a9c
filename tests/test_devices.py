"""Devices (apl.devices): names resolved and checked, the grid's worker list."""
from __future__ import annotations

import os

import pytest
import torch

from apl.devices import device_name, parse_devices, resolve_device


def test_devices_are_parsed_and_checked():
    cores = os.cpu_count() or 1
    assert parse_devices("cpu") == [("cpu", None)]
    assert parse_devices("cpu,cpu") == [("cpu", max(1, cores // 2))] * 2
    if not torch.cuda.is_available():
        assert parse_devices(None, "quick") == [("cpu", max(1, cores // 2))] * 2
        assert parse_devices("auto", "paper") == [("cpu", None)]
        with pytest.raises(ValueError, match="CUDA is not available"):
            parse_devices("cuda:0")
    with pytest.raises(ValueError, match="unknown device|must be"):
        parse_devices("gpu:0")
    with pytest.raises(ValueError, match="empty entry"):
        parse_devices("cpu,,cpu")


def test_resolve_device_and_its_name():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_name(torch.device("cpu"))
    with pytest.raises(ValueError, match="must be"):
        resolve_device("meta")
