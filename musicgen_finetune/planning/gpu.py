"""What a GPU runs and holds that a trace on the CPU does not show by itself, stated explicitly:

- the attention kernel: a GPU's flash / memory-efficient SDPA keeps the output and one fp32 log-sum-exp per query
  for backward, never the S x S attention matrix. torch's own choice on the CPU depends on the call (its math
  path, which stores every S x S matrix, ~12 GiB per 30 s sample in the shared notes' probe, is taken with a mask,
  dropout or an unsupported layout), so the trace calls torch's CPU flash-attention kernel explicitly: it saves
  exactly what the GPU's does;
- CUDA autocast's casting rules where CPU autocast differs (CUDA runs layer_norm, group_norm, softmax and
  log_softmax in fp32, CPU autocast keeps them in bf16);
- what the card holds beyond the tensors (named constants below): cuBLAS workspaces, the flash backward's
  accumulator, the caching allocator's reserve over what is allocated, the CUDA context;
- which GPU: the visible one, `MUSICGEN_FT_GPU_MEM_GIB` (tests, or a card that is not this machine's), or an
  RTX 4090 (24 GB, the card the presets are made for).
"""

import contextlib
import dataclasses
import os
import typing as tp
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..bench.flops import gpu_peak_tflops
from ..bench.matrix import PROCESS_BASE_GIB
from ..errors import UserError
from ..machine import GIB, meminfo_gib

# -- what a GPU holds beyond the traced tensors --------------------------------------------------------------------

# cuBLAS workspace per handle, from torch's caching allocator (CUDABlas.cpp `getChosenWorkspaceSize`: the
# default CUBLAS_WORKSPACE_CONFIG is :4096:8 = 32 MiB on Hopper, :4096:2:16:8 = 8.1 MiB on older cards; the larger
# is assumed), one handle for the forward's thread and one for autograd's device thread.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
CUBLAS_HANDLES = 2
# FlashAttention-2's backward accumulates dQ in fp32 (dq_accum, B x S x H x head_dim) for the layer it is in.
FLASH_BACKWARD_ACCUMULATOR_BYTES_PER_ELEMENT = 4
# The caching allocator reserves more than it hands out (blocks rounded to 2 MiB segments, split and cached free
# blocks): max_memory_reserved over max_memory_allocated, assumed 10% for a transformer's training step until a
# GPU's `make bench` measures it (its plan rows print both).
ALLOCATOR_RESERVE_FRACTION = 0.10
# The CUDA context (driver state, lazily loaded kernels of torch, cuBLAS, cuDNN), outside the allocator: what
# nvidia-smi shows in addition to max_memory_reserved.
CUDA_CONTEXT_GIB = 0.5
# `optim.grad_accum_steps: auto` keeps this share of the card free: other processes, a display, variation between
# batches (caption lengths).
FIT_MARGIN = 0.05
# The card a plan is for when no GPU is visible and none is named: the presets' target.
DEFAULT_GPU_NAME = "NVIDIA GeForce RTX 4090"
DEFAULT_GPU_MEM_GIB = 24.0
GPU_MEM_ENV = "MUSICGEN_FT_GPU_MEM_GIB"  # the training device's memory, for tests and for planning another card


class GpuMemoryError(UserError, ValueError):
    """GPU_MEM / MUSICGEN_FT_GPU_MEM_GIB is not a positive number."""


@dataclasses.dataclass(frozen=True)
class Device:
    """The device a plan is for: its memory budget and dense bf16 peak (for times)."""

    kind: str  # cuda | cpu
    name: str
    memory_gib: float
    peak_tflops: tp.Optional[float]
    source: str  # where the memory figure comes from, for the log

    def describe(self) -> str:
        return f"{self.name}, {self.memory_gib:.1f} GiB ({self.source})"


def memory_override() -> tp.Optional[float]:
    text = os.environ.get(GPU_MEM_ENV)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise GpuMemoryError(f"{GPU_MEM_ENV}={text}: must be the device's memory in GiB, a number > 0 (e.g. 12).")
    return value


def training_device(kind: str, memory_gib: tp.Optional[float] = None, name: tp.Optional[str] = None) -> Device:
    """The device a run of `kind` (its config's `device`) trains on: its memory from `memory_gib`, else
    MUSICGEN_FT_GPU_MEM_GIB, else the visible GPU (or, for a CPU run, the RAM available now), else an RTX 4090.
    `name` picks the card whose peak FLOP/s the times use (default: the visible GPU's, else an RTX 4090's)."""
    if memory_gib is not None and not memory_gib > 0:
        raise GpuMemoryError(f"GPU_MEM={memory_gib:g}: must be the GPU's memory in GiB, a number > 0 (e.g. 24).")
    override = memory_gib if memory_gib is not None else memory_override()
    source = "given" if memory_gib is not None else f"{GPU_MEM_ENV}" if override is not None else ""
    if kind == "cpu":
        available = meminfo_gib("MemAvailable") or 0.0
        return Device("cpu", "CPU", override if override is not None else available, None, source or "RAM available")
    visible = torch.cuda.is_available()
    index = torch.cuda.current_device() if visible else 0
    gpu_name = name or (torch.cuda.get_device_name(index) if visible else DEFAULT_GPU_NAME)
    if override is None:
        if visible and not name:
            override, source = torch.cuda.get_device_properties(index).total_memory / GIB, "visible GPU"
        else:
            override, source = DEFAULT_GPU_MEM_GIB, "no GPU visible: the presets' 24 GB card"
    return Device("cuda", gpu_name, override, gpu_peak_tflops(gpu_name), source)


def device_extras_bytes(kind: str, micro_batch: int, positions: int, dim: int) -> int:
    """Allocated on a GPU besides the traced tensors: cuBLAS workspaces and flash attention's backward
    accumulator (one layer at a time). None on the CPU."""
    if kind != "cuda":
        return 0
    accumulator = micro_batch * positions * dim * FLASH_BACKWARD_ACCUMULATOR_BYTES_PER_ELEMENT
    return CUBLAS_WORKSPACE_BYTES * CUBLAS_HANDLES + accumulator


def device_total_gib(kind: str, allocated_gib: float) -> float:
    """What the device must hold for a peak of `allocated_gib` allocated: on a GPU the allocator's reserve and the
    CUDA context; on the CPU the process's interpreter and libraries."""
    if kind != "cuda":
        return allocated_gib + PROCESS_BASE_GIB
    return allocated_gib * (1 + ALLOCATOR_RESERVE_FRACTION) + CUDA_CONTEXT_GIB


def fits(total_gib: float, device: Device) -> bool:
    return total_gib <= device.memory_gib * (1 - FIT_MARGIN)


# -- what a GPU runs ---------------------------------------------------------------------------------------------


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as a GPU runs AudioCraft's call (modules/transformer.py:413, no mask, causal
    or not): a fused kernel that saves the output and the log-sum-exp, here torch's CPU flash kernel
    (`_scaled_dot_product_flash_attention_for_cpu`, with an autograd formula and a fake-tensor rule)."""
    if attn_mask is not None or enable_gqa:
        raise NotImplementedError("the plan models AudioCraft's SDPA call: no attention mask, no GQA")
    if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's lower-precision list, on CUDA as on the CPU
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale
    )[0]


# Functions CUDA autocast runs in fp32 (autocast_mode.cpp, AT_FORALL_FP32 / AT_FORALL_FP32_SET_OPT_DTYPE) that CPU
# autocast leaves in the low-precision dtype of their input.
CUDA_FP32_FUNCTIONS = (
    F.layer_norm,
    F.group_norm,
    F.softmax,
    F.log_softmax,
    torch.layer_norm,
    torch.group_norm,
    torch.softmax,
    torch.log_softmax,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
)


class CudaAutocastRules(TorchFunctionMode):
    """Under CPU autocast, the functions of CUDA_FP32_FUNCTIONS get fp32 inputs, as CUDA autocast gives them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CUDA_FP32_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            args = tuple(
                a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a
                for a in args
            )
        return func(*args, **kwargs)


@contextlib.contextmanager
def gpu_kernels(kind: str) -> tp.Iterator[None]:
    """Inside: attention as a GPU's fused kernel, and, for a CUDA run, CUDA autocast's fp32 rules."""
    with mock.patch.object(F, "scaled_dot_product_attention", flash_attention):
        if kind == "cuda":
            with CudaAutocastRules():
                yield
        else:
            yield
