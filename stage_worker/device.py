"""The worker's device, probed once at start-up (kept out of WorkerConfig, which stays plain data)."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str) -> str:
    """"auto": cuda:0 when a GPU is present, else cpu; anything else as given."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def gpu_name(device: str) -> str:
    """The CUDA device's name (a shipped kernel tuning file's key, kernels/tuning.py); "" elsewhere."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(torch.device(device))


def free_memory_bytes(device: str) -> int:
    """Free memory the worker reports at registration: the GPU's, or the host's available pages."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
