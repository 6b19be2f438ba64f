"""`make plan` and `optim.grad_accum_steps: auto`: one training update traced on fake tensors, its peak memory by
part, and the micro-batch chosen from it.

Expected values come from elsewhere than the tracer: parameter and adapter counts from the models' shapes (built on
the meta device, or from LoRA's published layout), linearity from three traced sizes, and a real CPU step run by
the same code on real tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DATASET, REPO, run_tool
from omegaconf import OmegaConf

from musicgen_finetune import environment
from musicgen_finetune.config import compose
from musicgen_finetune.models import folder as model_dir
from musicgen_finetune.models import xp_cfg
from musicgen_finetune.models.hf.configs import audiocraft_lm_shapes
from musicgen_finetune.planning import fit, gpu
from musicgen_finetune.planning.trace import Trainee, run_models
from musicgen_finetune.planning.tracker import PARTS

environment.prepare()

SMALL = ["solver=finetune/musicgen_small", "model/lm/model_scale=small"]
# a 4-layer LM: fast to trace, long enough sequences to tell O(S) from O(S^2) attention memory
NARROW = [
    "solver=finetune/musicgen_small",
    "transformer_lm.dim=256",
    "transformer_lm.num_heads=4",
    "transformer_lm.num_layers=4",
    "dataset.batch_size=1",
]


def gib(nbytes: int) -> float:
    return nbytes / 2**30


def cuda_bytes(shapes, element_size: int = 4) -> int:
    """What CUDA's caching allocator gives fp32 tensors of these shapes: one block each, in multiples of 512 bytes
    (CUDACachingAllocator.cpp round_size)."""
    return sum(math.ceil(math.prod(shape) * element_size / 512) * 512 for shape in shapes)


@pytest.fixture(scope="module")
def small_full():
    return Trainee(run_models(compose(SMALL)))


def test_parts_add_up_and_the_resident_parts_are_the_models(small_full):
    """At the peak of an accumulated update (second micro-batch: the first's gradients alive), the parts add up to
    the peak; weights, gradients and AdamW's state are those of musicgen-small's 24 x 1024 LM, counted from its
    shapes built on the meta device."""
    trace = small_full.trace(1, 30.0, accum_steps=2)
    assert sum(trace.parts_gib.values()) == pytest.approx(trace.peak_gib, rel=1e-9)
    assert set(trace.parts_gib) == set(PARTS)
    shapes = audiocraft_lm_shapes(compose(SMALL), t5_width=768)
    assert 419e6 < sum(math.prod(s) for s in shapes.values()) < 421e6  # musicgen-small's 419.6 M (notes)
    weights = cuda_bytes(shapes.values())
    assert trace.parts_gib["parameters"] == pytest.approx(gib(weights), rel=1e-6)
    assert trace.parts_gib["gradients"] == pytest.approx(gib(weights), rel=1e-6)
    # AdamW: two moments per parameter, and fused AdamW's step count, one scalar tensor on the device each
    assert trace.parts_gib["optimizer"] == pytest.approx(gib(2 * weights + 512 * len(shapes)), rel=1e-6)
    assert trace.parts_gib["ema"] == 0  # the preset's EMA is off
    # EnCodec 32 kHz and t5-base's encoder stay on the GPU: ~57 M + ~110 M fp32 parameters
    assert 0.6 < trace.parts_gib["frozen_models"] < 0.7


def test_activation_memory_is_linear_in_micro_batch_and_segment():
    """A GPU's attention kernel keeps O(S) per head: activation memory grows linearly with the segment, not with
    its square (the CPU's math path would store every S x S matrix), and linearly with the micro-batch."""
    trainee = Trainee(run_models(compose(NARROW)), inputs="cached")

    def activations(micro_batch, segment):
        parts = trainee.trace(micro_batch, segment).parts_gib
        return parts["activations"] + parts["logits_loss"]

    by_batch = [activations(b, 10.0) for b in (1, 2, 4)]
    assert by_batch[2] - by_batch[1] == pytest.approx(2 * (by_batch[1] - by_batch[0]), rel=0.02)
    assert by_batch[0] > 0
    by_segment = [activations(1, s) for s in (10.0, 20.0, 40.0)]
    assert by_segment[2] - by_segment[1] == pytest.approx(2 * (by_segment[1] - by_segment[0]), rel=0.03)


def test_lora_trains_and_keeps_state_for_the_adapters_only():
    """Gradients and AdamW's state are those of the adapters: rank 12 on q, k, v and out_proj of self- and
    cross-attention in each of the 4 layers, A (12 x 256) and B (256 x 12) each (lora.py's layout); the frozen
    base stays on the GPU as weights only."""
    cfg = compose([*NARROW, "lora.enabled=true", "dataset.batch_size=2"])
    trace = Trainee(run_models(cfg), inputs="cached").trace(1, 10.0, accum_steps=2)
    adapters = [(12, 256), (256, 12)] * (4 * 2 * 4)
    assert trace.parts_gib["gradients"] == pytest.approx(gib(cuda_bytes(adapters)), rel=1e-6)
    assert trace.parts_gib["optimizer"] == pytest.approx(gib(2 * cuda_bytes(adapters) + 512 * len(adapters)))
    base = audiocraft_lm_shapes(compose(NARROW), t5_width=768)
    assert trace.parts_gib["parameters"] == pytest.approx(gib(cuda_bytes(base.values()) + cuda_bytes(adapters)))


def test_checkpointing_lowers_the_activation_part():
    models = run_models(compose(NARROW))
    kept = Trainee(models, checkpointing=False, inputs="cached").trace(2, 20.0)
    recomputed = Trainee(models, checkpointing=True, inputs="cached").trace(2, 20.0)
    assert recomputed.parts_gib["activations"] < 0.3 * kept.parts_gib["activations"]
    assert recomputed.peak_gib < kept.peak_gib


@pytest.mark.parametrize(
    "lora, checkpointing, inputs", [(False, False, "cached"), (True, True, "encoded")], ids=["full", "lora"]
)
def test_fake_trace_agrees_with_a_real_cpu_step(tiny_model, lora, checkpointing, inputs):
    """The same update on real CPU tensors (CPU autocast in bf16, the same kernels), counted by the same tracker:
    the fake-tensor prediction is within 5%, part by part. A small LM on the tiny model's EnCodec and T5."""
    base = ["solver=finetune/musicgen_small", "device=cuda"]
    files = model_dir.check(tiny_model)
    cfg = compose(
        [
            *base,
            *xp_cfg.architecture_overrides(files.xp_cfg, compose(base)),
            f"compression_model_checkpoint=//pretrained/{tiny_model}",
            f"conditioners.description.t5.name={files.t5}",
            "transformer_lm.dim=128",
            "transformer_lm.num_heads=4",
            "transformer_lm.num_layers=2",
            "dataset.batch_size=4",
            f"lora.enabled={str(lora).lower()}",
            "lora.rank=4",
        ]
    )
    models = run_models(cfg)
    fake = Trainee(models, checkpointing, inputs).trace(2, 3.0, accum_steps=2)
    real = Trainee(models, checkpointing, inputs, fake=False).trace(2, 3.0, accum_steps=2)
    assert fake.peak_gib == pytest.approx(real.peak_gib, rel=0.05)
    for part in PARTS:
        assert abs(fake.parts_gib[part] - real.parts_gib[part]) <= 0.05 * real.peak_gib, part
    if inputs == "cached":  # the LM's forward sets the peak (encoded: EnCodec on the audio does)
        assert real.parts_gib["activations"] > 0.05 * real.peak_gib


def test_cuda_autocast_rules_give_fp32_where_cuda_does():
    """CUDA autocast runs layer_norm and softmax in fp32 (torch's AMP docs: "CUDA Ops that can autocast to
    float32"); CPU autocast keeps bf16 inputs in bf16. The trace follows CUDA's rule."""
    x = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.layer_norm(x, (8,)).dtype == torch.bfloat16  # the CPU's rule, which the trace must not follow
        with gpu.CudaAutocastRules():
            assert F.layer_norm(x, (8,)).dtype == torch.float32
            assert torch.softmax(x, -1).dtype == torch.float32
            assert F.log_softmax(x, -1).dtype == torch.float32
            assert F.linear(x.float(), torch.randn(8, 8)).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def narrow_planner():
    """A small LM whose activations set the peak (its tokens and T5 outputs cached: no EnCodec on the card)."""
    cfg = compose([*NARROW, "dataset.batch_size=4"])
    return fit.Planner(run_models(cfg), gpu.training_device("cuda", memory_gib=24.0), inputs="cached")


def with_memory(planner: fit.Planner, memory_gib: float) -> fit.Planner:
    """The same traces against another card."""
    planner.device = gpu.Device("cuda", "test card", memory_gib, None, "test")
    return planner


def card_for(total_gib: float) -> float:
    """The smallest card on which a predicted total fits, with the margin."""
    return total_gib / (1 - gpu.FIT_MARGIN) + 1e-3


def test_auto_picks_a_smaller_micro_batch_for_a_smaller_gpu(narrow_planner):
    """`auto` picks the largest micro-batch whose predicted total fits with the margin, without checkpointing while
    one segment fits without it; a smaller card gets a smaller micro-batch and more accumulation steps."""
    totals = {m: narrow_planner.row(m, False).total_gib for m in (1, 2, 4)}
    assert totals[1] < totals[2] < totals[4]
    for micro_batch, steps in ((4, 1), (2, 2), (1, 4)):
        choice = fit.choose_micro_batch(with_memory(narrow_planner, card_for(totals[micro_batch])))
        assert (choice.row.micro_batch, choice.row.accum_steps, choice.row.checkpointing) == (micro_batch, steps, False)
    recomputed = narrow_planner.row(1, True).total_gib
    assert recomputed < totals[1]
    choice = fit.choose_micro_batch(with_memory(narrow_planner, card_for((totals[1] + recomputed) / 2)))
    assert choice.row.checkpointing  # one segment fits only with its activations recomputed
    assert "micro-batch 1 does not fit without it" in choice.describe(4, narrow_planner.device)


def test_auto_refuses_when_nothing_fits_and_says_what_would(narrow_planner):
    """Between what LoRA needs and what full fine-tuning needs (one segment, checkpointing): a refusal naming
    NothingFitsError's fixes, LoRA first."""
    full = narrow_planner.row(1, True).total_gib
    low_rank = narrow_planner.variant({"lora.enabled": True}).row(1, True).total_gib
    assert low_rank < full
    with pytest.raises(fit.NothingFitsError, match="nothing fits on test card") as refused:
        fit.choose_micro_batch(with_memory(narrow_planner, card_for((full + low_rank) / 2)))
    assert "What would fit: LoRA (LORA=1" in str(refused.value)


def test_auto_in_a_run_config_follows_the_gpu_memory_override(monkeypatch):
    """The solver's call at start: MUSICGEN_FT_GPU_MEM_GIB stands for the GPU (tests have none)."""
    cfg = compose([*NARROW, "dataset.batch_size=2"])
    monkeypatch.setenv(gpu.GPU_MEM_ENV, "64")
    why = fit.resolve_grad_accum_steps(cfg)
    assert cfg.optim.grad_accum_steps == 1 and "the whole batch fits" in why and "MUSICGEN_FT_GPU_MEM_GIB" in why
    assert fit.resolve_grad_accum_steps(compose([*NARROW, "optim.grad_accum_steps=2"])) is None
    monkeypatch.setenv(gpu.GPU_MEM_ENV, "none")
    with pytest.raises(gpu.GpuMemoryError, match="MUSICGEN_FT_GPU_MEM_GIB=none"):
        fit.resolve_grad_accum_steps(compose(NARROW))


def test_make_train_refuses_before_anything_is_created(tiny_model, dataset, monkeypatch, capsys):
    from musicgen_finetune import launch

    monkeypatch.setenv(gpu.GPU_MEM_ENV, "0.01")
    args = ["optim.grad_accum_steps=auto"]
    with pytest.raises(fit.NothingFitsError, match="optim.grad_accum_steps=auto: nothing fits"):
        launch.run(str(tiny_model), DATASET, preset="finetune/cpu_tiny", extra=args)
    _, xp = launch.plan(str(tiny_model), DATASET, preset="finetune/cpu_tiny", extra=args)
    assert not xp.folder.exists()
    assert "Plan (nothing fits)" in capsys.readouterr().out


def test_make_plan_writes_the_table_and_json(tiny_model, tmp_path, capsys):
    """tools/plan.py on a model folder (read for its xp.cfg): micro-batches 1 and 2 on the console and as JSON."""
    import importlib.util
    import json

    from musicgen_finetune.planning import command

    spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "plan.json"
    tool.main(["--model", str(tiny_model), "--preset", "finetune/cpu_tiny", "--batches", "1,2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "peak" in printed and "optim.grad_accum_steps=auto" in printed and f"Written to {out}" in printed
    plan = json.loads(out.read_text())
    assert [r["micro_batch"] for r in plan["rows"]] == [1, 2] and plan["segment_s"] == 1.0
    for row in plan["rows"]:
        assert set(row["parts_gib"]) == set(PARTS) and row["flops"] > 0 and row["segment_s"] == 1.0
        assert sum(row["parts_gib"].values()) == pytest.approx(row["peak_gib"], abs=0.005)
        assert row["parts_gib"]["frozen_models"] < 0.05  # the model's own tiny EnCodec and T5, not t5-base's 0.4 GiB
    with pytest.raises(command.PlanRequestError, match="neither musicgen-small"):
        command.compose_run(command.Request(str(tmp_path / "nothing")))


def test_solver_plans_auto_at_start_and_logs_why(workdir, tiny_model, dataset):
    """A real run with `auto` on the CPU: the plan is made against the RAM available, the log says it."""
    result = run_tool(
        [
            "tools/train.py",
            "--model",
            str(tiny_model),
            "--name",
            DATASET,
            "--preset",
            "finetune/cpu_tiny",
            "--args",
            "optim.grad_accum_steps=auto optim.epochs=1 generate.every=1000",
        ],
        workdir,
        extra_env={gpu.GPU_MEM_ENV: "64"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stderr + result.stdout
    assert "optim.grad_accum_steps=auto: batch 4 per GPU in 1 micro-batch(es)" in output
    assert "in 1 micro-batch(es)" in output


def test_released_architectures_need_no_files():
    """musicgen-medium's and -large's published shapes: 48 x 1536 and 48 x 2048, t5-base, the 32 kHz EnCodec."""
    from musicgen_finetune.planning import command

    for model, (layers, dim) in {"musicgen-medium": (48, 1536), "musicgen-large": (48, 2048)}.items():
        run = command.compose_run(command.Request(model))
        lm = run.cfg.transformer_lm
        assert (lm.num_layers, lm.dim, lm.n_q, lm.card) == (layers, dim, 4, 2048) and run.root is None
        assert run.cfg.conditioners.description.t5.name == "t5-base"
        assert run_models(run.cfg).codec_cfg.sample_rate == 32000


def test_grad_accum_steps_accepts_auto_or_a_whole_number():
    from musicgen_finetune.config import ALLOWED

    allowed = ALLOWED["optim.grad_accum_steps"]
    assert allowed.problem("optim.grad_accum_steps", "auto") is None
    assert allowed.problem("optim.grad_accum_steps", 3) is None
    assert "must be a whole number >= 1 or auto" in allowed.problem("optim.grad_accum_steps", "many")


# -- the choice itself, on rows from a formula (no tracing: make mutate runs these for every mutant) --------------


class FormulaPlanner:
    """What choose_micro_batch and refusal read of a Planner, with totals from a formula instead of a trace:
    `fixed` GiB (weights, gradients, optimizer state) plus `per_segment_s` GiB per second of audio in a micro-batch,
    halved with activation checkpointing. The expected choices below are worked out from the formula by hand."""

    def __init__(
        self, batch, memory_gib, fixed=4.0, per_segment_s=0.1, segment_s=30.0, lora=False, ckpt=False, kept=0.5
    ):
        self.batch, self.fixed, self.per_segment_s, self.segment_s = batch, fixed, per_segment_s, segment_s
        self.kept = kept  # the share of activation memory checkpointing keeps
        self.device = gpu.Device("cuda", "formula card", memory_gib, None, "test")
        self.cfg = OmegaConf.create({"lora": {"enabled": lora}})
        self.preset_checkpointing = ckpt
        self.traced = []

    def row(self, micro_batch, checkpointing=None, segment_s=None):
        checkpointing = self.preset_checkpointing if checkpointing is None else checkpointing
        segment_s = segment_s or self.segment_s
        self.traced.append((micro_batch, checkpointing, segment_s))
        activations = self.per_segment_s * micro_batch * segment_s * (self.kept if checkpointing else 1.0)
        total = self.fixed + activations
        quarter = self.fixed / 4
        return fit.Row(
            micro_batch=micro_batch,
            accum_steps=-(-self.batch // micro_batch),
            segment_s=segment_s,
            checkpointing=checkpointing,
            peak_gib=total - 0.5,
            parts_gib={"parameters": quarter, "gradients": quarter, "optimizer": 2 * quarter, "ema": 0.0},
            phase="backward",
            extras_gib=0.0,
            total_gib=total,
            fits=total <= self.device.memory_gib * (1 - gpu.FIT_MARGIN),
            flops=0.0,
            step_s=None,
            epoch_s=None,
        )

    def variant(self, changes):
        assert changes == {"lora.enabled": True}
        return FormulaPlanner(self.batch, self.device.memory_gib, self.fixed / 8, self.per_segment_s, lora=True)


def card(total_gib: float) -> float:
    """The card whose usable memory (5% kept free) is `total_gib`, give or take a rounding error."""
    return total_gib / (1 - gpu.FIT_MARGIN) + 1e-6


def test_split_sizes_and_accumulation_steps():
    assert [fit.accum_steps_for(batch, micro) for batch, micro in ((7, 3), (6, 3), (1, 4), (4, 4), (5, 1))] == [
        3,
        2,
        1,
        1,
        5,
    ]
    # 7 segments split into 1..7 micro-batches: the largest micro-batch of each split is 7, 4, 3, 2, 2, 2, 1
    assert fit.candidate_micro_batches(7) == [7, 4, 3, 2, 1]
    assert fit.candidate_micro_batches(6) == [6, 3, 2, 1]
    assert fit.candidate_micro_batches(1) == [1]


def test_auto_takes_the_largest_split_that_fits_by_the_formula():
    # 30 s segments at 0.1 GiB per second: 3 GiB each over 4 GiB fixed. A card holding 4 + 3 x 3 = 13 GiB takes
    # micro-batches of 3: 7 segments in 3 updates (3 + 3 + 1), without checkpointing
    planner = FormulaPlanner(batch=7, memory_gib=card(13.0))
    choice = fit.choose_micro_batch(planner)
    assert (choice.row.micro_batch, choice.row.accum_steps, choice.row.checkpointing) == (3, 3, False)
    assert [(r.micro_batch, r.checkpointing) for r in choice.rows] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
        (7, False),
    ]
    described = choice.describe(7, planner.device)
    assert described.startswith("batch 7 per GPU in 3 micro-batch(es) of up to 3 x 30 s: predicted 13.0 GiB of ")
    assert "(peak allocated 12.5 GiB, 5% kept free); micro-batch 4 would need 16.0 GiB" in described
    # the whole batch: 4 + 7 x 3 = 25 GiB
    whole = fit.choose_micro_batch(FormulaPlanner(batch=7, memory_gib=card(25.0)))
    assert (whole.row.micro_batch, whole.row.accum_steps) == (7, 1)
    assert whole.describe(7, planner.device).endswith("; the whole batch fits")
    # a card between two sizes takes the smaller: 4 + 2 x 3 = 10 < 12 < 13
    assert fit.choose_micro_batch(FormulaPlanner(batch=7, memory_gib=card(12.0))).row.micro_batch == 2
    # a single segment per update: nothing larger to try
    single = fit.choose_micro_batch(FormulaPlanner(batch=1, memory_gib=card(7.0)))
    assert (single.row.micro_batch, single.row.accum_steps, len(single.rows)) == (1, 1, 1)


def test_auto_checkpoints_only_when_one_segment_does_not_fit_without_it():
    # one segment needs 7 GiB, 5.5 with checkpointing; two with checkpointing 7
    planner = FormulaPlanner(batch=4, memory_gib=card(7.0) - 0.01)
    choice = fit.choose_micro_batch(planner)
    assert (choice.row.micro_batch, choice.row.accum_steps, choice.row.checkpointing) == (1, 4, True)
    assert "with activation checkpointing (micro-batch 1 does not fit without it)" in choice.describe(4, planner.device)
    preset = FormulaPlanner(batch=4, memory_gib=card(100.0), ckpt=True)
    chosen = fit.choose_micro_batch(preset)
    assert chosen.row.checkpointing and chosen.row.micro_batch == 4
    assert all(checkpointing for _, checkpointing, _ in preset.traced)  # the preset's choice: never traced without
    assert ", with activation checkpointing (the preset's)" in chosen.describe(4, preset.device)


def test_nothing_fits_names_lora_a_shorter_segment_or_a_larger_card():
    # full fine-tuning: 4 + 1.5 GiB at micro-batch 1 with checkpointing; LoRA keeps 0.5 GiB of fixed state
    with pytest.raises(fit.NothingFitsError) as refused:
        fit.choose_micro_batch(FormulaPlanner(batch=2, memory_gib=card(5.0)))
    message = str(refused.value)
    assert "nothing fits on formula card" in message and "one segment of 30 s per micro-batch needs 5.5 GiB" in message
    assert "What would fit: LoRA (LORA=1: 2.0 GiB at micro-batch 1 with checkpointing)" in message
    # 20 s segments: 4 + 1 = 5 GiB with checkpointing, which fits
    assert "segments of 20 s (5.0 GiB with checkpointing; make manifests ... SEGMENT=20)" in message
    # LoRA already: only the segment. 0.06 GiB per second with checkpointing: 20 s 5.2 GiB, 15 s 4.9 GiB
    lora = FormulaPlanner(batch=2, memory_gib=card(4.95), per_segment_s=0.12, lora=True)
    with pytest.raises(fit.NothingFitsError, match=r"What would fit: segments of 15 s \(4\.9 GiB") as refused:
        fit.choose_micro_batch(lora)
    assert "LoRA" not in str(refused.value)
    # the fixed state alone does not fit: no shorter segment is tried, a card is named (5.5 / 0.95 = 5.8 GiB)
    small = FormulaPlanner(batch=2, memory_gib=card(3.0), lora=True)
    with pytest.raises(fit.NothingFitsError, match="What would fit: a device with at least 6 GiB"):
        fit.choose_micro_batch(small)
    assert {segment for _, _, segment in small.traced} == {30.0}


def test_durations_and_row_dicts_as_make_plan_writes_them():
    assert [fit.duration(s) for s in (None, 2.345, 42.4, 600, 7200)] == ["-", "2.35 s", "42 s", "10 min", "2.0 h"]
    # each unit from its round number on: 10 s, 1 min, 1 h; 3000 s = 50 min; 3780 s = 1.05 h
    assert [fit.duration(s) for s in (10, 60, 3000, 3600, 3780)] == ["10 s", "1 min", "50 min", "1.0 h", "1.1 h"]
    row = FormulaPlanner(batch=2, memory_gib=10.0, fixed=4.938).row(1)  # parts of 1.2345 and 2.469 GiB
    row.step_s, row.epoch_s, row.extras_gib = 1.23456, 123.456, 0.12345
    as_dict = row.to_dict()
    assert (as_dict["step_s"], as_dict["epoch_s"], as_dict["extras_gib"], as_dict["total_gib"]) == (
        1.235,
        123.5,
        0.123,
        7.938,
    )
    assert as_dict["parts_gib"] == {"parameters": 1.234, "gradients": 1.234, "optimizer": 2.469, "ema": 0.0}
    row.step_s = row.epoch_s = None
    assert (row.to_dict()["step_s"], row.to_dict()["epoch_s"]) == (None, None)
    assert fit.is_auto(OmegaConf.create({"optim": {"grad_accum_steps": "auto"}}))
    assert not fit.is_auto(OmegaConf.create({"optim": {"grad_accum_steps": 2}}))


def test_accumulation_steps_are_enough_micro_batches_of_at_most_the_size():
    """The planner's micro-batch counts against the split the solver makes (solver.split_batch): the fewest
    micro-batches whose largest part holds at most `micro_batch` segments, found by trying every count."""
    from musicgen_finetune.solver import split_batch

    def largest_part(batch: int, parts: int) -> int:
        return max(len(part[0]) for part in split_batch((list(range(batch)),), parts))

    for batch in range(1, 10):
        for micro_batch in range(1, batch + 2):
            fewest = next(n for n in range(1, batch + 1) if largest_part(batch, n) <= micro_batch)
            assert fit.accum_steps_for(batch, micro_batch) == fewest, (batch, micro_batch)
        sizes = {largest_part(batch, n) for n in range(1, batch + 1)}
        assert fit.candidate_micro_batches(batch) == sorted(sizes, reverse=True), batch


def test_auto_traces_from_the_linear_prediction_down_and_checkpoints_every_row_it_needs():
    # 12 segments: splits of 12, 6, 4, 3, 2, 1. 4 GiB + 3 GiB a segment on 16.9 usable GiB: 1 (7) and 2 (10) fit, so
    # activations are 3 GiB a segment and 6.9 GiB are left: 2 more segments, and one above the prediction is 5:
    # 4 is traced and fits, then 6 (the next larger split, for the log) and nothing else
    planner = FormulaPlanner(batch=12, memory_gib=card(16.9))
    choice = fit.choose_micro_batch(planner)
    assert (choice.row.micro_batch, choice.row.accum_steps) == (4, 3)
    assert planner.traced == [(m, False, 30.0) for m in (1, 12, 2, 4, 6)]
    assert "micro-batch 6 would need 22.0 GiB" in choice.describe(12, planner.device)
    # checkpointing keeping a quarter of the activations: 4 + 0.75 GiB a segment; one segment without it (7 GiB)
    # does not fit 6.9, so every row after is checkpointed: 6 (8.5) no, 2 (5.5) yes, prediction 2 + 1 + 1 = 4: 3
    # (6.25) fits
    planner = FormulaPlanner(batch=6, memory_gib=card(6.9), kept=0.25)
    choice = fit.choose_micro_batch(planner)
    assert (choice.row.micro_batch, choice.row.accum_steps, choice.row.checkpointing) == (3, 2, True)
    assert planner.traced == [(1, False, 30.0)] + [(m, True, 30.0) for m in (1, 6, 2, 3)]
    assert [(r.micro_batch, r.checkpointing) for r in choice.rows] == [
        (1, False),
        (1, True),
        (2, True),
        (3, True),
        (6, True),
    ]
    # 4 segments, checkpointed: 2 fits (5.5), the whole batch does not (7.0): 2 micro-batches of 2
    small = fit.choose_micro_batch(FormulaPlanner(batch=4, memory_gib=card(6.9), kept=0.25))
    assert (small.row.micro_batch, small.row.accum_steps, small.row.checkpointing) == (2, 2, True)
    # 2 segments: one or both, nothing between
    pair = FormulaPlanner(batch=2, memory_gib=card(8.0))
    assert fit.choose_micro_batch(pair).row.micro_batch == 1 and pair.traced == [(1, False, 30.0), (2, False, 30.0)]


def test_auto_edge_cases_of_the_search():
    # 2 segments that fit together: one micro-batch of 2
    both = FormulaPlanner(batch=2, memory_gib=card(10.0))
    assert fit.choose_micro_batch(both).row.micro_batch == 2 and both.traced == [(1, False, 30.0), (2, False, 30.0)]
    # 12 segments on 15 GiB: the prediction (4) is traced first and does not fit, then 3 does; nothing traced twice
    planner = FormulaPlanner(batch=12, memory_gib=card(15.0))
    assert fit.choose_micro_batch(planner).row.micro_batch == 3
    assert planner.traced == [(m, False, 30.0) for m in (1, 12, 2, 4, 3)]
    # on 12 GiB nothing above 2 fits: 3 is traced once, 2 is not traced again
    planner = FormulaPlanner(batch=12, memory_gib=card(12.0))
    assert fit.choose_micro_batch(planner).row.micro_batch == 2
    assert planner.traced == [(m, False, 30.0) for m in (1, 12, 2, 3)]
    # less than a GiB per segment (0.2 GiB, 6 s segments): 4 + 0.2 m on 6.1 GiB fits 10 of 12; the prediction, 2 + 9
    # + 1 = 12, is the whole batch: every split is tried from 6 down, and 6 fits
    fine = FormulaPlanner(batch=12, memory_gib=card(6.1), per_segment_s=0.2 / 6, segment_s=6.0)
    assert fit.choose_micro_batch(fine).row.micro_batch == 6
    # a preset with checkpointing that fits nothing: its one row is the one the refusal describes
    with pytest.raises(fit.NothingFitsError, match="one segment of 30 s per micro-batch needs 5.5 GiB"):
        fit.choose_micro_batch(FormulaPlanner(batch=2, memory_gib=card(3.0), ckpt=True, lora=True))


def test_the_plan_is_described_in_full():
    planner = FormulaPlanner(batch=4, memory_gib=card(7.0) - 0.01)
    assert fit.choose_micro_batch(planner).describe(4, planner.device) == (
        "batch 4 per GPU in 4 micro-batch(es) of up to 1 x 30 s, with activation checkpointing (micro-batch 1 does "
        f"not fit without it): predicted 5.5 GiB of {planner.device.describe()} (peak allocated 5.0 GiB, 5% kept "
        "free); micro-batch 2 would need 7.0 GiB"
    )
    preset = FormulaPlanner(batch=2, memory_gib=card(100.0), ckpt=True)
    assert (
        fit.choose_micro_batch(preset)
        .describe(2, preset.device)
        .endswith(
            f", with activation checkpointing (the preset's): predicted 7.0 GiB of {preset.device.describe()} "
            "(peak allocated 6.5 GiB, 5% kept free); the whole batch fits"
        )
    )
    with pytest.raises(fit.NothingFitsError) as refused:
        fit.choose_micro_batch(FormulaPlanner(batch=2, memory_gib=card(5.0)))
    assert str(refused.value).endswith(
        "What would fit: LoRA (LORA=1: 2.0 GiB at micro-batch 1 with checkpointing); segments of 20 s (5.0 GiB with "
        "checkpointing; make manifests ... SEGMENT=20). Or set optim.grad_accum_steps to a number to try anyway."
    )
