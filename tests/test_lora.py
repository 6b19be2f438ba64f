"""LoRA adapters on the tiny MusicGen LM: exactness at injection, q/k/v coverage, training, merge, save/load.

Tolerances (float32 on CPU): merged vs adapter logits within 1e-5 (the same sums in another order); unmerge gives
the base back within 1e-6 (one add and one subtract of a small delta); everything else is compared exactly.
"""

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from musicgen_finetune import environment, lora, patches

environment.prepare()
patches.apply()

MERGE_ATOL = 1e-5
UNMERGE_ATOL = 1e-6
DEFAULT_RANK, DEFAULT_ALPHA = 12, 24.0  # LoraConfig's defaults, written out: the update is scaled by alpha / rank


def build_lm(snapshot, pretrained=True, seed=0):
    from audiocraft.models import builders

    cfg, best_state = snapshot
    torch.manual_seed(seed)
    lm = builders.get_lm_model(cfg)
    if pretrained:
        lm.load_state_dict({k: v.float() for k, v in best_state.items()})
    return lm.eval()


@pytest.fixture(scope="module")
def inputs(snapshot):
    """Codes [B, K, S] and precomputed condition tensors, shared by every LM built from the snapshot."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = build_lm(snapshot)
    torch.manual_seed(1)
    codes = torch.randint(0, lm.card, (2, lm.num_codebooks, 12))
    attributes = [
        ConditioningAttributes(text={"description": caption})
        for caption in ("hip hop 808 beat with trap drums", "lofi chill instrumental, soft keys")
    ]
    with torch.no_grad():
        conditions = lm.condition_provider(lm.condition_provider.tokenize(attributes))
    return codes, conditions


def logits(lm, inputs):
    codes, conditions = inputs
    return lm(codes, [], condition_tensors=conditions)


def randomize_adapters(model, seed=2, std=0.05):
    """Nonzero B everywhere (A is already random), so every adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def attention_modules(lm, layer=0):
    transformer_layer = lm.transformer.layers[layer]
    return {"self_attn": transformer_layer.self_attn, "cross_attention": transformer_layer.cross_attention}


def small_transformer(**kwargs):
    from audiocraft.modules.transformer import StreamingTransformer

    torch.manual_seed(3)
    kwargs = {"d_model": 16, "num_heads": 4, "num_layers": 2, "dropout": 0.0, "causal": True, "custom": True, **kwargs}
    return StreamingTransformer(**kwargs).eval()


def test_injection_keeps_logits_bit_identical(snapshot, inputs):
    lm = build_lm(snapshot)
    with torch.no_grad():
        reference = logits(lm, inputs)
        names = lora.inject(lm, lora.LoraConfig(enabled=True, targets="all"))
        adapted = logits(lm, inputs)
    assert torch.equal(adapted, reference)
    num_layers, num_heads = len(lm.transformer.layers), len(lm.linears)
    # per layer: q, k, v and out_proj of both attentions, plus linear1 and linear2; then every output head
    assert len(names) == len(set(names)) == num_layers * 10 + num_heads
    assert {
        "transformer.layers.0.self_attn.q",
        "transformer.layers.1.cross_attention.v",
        "transformer.layers.0.cross_attention.out_proj",
        "transformer.layers.1.linear2",
        f"linears.{num_heads - 1}",
    } <= set(names)
    assert names == lora.adapted_names(lm)
    assert type(lm.transformer.layers[0].self_attn).__name__ == "LoRAStreamingMultiheadAttention"


@pytest.mark.parametrize("attention", ["self_attn", "cross_attention"])
def test_each_of_q_k_v_gets_its_own_delta_in_the_forward(snapshot, inputs, attention):
    """Setting one adapter's B changes only its slice of in_proj_weight, and the forward uses exactly that."""
    lm = build_lm(snapshot)
    lora.inject(lm, lora.LoraConfig(enabled=True))
    module = attention_modules(lm)[attention]
    base = module._parameters["in_proj_weight"].detach().clone()
    dim = base.shape[0] // 3
    with torch.no_grad():
        base_logits = logits(lm, inputs)
    seen_deltas = []
    for index, projection in enumerate(lora.FUSED_PROJECTIONS):
        adapter = module.lora_in_proj[projection]
        with torch.no_grad():
            adapter.lora_B.normal_(std=0.05)
            effective = module.in_proj_weight.detach().clone()
            expected = (adapter.lora_B @ adapter.lora_A) * (DEFAULT_ALPHA / DEFAULT_RANK)  # the paper's scaling
            adapted_logits = logits(lm, inputs)
            adapter.lora_B.zero_()
        rows = slice(index * dim, (index + 1) * dim)
        delta = effective - base
        assert delta[rows].abs().max() > 0, projection
        assert torch.allclose(delta[rows], expected, atol=UNMERGE_ATOL, rtol=0), projection
        others = torch.ones(base.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(effective[others], base[others]), f"{projection} changed another projection's rows"
        seen_deltas.append(delta[rows])
        # The forward saw exactly that weight: the same logits as an unadapted model holding it as its base.
        plain = build_lm(snapshot)
        with torch.no_grad():
            attention_modules(plain)[attention].in_proj_weight.copy_(effective)
            assert torch.allclose(adapted_logits, logits(plain, inputs), atol=MERGE_ATOL, rtol=0), projection
        assert not torch.equal(adapted_logits, base_logits), projection
    assert not torch.equal(seen_deltas[0], seen_deltas[1]) and not torch.equal(seen_deltas[1], seen_deltas[2])


def test_grouped_kv_splits_q_k_v_by_their_own_sizes():
    """With kv_repeat > 1 the fused rows are [q: dim, k: dim / repeat, v: dim / repeat], not thirds."""
    transformer = small_transformer(num_layers=1, kv_repeat=2)
    lora.inject(transformer, lora.LoraConfig(enabled=True, targets=("self_attn.k",)))
    module = transformer.layers[0].self_attn
    base = module._parameters["in_proj_weight"].detach().clone()
    assert module._lora_split_sizes() == [16, 8, 8] and base.shape[0] == 32
    with torch.no_grad():
        module.lora_in_proj["k"].lora_B.normal_()
    changed = (module.in_proj_weight - base).abs().sum(dim=1) > 0
    assert changed[16:24].all() and not changed[:16].any() and not changed[24:].any()
    x = torch.randn(2, 5, 16)
    assert transformer(x).isfinite().all()


def test_only_adapters_change_when_training(snapshot, inputs):
    lm = build_lm(snapshot)
    lora.inject(lm, lora.LoraConfig(enabled=True, rank=4, dropout=0.1, targets="all"))
    trainable, total = lora.freeze_base(lm)
    params = lora.adapter_parameters(lm)
    assert trainable == sum(p.numel() for p in params.values()) and total == sum(p.numel() for p in lm.parameters())
    base_before = {k: v.clone() for k, v in lm.state_dict().items() if not lora.is_adapter_key(k)}
    adapters_before = {k: v.detach().clone() for k, v in params.items()}
    # no weight decay: an adapter only moves if its gradient reaches it
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    codes, conditions = inputs
    lm.train()
    for _ in range(3):
        out = lm(codes, [], condition_tensors=conditions)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), codes.roll(1, dims=-1).reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.isfinite()
    for name, tensor in lm.state_dict().items():
        if lora.is_adapter_key(name):
            assert not torch.equal(tensor, adapters_before[name]), f"adapter {name} did not train"
        else:
            assert torch.equal(tensor, base_before[name]), f"base tensor {name} changed"
    assert all(p.grad is None for name, p in lm.named_parameters() if not lora.is_adapter_key(name))


def test_trainable_fraction_on_the_tiny_model(snapshot):
    lm = build_lm(snapshot)
    config = lora.LoraConfig(enabled=True, rank=2)  # dim 64: rank 2 is what rank 32 is to musicgen-small's 1024
    names = lora.inject(lm, config)
    trainable, total = lora.freeze_base(lm)
    # every default target is a dim x dim projection: rank * (dim + dim) adapter parameters each
    assert trainable == len(names) * config.rank * 2 * lm.dim
    assert trainable / total < 0.05, (trainable, total)


def test_trainable_fraction_on_musicgen_small_shapes(snapshot):
    """musicgen-small's architecture (dim 1024, 24 layers, card 2048), built on the meta device: shapes, no memory.

    A lookup-table conditioner of T5-base's width (768) stands in for T5, which the meta device cannot hold.
    """
    from audiocraft.models import builders

    cfg = copy.deepcopy(snapshot[0])
    cfg.transformer_lm.update(dim=1024, num_heads=16, num_layers=24, card=2048)
    cfg.conditioners.description = {"model": "lut", "lut": {"n_bins": 2, "dim": 768, "tokenizer": "noop"}}
    cfg.device = "meta"
    lm = builders.get_lm_model(cfg)
    config = lora.LoraConfig(enabled=True)
    names = lora.inject(lm, config)
    trainable, total = lora.freeze_base(lm)
    assert len(names) == 24 * len(lora.ATTENTION_TARGETS)
    assert trainable == len(names) * config.rank * (1024 + 1024)
    # rank 12 on the 8 attention projections: about 1.1% of the LM (4.7M of 425M); rank 8 would be 0.75%.
    assert trainable / total < 0.02, (trainable, total)


def test_merge_matches_adapters_and_unmerge_restores_the_base(snapshot, inputs):
    lm = build_lm(snapshot)
    original = {k: v.clone() for k, v in lm.state_dict().items()}
    lora.inject(lm, lora.LoraConfig(enabled=True, targets="all"))
    randomize_adapters(lm)
    with torch.no_grad():
        adapted = logits(lm, inputs)
        assert not torch.allclose(adapted, logits(build_lm(snapshot), inputs), atol=1e-3)
        lora.merge(lm)
        merged_state = {k: v.clone() for k, v in lm.state_dict().items()}
        merged = logits(lm, inputs)
        lora.merge(lm)  # idempotent: nothing is added twice
        assert all(torch.equal(v, merged_state[k]) for k, v in lm.state_dict().items())
        assert torch.allclose(merged, adapted, atol=MERGE_ATOL, rtol=0), (merged - adapted).abs().max()
        # The merged base keys alone are the fine-tuned model: a plain LM holding them gives the same logits.
        plain = build_lm(snapshot)
        plain.load_state_dict({k: v for k, v in merged_state.items() if not lora.is_adapter_key(k)})
        assert torch.equal(logits(plain, inputs), merged)
        lora.unmerge(lm)
        lora.unmerge(lm)  # idempotent
        for name, tensor in lm.state_dict().items():
            if not lora.is_adapter_key(name):
                assert torch.allclose(tensor, original[name], atol=UNMERGE_ATOL, rtol=0), name
        assert torch.allclose(logits(lm, inputs), adapted, atol=MERGE_ATOL, rtol=0)
    assert not lora.is_merged(lm)


def test_base_keys_are_unchanged_and_pretrained_weights_load_after_injection(snapshot, inputs):
    """AudioCraft builds the optimizer, then loads pretrained weights by key: into the injected model."""
    _, best_state = snapshot
    with torch.no_grad():
        reference = logits(build_lm(snapshot), inputs)
    lm = build_lm(snapshot, pretrained=False, seed=7)
    lora.inject(lm, lora.LoraConfig(enabled=True, targets="all"))
    keys = set(lm.state_dict())
    adapter_keys = {k for k in keys if lora.is_adapter_key(k)}
    assert keys - adapter_keys == set(best_state)
    assert adapter_keys == set(lora.adapter_state_dict(lm)) == set(lora.adapter_parameters(lm))
    assert "transformer.layers.0.self_attn.lora_in_proj.q.lora_A" in adapter_keys
    assert "transformer.layers.1.cross_attention.out_proj.lora_B" in adapter_keys
    assert "linears.0.lora_A" in adapter_keys
    optimizer = torch.optim.AdamW(lora.adapter_parameters(lm).values())
    result = lm.load_state_dict({k: v.float() for k, v in best_state.items()}, strict=False)
    assert set(result.missing_keys) == adapter_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(logits(lm, inputs), reference)
    # loading copies into the existing parameters: the optimizer still holds the model's adapters
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in lora.adapter_parameters(lm).values()]


def test_base_hash_is_over_float32_values_and_ignores_adapters(snapshot):
    _, best_state = snapshot
    lm = build_lm(snapshot)
    digest = lora.base_model_hash(lm)
    assert digest == lora.base_model_hash(best_state)  # fp16 snapshot == the float32 model loaded from it
    lora.inject(lm, lora.LoraConfig(enabled=True))
    randomize_adapters(lm)
    assert lora.base_model_hash(lm) == digest
    lora.merge(lm)
    with pytest.raises(ValueError, match="unmerge"):
        lora.base_model_hash(lm)
    lora.unmerge(lm)
    with torch.no_grad():
        lm.linears[0].weight[0, 0] += 1e-3
    assert lora.base_model_hash(lm) != digest


def test_save_and_load_round_trip_and_refuse_another_base(snapshot, inputs, tmp_path):
    lm = build_lm(snapshot)
    config = lora.LoraConfig(enabled=True, rank=3, alpha=5.0, dropout=0.2, targets="attention_ff", layers=[1])
    names = lora.inject(lm, config)
    assert all(name.startswith("transformer.layers.1.") for name in names)
    randomize_adapters(lm)
    path = lora.save_adapters(lm, tmp_path / "adapters.safetensors", config)
    saved = json.loads(lora.config_path(path).read_text())
    assert lora.config_path(path).name == "adapters.safetensors.json"
    assert {k: saved[k] for k in ("rank", "alpha", "dropout", "layers")} == {
        "rank": 3,
        "alpha": 5.0,
        "dropout": 0.2,
        "layers": [1],
    }
    assert saved["targets"] == list(config.targets) and saved["adapted"] == names
    assert saved["base_hash"] == lora.base_model_hash(lm)
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == set(lora.adapter_state_dict(lm))
    with torch.no_grad():
        expected = logits(lm, inputs)

    fresh = build_lm(snapshot)
    loaded = lora.load_adapters(fresh, path, expected_base_hash=saved["base_hash"])
    assert loaded == config
    with torch.no_grad():
        assert torch.equal(logits(fresh, inputs), expected)

    other = build_lm(snapshot)
    with torch.no_grad():
        other.transformer.layers[0].linear1.weight[0, 0] += 1e-3
    other_hash = lora.base_model_hash(other)
    with pytest.raises(lora.AdapterMismatchError) as refused:
        lora.load_adapters(other, path)
    message = str(refused.value)
    assert saved["base_hash"] in message and other_hash in message and str(path) in message
    assert not lora.adapted_names(other)  # refused before injecting anything
    with pytest.raises(lora.AdapterMismatchError, match="expected_base_hash"):
        lora.load_adapters(build_lm(snapshot), path, expected_base_hash=other_hash)


@pytest.mark.parametrize(
    "values, named",
    [
        ({"targets": ["self_attn.q", "self_attn.query"]}, ["'self_attn.query'", "self_attn.q", "linears"]),
        ({"targets": "everything"}, ["'everything'", "attention_ff"]),
        ({"rank": 0}, ["rank=0"]),
        ({"rank": 2.5}, ["rank=2.5"]),
        ({"alpha": 0}, ["alpha=0"]),
        ({"dropout": 1.0}, ["dropout=1.0", "[0, 1)"]),
        ({"dropout": -0.1}, ["dropout=-0.1"]),
        ({"layers": [0, -1]}, ["-1"]),
        ({"rnak": 8}, ["'rnak'", "rank"]),
    ],
)
def test_config_errors_name_the_bad_value(values, named):
    with pytest.raises(ValueError) as error:
        lora.LoraConfig.from_dict(values)
    for text in named:
        assert text in str(error.value), (text, str(error.value))


def test_config_from_omegaconf_and_presets():
    config = lora.LoraConfig.from_dict(
        OmegaConf.create({"enabled": True, "rank": 8, "targets": "attention_ff", "layers": [3, 1, 3]})
    )
    assert config.targets == lora.PRESETS["attention_ff"] and config.layers == [1, 3] and config.scale == 3.0
    assert lora.LoraConfig.from_dict(config.to_dict()) == config
    assert lora.LoraConfig().targets == lora.PRESETS["attention"] and not lora.LoraConfig().enabled


def test_inject_errors_name_the_target_or_layer(snapshot):
    lm = build_lm(snapshot)
    with pytest.raises(ValueError, match=r"lora.layers has \[5\].* 2 transformer layers"):
        lora.inject(lm, lora.LoraConfig(layers=[0, 5]))
    assert not lora.adapted_names(lm)  # nothing changed by a refused injection
    without_cross = small_transformer()
    with pytest.raises(ValueError, match="'cross_attention.q'.* match nothing"):
        lora.inject(without_cross, lora.LoraConfig(targets=("self_attn.q", "cross_attention.q")))
    with pytest.raises(ValueError, match="'linears'"):
        lora.inject(without_cross, lora.LoraConfig(targets=("linears",)))
    with pytest.raises(ValueError, match="nn.MultiheadAttention.*memory_efficient=true"):
        lora.inject(small_transformer(custom=False), lora.LoraConfig(targets=("self_attn.v",)))
    lora.inject(lm, lora.LoraConfig())
    with pytest.raises(RuntimeError, match="already has LoRA adapters"):
        lora.inject(lm, lora.LoraConfig())


@pytest.mark.parametrize(
    "targets, layers",
    [("all", None), (list(lora.ALLOWED_TARGETS), [1]), ("self_attention", [0]), ([lora.TEXT_PROJECTION_TARGET], None)],
)
def test_adapter_shapes_are_those_inject_makes(snapshot, targets, layers):
    """What converters check adapters against without building a model (lora.adapter_shapes, adapter_tensor_names)
    is what inject builds."""
    config = lora.LoraConfig(enabled=True, rank=3, targets=targets, layers=layers)
    lm = build_lm(snapshot)
    names = lora.inject(lm, config)
    injected = {name: tuple(p.shape) for name, p in lora.adapter_parameters(lm).items()}
    assert lora.adapter_shapes(config, snapshot[1]) == injected
    assert {key for name in names for key in lora.adapter_tensor_names(name)} == set(injected)


def test_the_text_projection_target(snapshot):
    """description.output_proj (transformers' enc_to_dec_proj) acts on the conditions: exact at injection, then
    changing them, and merged like the others."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = build_lm(snapshot)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, 8), generator=torch.Generator().manual_seed(4))
    tokens = lm.condition_provider.tokenize([ConditioningAttributes(text={"description": "808 beat"})])

    def forward():
        with torch.no_grad():
            return lm(codes, [], condition_tensors=lm.condition_provider(tokens))

    base = forward()
    assert lora.inject(lm, lora.LoraConfig(enabled=True, targets=[lora.TEXT_PROJECTION_TARGET])) == [
        lora.TEXT_PROJECTION
    ]
    assert torch.equal(forward(), base)
    randomize_adapters(lm)
    adapted = forward()
    assert not torch.allclose(adapted, base, atol=1e-3)
    lora.merge(lm)
    assert torch.allclose(forward(), adapted, atol=MERGE_ATOL, rtol=0)


def test_continuing_adapters_needs_their_settings():
    saved = lora.LoraConfig(enabled=True, rank=4, alpha=8, targets=["self_attn.q", "linear1"])
    lora.check_continuable(
        saved, lora.LoraConfig(enabled=True, rank=4, alpha=8, targets=["linear1", "self_attn.q"]), "x"
    )
    with pytest.raises(lora.LoraConfigError) as error:
        lora.check_continuable(saved, lora.LoraConfig(enabled=True, rank=8, alpha=8, targets="attention"), "a/b")
    message = str(error.value)
    assert "lora.init_from=a/b has rank 4 (this run: 8), targets [self_attn.q,linear1]" in message
    assert "ARGS='lora.rank=4 lora.alpha=8.0 lora.targets=[self_attn.q,linear1] lora.layers=null'" in message


def test_fused_dropout_is_resampled_in_training_and_off_in_eval(snapshot):
    lm = build_lm(snapshot)
    lora.inject(lm, lora.LoraConfig(enabled=True, dropout=0.5))
    randomize_adapters(lm)
    module = lm.transformer.layers[0].self_attn
    with torch.no_grad():
        assert torch.equal(module.in_proj_weight, module.in_proj_weight)  # eval: deterministic
        lm.train()
        assert not torch.equal(module.in_proj_weight, module.in_proj_weight)


def test_default_rank_and_alpha_are_the_documented_ones():
    config = lora.LoraConfig(enabled=True)
    assert (config.rank, config.alpha) == (DEFAULT_RANK, DEFAULT_ALPHA)


def test_linear_adapter_adds_x_a_b_times_alpha_over_rank(snapshot):
    """LoRALinear (out_proj, linear1/2, the heads), computed by hand: y = x W^T + b + (x A^T B^T) alpha / r."""
    lm = build_lm(snapshot)
    lora.inject(lm, lora.LoraConfig(enabled=True, rank=4, alpha=10.0, targets=["linear1"], dropout=0.0))
    randomize_adapters(lm)
    layer = lm.transformer.layers[0].linear1
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)
        expected = expected + (x @ layer.lora_A.T @ layer.lora_B.T) * (10.0 / 4)
        assert torch.allclose(layer(x), expected, atol=1e-6, rtol=0)


def test_fused_dropout_drops_input_features_and_rescales_the_kept_ones(snapshot):
    """In training, each draw keeps a column of the q/k/v update (an input feature) with probability 1 - p and
    scales it by 1 / (1 - p), so the update is the same on average as without dropout."""
    p = 0.3
    lm = build_lm(snapshot)
    lora.inject(lm, lora.LoraConfig(enabled=True, dropout=p))
    randomize_adapters(lm)
    adapter = lm.transformer.layers[0].self_attn.lora_in_proj["q"].train()
    with torch.no_grad():
        full = (adapter.lora_B @ adapter.lora_A) * (DEFAULT_ALPHA / DEFAULT_RANK)
        torch.manual_seed(5)
        draws = torch.stack([adapter.delta_weight() for _ in range(400)])
    kept = draws.abs().sum(dim=1) > 0  # [draws, input features]: a dropped feature's column is exactly zero
    for draw, keep in zip(draws[:20], kept[:20], strict=True):
        assert torch.allclose(draw[:, keep], full[:, keep] / (1 - p), atol=1e-6, rtol=0)
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02
    assert torch.allclose(draws.mean(dim=0), full, atol=0.1 * full.abs().max().item(), rtol=0)


def test_fused_delta_is_computed_once_per_forward(snapshot, inputs, monkeypatch):
    """Cross-attention reads in_proj_weight four times a forward: one computation (and one dropout mask) serves all."""
    lm = build_lm(snapshot)
    names = lora.inject(lm, lora.LoraConfig(enabled=True))
    calls = []
    delta_weight = lora.FusedProjectionAdapter.delta_weight
    monkeypatch.setattr(
        lora.FusedProjectionAdapter,
        "delta_weight",
        lambda self, *args, **kwargs: calls.append(self) or delta_weight(self, *args, **kwargs),
    )
    lm.train()
    logits(lm, inputs)
    fused = [name for name in names if name.endswith((".q", ".k", ".v"))]
    assert len(calls) == len(set(map(id, calls))) == len(fused)


def test_autocast_bfloat16(snapshot, inputs):
    lm = build_lm(snapshot)
    lora.inject(lm, lora.LoraConfig(enabled=True, targets="all"))
    lora.freeze_base(lm)
    randomize_adapters(lm)
    lm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(lm, inputs)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    out.float().square().mean().backward()
    grads = [p.grad for p in lora.adapter_parameters(lm).values()]
    assert all(g is not None and g.isfinite().all() and g.dtype == torch.float32 for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def test_activation_checkpointing_gives_the_same_gradients(snapshot, inputs):
    """transformer.checkpointing='torch' recomputes each layer in backward; the dropout masks must match."""
    grads = []
    for checkpointing in ("none", "torch"):
        lm = build_lm(snapshot)
        lora.inject(lm, lora.LoraConfig(enabled=True, dropout=0.3, targets="all"))
        lora.freeze_base(lm)
        randomize_adapters(lm)
        lm.transformer.checkpointing = checkpointing
        lm.train()
        torch.manual_seed(5)
        logits(lm, inputs).square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in lora.adapter_parameters(lm).items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5), name
        assert grads[0][name].abs().sum() > 0, name


def test_streaming_matches_the_full_sequence_with_cross_attention():
    """Upstream's streaming check (tests/modules/test_transformer.py), on a transformer with active adapters."""
    transformer = small_transformer(cross_attention=True)
    cross_src = torch.randn(2, 5, 16)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        base = transformer(x, cross_attention_src=cross_src)
        lora.inject(transformer, lora.LoraConfig(enabled=True, targets="attention_ff"))
        assert torch.equal(transformer(x, cross_attention_src=cross_src), base)
        randomize_adapters(transformer, std=0.2)
        full = transformer(x, cross_attention_src=cross_src)
        assert not torch.allclose(full, base, atol=1e-3)
        steps = []
        with transformer.streaming():
            for k in range(x.shape[1]):
                steps.append(transformer(x[:, k : k + 1], cross_attention_src=cross_src))
            state = {k: v.clone() for k, v in transformer.get_streaming_state().items()}
            again = transformer(x[:, :1], cross_attention_src=cross_src)
            transformer.set_streaming_state(state)
            assert torch.equal(transformer(x[:, :1], cross_attention_src=cross_src), again)
        streamed = torch.cat(steps, dim=1)
    assert (torch.norm(streamed - full) / torch.norm(full)) < 1e-6
    for clone in (copy.deepcopy(transformer), pickle.loads(pickle.dumps(transformer))):
        with torch.no_grad():
            assert torch.equal(clone(x, cross_attention_src=cross_src), full)
