"""`make plan`: the run a plan is for, composed as `make train` composes it (preset, the model's architecture,
NAME's dataset, ARGS), from a released architecture (built in: no files) or a model folder's xp.cfg (its weights
are never read); then the table on the console and the JSON at OUT.
"""

import dataclasses
import json
import typing as tp
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import check_override_keys, check_values, compose, hydra_value
from ..data.dataset import PreparedDataset, count_segments
from ..errors import UserError
from ..files import write_text_atomically
from ..launch import DEFAULT_PRESET, check_preset
from ..models import folder as model_dir
from ..models import xp_cfg
from ..models.hf.convert import is_hf_folder
from ..paths import CONFIG_DIR, upstream_config_dir
from . import gpu
from .fit import ASSUMED_MFU, NothingFitsError, Planner, choose_micro_batch, table
from .trace import CAPTION_TOKENS, run_models, t5_folder

# The released MusicGen text-to-music models: AudioCraft's musicgen_lm at these scales (config/model/lm/
# model_scale/{small,medium,large}.yaml: 24 x 1024, 48 x 1536, 48 x 2048), 4 codebooks of 2048 at 50 Hz from the
# 32 kHz EnCodec, and t5-base (conditioner/text2music.yaml; upstream's grids/musicgen/musicgen_base_32khz.py trains
# medium and large with the same conditioner, only the scale changes).
RELEASED = {
    "musicgen-small": ("model/lm/model_scale=small",),
    "musicgen-medium": ("model/lm/model_scale=medium",),
    "musicgen-large": ("model/lm/model_scale=large",),
}
DEFAULT_BATCHES = (1, 2, 4, 8)


class PlanRequestError(UserError, ValueError):
    """MODEL= is neither a released architecture nor an AudioCraft model folder, or BATCHES= is not a list."""


@dataclasses.dataclass
class Request:
    """What `make plan` was asked (MODEL, NAME, PRESET with LORA's _lora, ARGS, SEGMENT)."""

    model: str
    name: tp.Optional[str] = None
    preset: str = DEFAULT_PRESET
    extra: tp.Sequence[str] = ()
    segment_s: tp.Optional[float] = None


@dataclasses.dataclass
class Run:
    """The composed config of the run a plan is for, where its T5 may be found, and its dataset's size."""

    cfg: DictConfig
    root: tp.Optional[Path]
    description: str
    segments: tp.Optional[int]


def model_overrides(model: str, composed: DictConfig) -> tp.Tuple[tp.List[str], tp.Optional[Path], str]:
    """Overrides giving the preset's config the model's architecture, the folder (None when built in), a name."""
    if model in RELEASED:
        return list(RELEASED[model]), None, f"{model} (released architecture, built in)"
    root = Path(model).expanduser().resolve()
    lm_file = root / model_dir.LM_FILE
    if not lm_file.is_file():
        hint = (
            " It is a transformers folder: `make import-hf HF=... OUT=...` converts it once."
            if root.is_dir() and is_hf_folder(root)
            else ""
        )
        raise PlanRequestError(
            f"MODEL={model}: neither {', '.join(RELEASED)} nor a folder with {model_dir.LM_FILE} (an AudioCraft "
            f"model, whose xp.cfg says its architecture).{hint}"
        )
    package = model_dir.load_package(lm_file)  # memory-mapped: the weights are not read
    if "xp.cfg" not in package:
        raise PlanRequestError(f"{lm_file} has no 'xp.cfg': its architecture cannot be known.")
    snapshot = OmegaConf.create(package["xp.cfg"])
    overrides = xp_cfg.architecture_overrides(snapshot, composed)
    t5 = OmegaConf.select(snapshot, xp_cfg.T5_NAME)
    if t5 and t5_folder(str(t5), root):  # a local T5 (its config.json), as make train finds it beside the model
        overrides.append(f"{xp_cfg.T5_NAME}={hydra_value(str(t5_folder(str(t5), root)))}")
    if (root / model_dir.COMPRESSION_FILE).is_file():
        overrides.append(f"compression_model_checkpoint={hydra_value(model_dir.PRETRAINED_PREFIX + str(root))}")
    return overrides, root, str(root)


def compose_run(request: Request, values: bool = True) -> Run:
    """The run's config as `make train` would compose it, every override checked (`values`: and the values of
    config.ALLOWED, as make train checks them)."""
    check_preset(request.preset)
    base = [f"solver={request.preset}"]
    segments = None
    if request.name:
        dataset = PreparedDataset(request.name)
        base += dataset.overrides()
        segments = count_segments(dataset.manifest("train"))
    if request.segment_s is not None:
        base.append(f"dataset.segment_duration={hydra_value(float(request.segment_s))}")
    check_override_keys(request.extra, compose(base), [CONFIG_DIR, upstream_config_dir()])
    architecture, root, description = model_overrides(request.model, compose([*base, *request.extra]))
    cfg = compose([*base, *architecture, *request.extra])
    if values:
        check_values(cfg)
    return Run(cfg, root, description, segments)


def batches(text: tp.Optional[str]) -> tp.Tuple[int, ...]:
    if not text:
        return DEFAULT_BATCHES
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise PlanRequestError(f"BATCHES={text}: give micro-batch sizes >= 1, comma-separated (e.g. 1,2,4,8).")
    return values


def plan(
    request: Request,
    micro_batches: tp.Sequence[int] = DEFAULT_BATCHES,
    memory_gib: tp.Optional[float] = None,
    gpu_name: tp.Optional[str] = None,
    inputs: str = "encoded",
    mfu: float = ASSUMED_MFU,
) -> tp.Tuple[dict, str]:
    """The plan of `request`: (its JSON, its console text)."""
    run = compose_run(request)
    device = gpu.training_device(run.cfg.device, memory_gib, gpu_name)
    planner = Planner(run_models(run.cfg, run.root), device, inputs, run.segments, mfu)
    rows = planner.rows(micro_batches)
    text = [table(planner, rows, f"Plan of {run.description}, {request.preset}")]
    try:
        choice = choose_micro_batch(planner)
        auto = {
            "micro_batch": choice.row.micro_batch,
            "accum_steps": choice.row.accum_steps,
            "checkpointing": choice.row.checkpointing,
            "why": choice.describe(planner.batch, device),
        }
        text.append(f"optim.grad_accum_steps=auto: {auto['why']}")
    except NothingFitsError as err:
        auto = {"error": str(err)}
        text.append(f"optim.grad_accum_steps=auto refuses: {err}")
    result = {
        "model": run.description,
        "preset": request.preset,
        "lora": bool(run.cfg.get("lora") and run.cfg.lora.enabled),
        "device": dataclasses.asdict(device),
        "inputs": inputs,
        "precision": f"{run.cfg.autocast_dtype} autocast" if run.cfg.autocast else "fp32",
        "batch_size": planner.batch,
        "segment_s": float(run.cfg.dataset.segment_duration),
        "segments_per_epoch": planner.segments,
        "assumptions": {
            "mfu": mfu,
            "allocator_reserve_fraction": gpu.ALLOCATOR_RESERVE_FRACTION,
            "cuda_context_gib": gpu.CUDA_CONTEXT_GIB,
            "cublas_workspace_bytes": gpu.CUBLAS_WORKSPACE_BYTES * gpu.CUBLAS_HANDLES,
            "fit_margin": gpu.FIT_MARGIN,
            "caption_tokens": CAPTION_TOKENS,
        },
        "auto": auto,
        "rows": [row.to_dict() for row in rows],
    }
    return result, "\n".join(text)


def write(result: dict, out: Path) -> Path:
    return write_text_atomically(out, json.dumps(result, indent=2) + "\n")
