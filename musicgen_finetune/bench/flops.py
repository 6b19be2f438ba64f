"""Model FLOPs of a training step, and the model FLOP utilisation (MFU) against the GPU's dense bf16 peak."""

import dataclasses
import typing as tp

# -- FLOPs and model FLOP utilisation ----------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets, matched in this order as
# substrings of torch.cuda.get_device_name() (more specific names first: "A100" before "A10", "L40S" before "L4").
GPU_PEAK_TFLOPS: tp.Tuple[tp.Tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),  # also GH200
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),  # with fp32 accumulation, as autocast does (330 with fp16 accumulation)
)

FLOPS_FORMULA = (
    "Model FLOPs per step = (4·N + 2·N_wgrad) × positions + attention. N: the LM's weight matrices applied at "
    "each position (embedding lookups, norms and biases left out), counted on the B × S sequence positions the "
    "transformer runs (S = frames, after the codebook delay pattern; positions, not tokens: a frame's K codebook "
    "tokens share one position, so B × frames × K would count K times the FLOPs) except the text side (the T5 output "
    "projection and the cross-attention K/V projections), counted on the B × L caption tokens. 2·N for the "
    "forward, 2·N for the backward to the activations (it flows through frozen weights too), 2·N_wgrad for the "
    "weight gradients: N_wgrad = N in full fine-tuning, so 6·N; for LoRA, the adapters applied per position "
    "(LoRALinear out_proj) plus the fused q/k/v weights of adapted attention, since musicgen_finetune.lora adds "
    "B·A into that weight and autograd then computes the whole weight's gradient (B·A itself is once per step, "
    "not counted). Attention: 3 × B × layers × (2·S²·d for causal self-attention, QKᵀ and AV over the lower "
    "triangle, + 4·S·L·d for cross-attention), 3 for forward and backward. Activation recomputation "
    "(checkpointing), EnCodec and T5 are not model FLOPs. MFU = FLOPs per step / step time / the GPU's dense "
    "bf16 peak."
)


def gpu_peak_tflops(name: tp.Optional[str]) -> tp.Optional[float]:
    """The dense bf16 peak of a GPU from its torch.cuda.get_device_name(), or None if it is not in the table."""
    if not name:
        return None
    for key, tflops in GPU_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


@dataclasses.dataclass
class MatrixParams:
    """Weight-matrix parameters applied per position, split by side and by whether their gradient is computed."""

    sequence: int = 0
    sequence_wgrad: int = 0
    text: int = 0
    text_wgrad: int = 0


def training_flops(params: MatrixParams, batch: int, positions: int, text_tokens: int, layers: int, dim: int) -> float:
    """Model FLOPs of one training step (forward + backward), as FLOPS_FORMULA states."""
    matmuls = batch * (
        positions * (4 * params.sequence + 2 * params.sequence_wgrad)
        + text_tokens * (4 * params.text + 2 * params.text_wgrad)
    )
    attention = 3 * batch * layers * (2 * positions**2 * dim + 4 * positions * text_tokens * dim)
    return float(matmuls + attention)


def mfu(flops_per_step: float, step_s: float, peak_tflops: tp.Optional[float]) -> tp.Optional[float]:
    """Model FLOP utilisation: the share of the GPU's peak that the model's FLOPs used; None without a peak."""
    if not peak_tflops or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak_tflops * 1e12)


def matrix_params(lm) -> MatrixParams:
    """MatrixParams of a (possibly LoRA-injected) MusicGen LM, from its parameter names."""
    named = dict(lm.named_parameters())
    fused_adapted = {
        name.split(".lora_in_proj.")[0] for name, p in named.items() if ".lora_in_proj." in name and p.requires_grad
    }
    counts = MatrixParams()
    for name, param in named.items():
        if param.ndim < 2 or name.startswith("emb.") or ".lora_in_proj." in name:
            continue  # embedding lookups; fused adapters' B·A is computed once per step, not per position
        module = name.rsplit(".", 1)[0]
        wgrad = param.requires_grad or (name.endswith("in_proj_weight") and module in fused_adapted)
        text_share = 0.0
        if name.startswith("condition_provider."):
            text_share = 1.0
        elif name.endswith("cross_attention.in_proj_weight"):
            text_share = (param.shape[0] - param.shape[1]) / param.shape[0]  # K and V rows; Q is on the sequence
        text = round(param.numel() * text_share)
        counts.text += text
        counts.sequence += param.numel() - text
        if wgrad:
            counts.text_wgrad += text
            counts.sequence_wgrad += param.numel() - text
    return counts
