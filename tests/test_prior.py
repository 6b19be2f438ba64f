"""Prior preservation, the prior set's cache and the forgetting budget (musicgen_finetune/prior.py, issue 18)."""

import contextlib
import json
import logging
from types import SimpleNamespace
from unittest import mock

import flashy
import pytest
import torch
from audiocraft.solvers.musicgen import MusicGenSolver
from conftest import train, xp_folder
from omegaconf import OmegaConf
from test_solver import bare_solver

from musicgen_finetune import lora, prior
from musicgen_finetune.experiments import BestChoice, best_epoch, choose_best, forgetting, run_choice, valid_value

PROMPTS = ["calm solo piano ballad", "energetic rock with electric guitars"]


def build_lm(snapshot):
    from audiocraft.models import builders

    cfg, best_state = snapshot
    torch.manual_seed(0)
    lm = builders.get_lm_model(cfg)
    lm.load_state_dict({k: v.float() for k, v in best_state.items()})
    return lm.eval()


class StandInSolver:
    """What prior.py reads of the solver, around a real tiny LM: no dora run needed to make a prior set."""

    def __init__(self, lm, cache, prompts=PROMPTS):
        self.model, self.device, self.autocast = lm, "cpu", contextlib.nullcontext()
        self.compression_model = type("Codec", (), {"frame_rate": 50})()
        self.logger = logging.getLogger("test_prior")
        self.cfg = OmegaConf.create(
            {
                "seed": 0,
                "dataset": {"segment_duration": 0.2},
                "conditioners": {"description": {"t5": {"name": "tiny-t5"}}},
                "prior": {"enabled": True, "loss": "kl", "prompts": list(prompts), "seeds": [0, 1], "path": str(cache)},
            }
        )

    def _compute_cross_entropy(self, logits, targets, mask):
        return MusicGenSolver._compute_cross_entropy(self, logits, targets, mask)


def make_set(solver, base_hash="base-a"):
    return prior.load_or_generate(
        solver, prior.PriorConfig.from_cfg(solver.cfg), base_hash, True, contextlib.nullcontext
    )


def test_prior_set_is_deterministic_cached_and_keyed_by_base_and_prompts(snapshot, tmp_path):
    lm = build_lm(snapshot)
    rng_before = torch.random.get_rng_state()
    with mock.patch.object(prior, "generate_set", wraps=prior.generate_set) as generate:
        first = make_set(StandInSolver(lm, tmp_path / "a"))
        assert generate.call_count == 1
        assert torch.equal(torch.random.get_rng_state(), rng_before), "generation leaves training's RNG alone"
        again = make_set(StandInSolver(lm, tmp_path / "a"))
        assert generate.call_count == 1, "the second run generates nothing: the set comes from the cache"
        assert torch.equal(again.tokens, first.tokens) and again.folder == first.folder
        elsewhere = make_set(StandInSolver(lm, tmp_path / "b"))  # generated again from scratch: same sequences
        assert generate.call_count == 2
        assert torch.equal(elsewhere.tokens, first.tokens)
        assert torch.equal(elsewhere.teacher_codes, first.teacher_codes)
        other_base = make_set(StandInSolver(lm, tmp_path / "a"), base_hash="base-b")
        other_prompts = make_set(StandInSolver(lm, tmp_path / "a", prompts=[*PROMPTS, "reggae groove"]))
        assert generate.call_count == 4, "a changed base or prompt list regenerates"
    assert len({first.folder, other_base.folder, other_prompts.folder}) == 3
    # 2 prompts x 2 seeds, 0.2 s at 50 frames/s; the seeds give different sequences
    assert first.tokens.shape == (4, lm.num_codebooks, 10) and len(other_prompts) == 6
    assert not torch.equal(first.tokens[:2], first.tokens[2:])
    key = json.loads((first.folder / prior.KEY_FILE).read_text())
    assert key["prompts"] == PROMPTS and key["seeds"] == [0, 1] and key["generate"]["cfg_coef"] == 3.0
    # the stored teacher is the base's own top-k: its best code's log-probability is the largest
    assert first.teacher_codes.shape == (4, lm.num_codebooks, 10, 32)
    assert first.base_ce > 0


def test_lora_with_adapters_off_reproduces_the_base_logits(snapshot):
    from audiocraft.modules.conditioners import ConditioningAttributes

    base, adapted = build_lm(snapshot), build_lm(snapshot)
    lora.inject(adapted, lora.LoraConfig(enabled=True, rank=4, alpha=8, targets="all"))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in lora.adapter_parameters(adapted).items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapted.eval()
    torch.manual_seed(1)
    codes = torch.randint(0, base.card, (2, base.num_codebooks, 12))
    attributes = [ConditioningAttributes(text={"description": p}) for p in PROMPTS]
    with torch.no_grad():
        conditions = base.condition_provider(base.condition_provider.tokenize(attributes))
        expected = base(codes, [], condition_tensors=conditions)
        with lora.adapters_off(adapted):
            teacher = adapted(codes, [], condition_tensors=conditions)
        tuned = adapted(codes, [], condition_tensors=conditions)
    assert torch.equal(teacher, expected)
    assert not torch.allclose(tuned, expected), "outside the context the adapters act again"


def test_each_update_takes_ratio_rows_per_segment_none_twice_in_an_epoch(monkeypatch):
    """`prior.ratio` prior sequences per real segment of the update: the counts worked out by hand; successive
    updates, and the processes of a multi-GPU run, take rows that follow one another, none twice before the
    set is used up; the same update always takes the same rows (a resumed run) without touching training's RNG."""
    size = 12
    prior_set = prior.PriorSet(torch.zeros(size, 1, 1), [""] * size, [0] * size, 1.0, None)
    solver = SimpleNamespace(cfg=OmegaConf.create({"seed": 0}), epoch=1)

    def rows(ratio, step, real_items, rank=0, world=1):
        monkeypatch.setattr(flashy.distrib, "rank", lambda: rank)
        monkeypatch.setattr(flashy.distrib, "world_size", lambda: world)
        term = prior.PriorTerm(prior.PriorConfig(ratio=ratio), prior_set, True, False)
        return term.items_for_step(solver, step, real_items).tolist()

    # 0.5 x 4 segments = 2 rows, 1 x 3 = 3, 0.3 x 10 = 3, 0.1 x 2 = 0.2 (at least 1), 2 x 3 = 6
    cases = [(0.5, 4), (1.0, 3), (0.3, 10), (0.1, 2), (2.0, 3)]
    assert [len(rows(ratio, 0, items)) for ratio, items in cases] == [2, 3, 3, 1, 6]
    one_process = [row for step in range(3) for row in rows(1.0, step, 4)]
    assert sorted(one_process) == list(range(size))
    two_processes = [row for step in range(2) for rank in range(2) for row in rows(1.0, step, 3, rank, 2)]
    assert sorted(two_processes) == list(range(size))
    rng = torch.get_rng_state()
    assert rows(0.5, 1, 4) == rows(0.5, 1, 4) and torch.equal(torch.get_rng_state(), rng)
    solver.epoch = 2  # the next epoch walks another order of the set
    next_epoch = [row for step in range(3) for row in rows(1.0, step, 4)]
    assert sorted(next_epoch) == list(range(size)) and next_epoch != one_process


def epoch(ce, prior_ce, base=2.0):
    return {"train": {"ce": ce}, "valid": {"ce": ce, "prior_ce": prior_ce, "prior_ce_base": base}}


def test_forgetting_budget_picks_the_lowest_loss_within_budget():
    # valid ce falls every epoch while the prior set's cross-entropy rises: +5%, +8%, +12%, +30% over 2.0
    history = [epoch(5.0, 2.1), epoch(4.0, 2.16), epoch(3.0, 2.24), epoch(2.0, 2.6)]
    assert choose_best(history).epoch == 4
    choice = choose_best(history, "ce", 0.1)
    assert choice.epoch == 2 and "within the forgetting budget" in choice.reason and "3, 4" in choice.reason
    assert choose_best(history, "ce", 0.15).epoch == 3
    nothing_within = choose_best(history, "ce", 0.01)
    assert nothing_within.epoch == 1 and "forgot least" in nothing_within.reason
    assert choose_best([], "ce", 0.1).epoch is None


def test_best_epoch_is_the_lowest_metric_the_earlier_on_ties_counting_every_epoch():
    history = [
        {"valid": {"ce": 3.0, "acc": 0.1}},
        {"train": {"ce": 1.0}},  # no validation that epoch: still epoch 2
        {"valid": {"ce": 2.0}},
        {"valid": {"ce": 2.0}},
        {"valid": {"ce": 2.5}},
    ]
    assert choose_best(history) == BestChoice(3, "lowest valid ce")
    assert best_epoch(history, "acc") == 1
    assert choose_best([{"train": {"ce": 1.0}}]) == BestChoice(None, "no validation yet")
    unmeasured = choose_best(history, "ce", 0.1)  # a budget, but no prior_ce to measure forgetting with
    assert unmeasured.epoch == 3 and "no prior_ce" in unmeasured.reason
    assert run_choice(None, history).epoch == 3
    assert run_choice(OmegaConf.create({"early_stop": {"metric": "acc"}}), history).epoch == 1
    assert run_choice(OmegaConf.create({"early_stop": None}), history).epoch == 3
    # the run's own budget: epoch 2 of the budget test's history rose 8%, epoch 3 12%
    rising = [epoch(5.0, 2.1), epoch(4.0, 2.16), epoch(3.0, 2.24)]
    assert run_choice(OmegaConf.create({"early_stop": {"forgetting_budget": 0.1}}), rising).epoch == 2
    assert [valid_value(history, n) for n in (None, 0, 1, 2, 3, 5, 6)] == [None, None, 3.0, None, 2.0, 2.5, None]
    assert valid_value(history, 1, "acc") == 0.1


def test_the_budget_reason_gives_the_rise_of_the_chosen_epoch_and_the_ones_left_out():
    history = [epoch(5.0, 2.1), epoch(4.0, 2.16), epoch(3.0, 2.24), epoch(2.0, 2.6)]
    # epoch 2: 2.16 / 2.0 - 1 = +8.0%; epochs 3 and 4 over a 10% budget
    assert choose_best(history, "ce", 0.1).reason == (
        "lowest valid ce among the 2 epoch(s) within the forgetting budget (prior_ce at most 10% over the base's; "
        "epoch 2: +8.0%); over budget: epoch(s) 3, 4"
    )
    assert choose_best(history, "ce", 0.5).reason.endswith("epoch 4: +30.0%)")  # all within: none left out
    assert choose_best(history, "ce", 0.01).reason == (
        "no epoch within the forgetting budget (1%): the one that forgot least (prior_ce +5.0% over the base's)"
    )
    assert forgetting({"prior_ce": 3.0, "prior_ce_base": 2.0}) == 0.5
    assert forgetting({"prior_ce": 3.0, "prior_ce_base": 0.0}) is None and forgetting({"prior_ce_base": 2.0}) is None


def test_an_epoch_exactly_at_the_budget_is_within_it():
    """At most the budget, as its docstring says: prior_ce 2.5 over the base's 2.0 is +25% exactly (no rounding)."""
    history = [epoch(5.0, 2.2), epoch(4.0, 2.5)]
    assert choose_best(history, "ce", 0.25).epoch == 2
    assert choose_best(history, "ce", 0.2499).epoch == 1


def test_the_solver_keeps_the_best_state_of_the_budget_epoch_by_epoch(tmp_path):
    """The solver decides at each validation whether this epoch becomes the best state (its weights are copied
    then or never): the epochs it picks must be those the history says, worked out here by hand."""
    solver = bare_solver({"early_stop": {"metric": "ce", "forgetting_budget": 0.1}}, tmp_path)
    solver.best_state = SimpleNamespace(states={})  # no registered weights to copy
    solver._best_metric_name, solver.best_state_epoch = "ce", None
    # ce falls every epoch; prior_ce over the base's 2.0: +5%, +8%, +12% and +30% (over the 10% budget), then +9%.
    # Epochs 1 and 2 each improve within the budget, 3 and 4 are over it, 5 is the lowest ce within it.
    history = [epoch(5.0, 2.1), epoch(4.0, 2.16), epoch(3.0, 2.24), epoch(2.0, 2.6), epoch(1.5, 2.18)]
    new_best = []
    for entry in history:
        solver._pending_metrics = {"valid": entry["valid"]}
        solver.update_best_state_from_stage("valid")
        new_best.append((solver._new_best_state, solver.best_state_epoch))
        solver.history.append(entry)
    assert new_best == [(True, 1), (True, 2), (False, 2), (False, 2), (True, 5)]
    assert solver._best_metric_name == "ce"  # upstream's own choice is bypassed only while the budget decides


ARGS = (
    "optim.epochs=1 dataset.generate.num_samples=1 "
    f"prior.seeds=[0,1] prior.prompts=[{','.join(repr(p) for p in PROMPTS)}]"
)


@pytest.fixture(scope="module")
def runs(workdir, tiny_model, dataset):
    """Three full fine-tunes of the tiny model: without prior, with the prior term at weight 0 (computed, no
    effect), and with it at weight 1 and a forgetting budget."""
    folders = {}
    for name, extra in (
        ("plain", ""),
        ("weight0", " prior.enabled=true prior.weight=0"),
        ("prior", " prior.enabled=true prior.weight=1 early_stop.forgetting_budget=0.5"),
    ):
        result = train(workdir, tiny_model, ARGS + extra)
        assert result.returncode == 0, result.stderr[-5000:]
        folders[name] = xp_folder(result)
    return folders


def final_weights(folder):
    return torch.load(folder / "checkpoint.th", weights_only=False)["model"]


def test_prior_weight_zero_equals_no_prior(runs):
    plain, weight0 = final_weights(runs["plain"]), final_weights(runs["weight0"])
    assert plain.keys() == weight0.keys()
    assert all(torch.equal(plain[k], weight0[k]) for k in plain)
    history = json.loads((runs["weight0"] / "history.json").read_text())
    assert all(e["train"]["prior_loss"] > 0 for e in history), "the prior term was computed"


def test_prior_preservation_forgets_less_and_the_budget_is_reported(runs):
    without = json.loads((runs["weight0"] / "history.json").read_text())
    with_prior = json.loads((runs["prior"] / "history.json").read_text())
    base = without[-1]["valid"]["prior_ce_base"]
    assert with_prior[-1]["valid"]["prior_ce_base"] == base
    rise_without = without[-1]["valid"]["prior_ce"] / base - 1
    rise_with = with_prior[-1]["valid"]["prior_ce"] / base - 1
    print(f"prior_ce rise over the base: {rise_without:+.1%} without prior, {rise_with:+.1%} with")
    assert rise_with < rise_without / 2, (rise_with, rise_without)
    done = json.loads((runs["prior"] / "done.json").read_text())
    assert done["forgetting_budget"] == 0.5 and done["best_epoch"] == choose_best(with_prior, "ce", 0.5).epoch
    assert "forgetting budget" in done["best_reason"]
    assert "Prior preservation: loss kl" in (runs["prior"] / "solver.log.0").read_text()


def test_replay_gives_the_general_rows_their_share_of_the_sampling_weight():
    from musicgen_finetune.replay import mixed_rows

    own = [{"path": f"own{i}.wav", "weight": w} for i, w in enumerate([1.0, 1.0, 0.5, None])]  # augmented: 0.5
    general = [{"path": f"general{i}.wav", "weight": None} for i in range(5)]
    rows = mixed_rows(own, general, 0.2)
    assert rows[:4] == own
    weights = [r["weight"] or 1.0 for r in rows]
    assert sum(weights[4:]) / sum(weights) == pytest.approx(0.2)
    assert len(set(weights[4:])) == 1


def test_make_train_passes_prior_and_general_and_the_prompts_file_reaches_the_signature(tmp_path):
    import subprocess

    from conftest import REPO

    from musicgen_finetune.launch import preservation_overrides

    dry = subprocess.run(
        ["make", "-n", "train", "MODEL=m", "NAME=n", "PRIOR=1", "PRIOR_PROMPTS=p.txt", "GENERAL=g"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert '--prior --prior-prompts "p.txt"' in dry.stdout and '--general "g"' in dry.stdout, dry.stdout + dry.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# mine\nsoft harp, calm\n\nbrass band march\n")
    assert preservation_overrides(True, str(prompts)) == [
        "prior.enabled=true",
        "prior.prompts=['soft harp, calm','brass band march']",
    ]


# -- the prior's settings, key and the micro-batches of its term, in-process (make mutate) ------------------------


def test_prior_settings_are_read_and_checked():
    cfg = OmegaConf.create(
        {"prior": {"enabled": True, "ratio": 0.5, "prompts": ["a", 3], "seeds": ["1", 2], "other": 1, "generate": None}}
    )
    config = prior.PriorConfig.from_cfg(cfg)
    assert (config.enabled, config.ratio, config.prompts, config.seeds, config.generate) == (
        True,
        0.5,
        ["a", "3"],
        [1, 2],
        {},
    )
    assert config.loss == "kl" and config.weight == 1.0
    with pytest.raises(prior.PriorConfigError, match="prior.prompts and prior.seeds must not be empty"):
        prior.PriorConfig.from_cfg(OmegaConf.create({}))
    good = dict(prompts=["p"], seeds=[0])
    prior.PriorConfig(ratio=1e-9, weight=0.0, **good).check()  # the smallest ratio and weight allowed
    prior.PriorConfig(loss="ce", **good).check()
    for bad, message in (
        (dict(loss="mse"), "prior.loss=mse: use one of kl, ce"),
        (dict(ratio=0.0), "prior.ratio=0.0, prior.weight=1.0: the ratio must be > 0"),
        (dict(weight=-0.1), "prior.weight=-0.1"),
    ):
        with pytest.raises(prior.PriorConfigError, match=message.replace(".", r"\.")):
            prior.PriorConfig(**{**good, **bad}).check()
    with pytest.raises(prior.PriorConfigError) as empty:
        prior.PriorConfig(prompts=["p"], seeds=[]).check()
    assert str(empty.value) == (
        "prior.prompts and prior.seeds must not be empty (PRIOR_PROMPTS=<file> gives your own prompts)."
    )


def test_a_run_wants_the_prior_set_to_train_on_it_or_to_measure_forgetting():
    assert prior.wanted(OmegaConf.create({"prior": {"enabled": True}}))
    assert prior.wanted(OmegaConf.create({"early_stop": {"forgetting_budget": 0.0}}))  # a budget of 0 is a budget
    assert not prior.wanted(OmegaConf.create({"prior": {"enabled": False}, "early_stop": {"forgetting_budget": None}}))
    assert not prior.wanted(OmegaConf.create({"prior": None, "early_stop": None}))


def test_prompts_file_takes_one_prompt_a_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# general prompts\n\n  lofi piano  \njazz trio\n   \n#not this\n")
    assert prior.read_prompts_file(path) == ["lofi piano", "jazz trio"]
    path.write_text("# nothing\n\n")
    with pytest.raises(prior.PriorConfigError, match="holds no prompt"):
        prior.read_prompts_file(path)
    with pytest.raises(prior.PriorConfigError, match="no such file"):
        prior.read_prompts_file(tmp_path / "missing.txt")


def fake_solver(card=100, **cfg):
    from types import SimpleNamespace

    base = {
        "seed": 3,
        "dataset": {"segment_duration": 0.333},
        "conditioners": {"description": {"t5": {"name": "t5-x"}}},
    }
    return SimpleNamespace(
        cfg=OmegaConf.create({**base, **cfg}),
        model=SimpleNamespace(card=card),
        compression_model=SimpleNamespace(frame_rate=50),
        epoch=2,
        grad_accum_steps=3,
        scaler=None,
    )


def test_the_prior_sets_key_holds_what_changes_the_set():
    import audiocraft

    solver = fake_solver()
    config = prior.PriorConfig(prompts=["a", "b"], seeds=[0, 1], teacher_top_k=8, batch_size=4)
    # top-k capped at the codebook's 100 codes; 0.333 s at 50 frames/s: 16.65 -> 17 frames
    settings = {"use_sampling": True, "temp": 1.0, "top_k": 100, "top_p": 0.0, "cfg_coef": 3.0}
    assert prior.key_ingredients(solver, config, "hash-a", store_teacher=True) == {
        "base_lm_hash": "hash-a",
        "text_encoder": "t5-x",
        "prompts": ["a", "b"],
        "seeds": [0, 1],
        "generate": settings,
        "frames": 17,
        "batch_size": 4,
        "teacher_top_k": 8,
        "audiocraft": audiocraft.__version__,
    }
    assert prior.key_ingredients(solver, config, "hash-a", store_teacher=False)["teacher_top_k"] is None
    assert prior.generation_settings(fake_solver(card=2048), config)["top_k"] == 250  # the default, under the card
    assert prior.key_ingredients(fake_solver(conditioners={}), config, "h", True)["text_encoder"] is None
    config.generate = {"use_sampling": False, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "cfg_coef": 1.5}
    assert prior.generation_settings(solver, config) == {
        "use_sampling": False,
        "temp": 0.7,
        "top_k": 20,
        "top_p": 0.9,
        "cfg_coef": 1.5,
    }


@pytest.mark.parametrize("rows, accum, sizes", [(5, 3, [2, 2, 1]), (4, 2, [2, 2]), (2, 10, [1, 1]), (3, 1, [3])])
def test_the_prior_term_is_its_weight_times_the_mean_loss_over_the_updates_rows(rows, accum, sizes):
    """Whatever the micro-batches, the term's loss and gradient are those of the mean over the update's rows."""
    from pathlib import Path

    prior_set = prior.PriorSet(torch.zeros(10, 1, 1), ["p"] * 10, [0] * 10, 1.0, Path("."))
    term = prior.PriorTerm(prior.PriorConfig(ratio=1.0, weight=0.5, prompts=["p"], seeds=[0]), prior_set, True, False)
    solver = fake_solver()
    solver.grad_accum_steps = accum
    w = torch.nn.Parameter(torch.tensor(1.0))
    parts = []

    def loss(given, part):
        assert given is solver
        parts.append(part.tolist())
        return w * (part.float() + 1).mean(), (part.float() * 2).mean()

    term.loss = loss
    chosen = term.items_for_step(solver, 1, rows)
    out = term.backward(solver, 1, rows)
    assert [len(p) for p in parts] == sizes and sum(parts, []) == chosen.tolist()
    mean = (chosen.float() + 1).mean().item()
    assert out["prior_loss"] == pytest.approx(mean) and out["prior_ce"] == pytest.approx(
        2 * chosen.float().mean().item()
    )
    assert w.grad.item() == pytest.approx(0.5 * mean)
    w.grad = None
    solver.scaler = mock.Mock(scale=lambda x: x * 8)  # fp16's loss scaling multiplies the gradient, not the loss
    assert term.backward(solver, 1, rows)["prior_loss"] == pytest.approx(mean)
    assert w.grad.item() == pytest.approx(8 * 0.5 * mean)
