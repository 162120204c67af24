"""The name of the device a result was measured on, as results and reports record it."""
from __future__ import annotations

import platform

import torch


def device_name(device: torch.device | str) -> str:
    """The GPU's name on CUDA (``torch.cuda.get_device_name``), else ``cpu (<processor>)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"
