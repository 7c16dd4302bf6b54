"""Which device and dtype a run uses: one GPU per process (pinned before CUDA starts), fp32 on CPU, and
whether 4-bit can run here."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from pipeline.core.outputs import PipelineError

log = logging.getLogger("pipeline")

# One GPU per process: (the device index asked for, the CUDA_VISIBLE_DEVICES this process was pinned to).
_PINNED_GPU: Optional[tuple] = None


def resolve_device(device: str) -> torch.device:
    """`auto` (a GPU when there is one, else the CPU), `cpu`, `cuda` (the first visible GPU) or `cuda:N`.

    A CUDA run is pinned to its one GPU by setting CUDA_VISIBLE_DEVICES before CUDA is first used: the Trainer
    places the model on cuda:0 whatever the arguments say, and with several GPUs visible it would wrap the model in
    DataParallel (another effective batch size, other results). So device=cuda:1 makes physical GPU 1 (the second
    entry of an existing CUDA_VISIBLE_DEVICES) this process's only GPU, which it calls cuda.
    """
    if device == "cpu" or not (device == "auto" or device == "cuda" or device.startswith("cuda:")):
        return torch.device(device)
    if device == "auto" and torch.cuda.device_count() == 0:  # counts via NVML where it can: CUDA stays uninitialised
        return torch.device("cpu")
    index = device.partition(":")[2] if device.startswith("cuda:") else "0"
    if not index.isdigit():
        raise PipelineError(f"device={device}: use auto, cpu, cuda or cuda:N (N = the GPU's index)")
    return _pin_gpu(int(index), device)


def _pin_gpu(index: int, device: str) -> torch.device:
    global _PINNED_GPU
    if _PINNED_GPU is not None:
        if _PINNED_GPU[0] != index:
            raise PipelineError(f"device={device}: this process already trains on GPU {_PINNED_GPU[0]} "
                                f"(CUDA_VISIBLE_DEVICES={_PINNED_GPU[1]}); one GPU per process")
        return torch.device("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()  # the GPUs CUDA_VISIBLE_DEVICES lets through, counted without starting CUDA
    if count == 0:
        raise PipelineError(f"device={device} but CUDA is not available on this machine (use device=cpu or auto)")
    if index >= count:
        raise PipelineError(f"device={device}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1}"
                            + (f", CUDA_VISIBLE_DEVICES={visible})" if visible else ")"))
    entries = [v.strip() for v in visible.split(",")] if visible else None
    pinned = entries[index] if entries and index < len(entries) else str(index)
    os.environ["CUDA_VISIBLE_DEVICES"] = pinned
    if not torch.cuda.is_available():
        raise PipelineError(f"device={device} but CUDA is not available on this machine (use device=cpu or auto)")
    torch.cuda.init()
    if torch.cuda.device_count() != 1:  # CUDA had read CUDA_VISIBLE_DEVICES already: the pin came too late
        raise PipelineError(f"device={device}: CUDA was initialised in this process before the GPU could be chosen; "
                            f"start the run with CUDA_VISIBLE_DEVICES={pinned} and device=cuda")
    _PINNED_GPU = (index, pinned)
    if pinned != visible:
        log.info("device=%s: this process uses only GPU %s (CUDA_VISIBLE_DEVICES=%s), which it calls cuda:0", device,
                 pinned, pinned)
    return torch.device("cuda")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 matmuls are ~4x slower there) and bf16 on a GPU that supports it."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise PipelineError(f"model.dtype={dtype!r} is not one of auto, {', '.join(table)}")
    if device.type == "cpu" and table[dtype] != torch.float32:
        log.warning("model.dtype=%s on CPU: training in float32 instead (half precision is slow and lossy on CPU)",
                    dtype)
        return torch.float32
    return table[dtype]


def check_4bit_support(device: torch.device) -> None:
    """model.load_in_4bit needs bitsandbytes and a 4-bit kernel for `device`: try one tiny nf4 round trip first, so
    a machine that cannot run it fails with one line before any training, not deep inside a model load."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PipelineError("model.load_in_4bit=true needs bitsandbytes: pip install bitsandbytes (or the [gpu] "
                            "extra)") from None
    try:
        q, state = bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        bnb.functional.dequantize_4bit(q, state)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot run 4-bit on this device"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PipelineError(f"model.load_in_4bit=true: bitsandbytes {bnb.__version__} cannot run 4-bit (nf4) on "
                            f"{device} here ({first}); set model.load_in_4bit=false") from None
