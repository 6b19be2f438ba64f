"""The token cache and the frozen-T5 output cache (musicgen_finetune/caches.py): same results, fewer encodings.

Tolerances: tokens must be exactly equal with and without the cache; T5 hidden states at valid positions and the
cross-entropy within 1e-5 (absolute, fp32 CPU; in practice they are equal); the per-epoch train/valid ce of two
tiny `dora run`s, with and without the caches, within a relative 1e-5.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DATASET, TRAIN, run_tool, xp_folder

from musicgen_finetune import caches, environment

environment.prepare()

TOLERANCE = 1e-5
CAPTIONS = ["hip hop 808 beat with trap drums, hard kick with long decay, crisp snare", "", "lofi chill", None]


@pytest.fixture(scope="module")
def musicgen(tiny_model):
    """AudioCraft's MusicGen for the tiny model, on CPU. Tests that install a cache on it put the original back."""
    from musicgen_finetune.generate import load

    return load(tiny_model, device="cpu")


def segment_infos(dataset: Path, count: int):
    """The first `count` training segments as the dataset gives them: audio [B, C, T] and SegmentInfos."""
    from audiocraft.data.audio import audio_read
    from audiocraft.data.audio_dataset import AudioMeta, SegmentInfo

    lines = (dataset / "train" / "data.jsonl").read_text().splitlines()[:count]
    audio, infos = [], []
    for line in lines:
        meta = AudioMeta.from_dict(json.loads(line))
        wav, rate = audio_read(meta.path)
        audio.append(wav)
        infos.append(
            SegmentInfo(
                meta,
                seek_time=0.0,
                n_frames=wav.shape[-1],
                total_frames=wav.shape[-1],
                sample_rate=rate,
                channels=wav.shape[0],
            )
        )
    return torch.stack(audio), infos


def cross_entropy(musicgen, tokens: torch.Tensor, captions) -> torch.Tensor:
    """Upstream's training loss for `tokens` under `captions`, as the solver computes it."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver

    lm = musicgen.lm
    attributes = [ConditioningAttributes(text={"description": caption}) for caption in captions]
    with torch.no_grad():
        conditions = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        output = lm.compute_predictions(tokens, [], conditions)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, output.logits, tokens, output.mask)
    return ce


def uninstall_text_cache(musicgen) -> None:
    for conditioner in musicgen.lm.condition_provider.conditioners.values():
        if isinstance(getattr(conditioner, "t5", None), caches.CachedT5Encoder):
            conditioner.__dict__["t5"] = conditioner.t5.t5


def test_cached_tokens_and_texts_give_the_same_loss(musicgen, dataset, tmp_path):
    audio, infos = segment_infos(dataset, 4)
    compression = musicgen.compression_model
    with torch.no_grad():
        reference_tokens, _ = compression.encode(audio)
    reference_ce = cross_entropy(musicgen, reference_tokens, CAPTIONS)

    cached = caches.CachedCompressionModel(compression, caches.TokenCache(tmp_path, compression, 1.0))
    text_cache = caches.install_text_cache(musicgen.lm.condition_provider, max_mb=16)["description"]
    try:
        for expected_hits in (0, 4):  # first pass encodes and stores, second reads
            with cached.serving(infos), torch.no_grad():
                tokens, scale = cached.encode(audio)
            assert scale is None and tokens.dtype == reference_tokens.dtype
            assert torch.equal(tokens, reference_tokens)
            assert cached.counter.take() == (expected_hits, 4 - expected_hits)
            ce = cross_entropy(musicgen, tokens, CAPTIONS)
            assert abs(ce.item() - reference_ce.item()) <= TOLERANCE
        # 2 captions need T5 the first time; empty/None ones never do
        assert text_cache.counter.take() == (2 + 4, 2)
        with torch.no_grad():  # outside `serving` (generation prompts, evaluation): the model itself, no cache
            assert torch.equal(cached.encode(audio)[0], reference_tokens) and cached.counter.take() == (0, 0)
    finally:
        uninstall_text_cache(musicgen)
    assert cached.cache.count() == 4


def test_t5_cache_only_keys_right_padded_rows():
    assert caches.valid_lengths(torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])) == [2, 0, 3]
    assert caches.valid_lengths(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding: T5 runs uncached


def test_t5_cache_matches_uncached_outputs_and_hits_the_second_time(musicgen):
    conditioner = musicgen.lm.condition_provider.conditioners["description"]
    texts = CAPTIONS + ["lofi chill", "ambient pad with slow evolving synths"]
    with torch.no_grad():
        inputs = conditioner.tokenize(texts)
        reference_hidden = conditioner.t5(**inputs).last_hidden_state
        reference, reference_mask = conditioner(inputs)
    valid = inputs["attention_mask"].bool()
    assert valid.sum(1).tolist()[1] == 0 and len(set(valid.sum(1).tolist())) > 2  # empty and various lengths
    cache = caches.install_text_cache(musicgen.lm.condition_provider, max_mb=16)["description"]
    try:
        for expected in ((3, 3), (6, 0)):  # 3 distinct texts miss once; "", None and the repeat never run T5
            with torch.no_grad():
                inputs = conditioner.tokenize(texts)
                output, mask = conditioner(inputs)
                assert cache.counter.take() == expected
                hidden = conditioner.t5(**inputs).last_hidden_state  # what upstream's forward got
                cache.counter.take()
            assert hidden.shape == reference_hidden.shape
            torch.testing.assert_close(hidden[valid], reference_hidden[valid], rtol=0, atol=TOLERANCE)
            torch.testing.assert_close(output, reference, rtol=0, atol=TOLERANCE)
            assert torch.equal(mask, reference_mask)
    finally:
        uninstall_text_cache(musicgen)


def test_t5_cache_is_not_installed_on_a_fine_tuned_t5(musicgen, monkeypatch):
    conditioner = musicgen.lm.condition_provider.conditioners["description"]
    monkeypatch.setattr(conditioner, "finetune", True)
    assert caches.install_text_cache(musicgen.lm.condition_provider, max_mb=16) == {}
    assert not isinstance(conditioner.t5, caches.CachedT5Encoder)


def test_t5_cache_drops_least_recently_used_beyond_its_budget(musicgen):
    conditioner = musicgen.lm.condition_provider.conditioners["description"]
    cache = caches.install_text_cache(musicgen.lm.condition_provider, max_mb=16)["description"]
    try:
        cache.max_bytes = 1  # keeps one entry only
        for text in ("lofi chill", "hip hop 808 beat", "lofi chill"):
            conditioner(conditioner.tokenize([text]))
        assert cache.counter.take() == (0, 3) and len(cache.entries) == 1
    finally:
        uninstall_text_cache(musicgen)


def test_token_cache_key_changes_with_weights_and_segment_duration(musicgen, tmp_path):
    from audiocraft.models import loaders

    from musicgen_finetune.models.tiny import write_compression_model

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    write_compression_model(other_dir, seed=1, codebook_size=64, num_codebooks=4)
    other = loaders.load_compression_model(str(other_dir), device="cpu")
    root = tmp_path / "tokens"
    compression = musicgen.compression_model
    base = caches.TokenCache(root, compression, 1.0)
    assert caches.TokenCache(root, compression, 1.0).folder == base.folder  # stable
    assert caches.TokenCache(root, other, 1.0).folder != base.folder
    assert caches.TokenCache(root, compression, 2.0).folder != base.folder
    assert json.loads((base.folder / "key.json").read_text()) == base.ingredients
    assert "1 s segments" in base.describe() and f"at {base.folder}" in base.describe()


def test_changed_segment_file_misses(musicgen, dataset, tmp_path):
    """An entry names the file's path, size and mtime: a rewritten file is encoded again, never served stale."""
    from safetensors.torch import load_file

    audio, infos = segment_infos(dataset, 1)
    wav = tmp_path / "segment.wav"
    shutil.copy(infos[0].meta.path, wav)
    info = infos[0]
    info.meta.path = str(wav)
    cache = caches.TokenCache(tmp_path / "tokens", musicgen.compression_model, 1.0)
    assert cache.load(info) is None
    tokens = torch.randint(0, 64, (4, 50))
    cache.store(info, tokens)
    stored = cache.entry_path(info)
    assert torch.equal(load_file(stored)["tokens"], tokens.short()) and load_file(stored)["tokens"].dtype == torch.int16
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # renamed into place: no temp file left
    assert torch.equal(cache.load(info), tokens.short())
    stat = wav.stat()
    os.utime(wav, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, touched
    assert cache.load(info) is None
    wav.write_bytes(wav.read_bytes()[:-64])  # other content and size
    assert cache.load(info) is None
    moved = type(info)(info.meta, 0.25, info.n_frames, info.total_frames, info.sample_rate, info.channels)
    assert cache.entry_path(moved) != cache.entry_path(info)  # another seek_time, another entry


def test_two_writers_of_one_entry_leave_a_whole_one(musicgen, dataset, tmp_path):
    """Two training processes can encode the same segment at once (GPUS=2): whichever rename lands last, the entry
    is one writer's whole tokens, never a mix or a half file."""
    import multiprocessing

    _, infos = segment_infos(dataset, 1)
    cache = caches.TokenCache(tmp_path / "tokens", musicgen.compression_model, 1.0)
    writes = [torch.full((4, 50), value, dtype=torch.long) for value in (7, 9)]

    def write_many(tokens):
        for _ in range(40):
            cache.store(infos[0], tokens)

    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_many, args=(tokens,)) for tokens in writes]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    entry = cache.load(infos[0])
    assert any(torch.equal(entry, tokens.short()) for tokens in writes)
    assert [p.name for p in cache.entry_path(infos[0]).parent.iterdir()] == [cache.entry_path(infos[0]).name]


def test_cache_settings_are_configured_but_not_in_the_signature():
    from musicgen_finetune.config import compose
    from musicgen_finetune.train import main

    cfg = compose(["solver=finetune/cpu_tiny"])
    assert cfg.token_cache.enabled and cfg.token_cache.path is None and cfg.text_cache.enabled
    assert cfg.cache.path is None  # upstream's batch cache is left alone (off)
    base = ["solver=finetune/cpu_tiny", "datasource.train=/d/train", "datasource.valid=/d/valid"]
    off = ["token_cache.enabled=false", "token_cache.path=/x", "text_cache.enabled=false"]
    assert main.get_xp([*base, *off]).sig == main.get_xp(base).sig


def test_training_with_and_without_caches_gives_the_same_losses(first_run, workdir, tiny_model):
    """`first_run` is the default tiny run, caches on. The same run with both off, in its own output folder
    (the cache settings are not in the signature, so it would otherwise resume first_run's experiment)."""
    output = workdir / "uncached"
    uncached = run_tool(
        [
            TRAIN,
            "--model",
            str(tiny_model),
            "--name",
            DATASET,
            "--preset",
            "finetune/cpu_tiny",
            "--args",
            "token_cache.enabled=false text_cache.enabled=false",
        ],
        workdir,
        extra_env={"MUSICGEN_FT_OUTPUT": str(output), "AUDIOCRAFT_DORA_DIR": str(output)},
    )
    assert uncached.returncode == 0, uncached.stderr[-3000:]
    assert xp_folder(uncached).name == xp_folder(first_run).name  # same experiment, other folder
    assert "Token cache: off" in uncached.stderr and "Cache hits" not in uncached.stderr
    histories = [json.loads((xp_folder(run) / "history.json").read_text()) for run in (first_run, uncached)]
    assert len(histories[0]) == len(histories[1]) == 3
    for cached_epoch, plain_epoch in zip(*histories, strict=True):
        for stage in ("train", "valid"):
            assert cached_epoch[stage]["ce"] == pytest.approx(plain_epoch[stage]["ce"], rel=TOLERANCE), stage
    log = first_run.stderr + first_run.stdout
    assert re.search(
        r"Token cache at \S+/cache/tokens/\w{16} \(compression model sha1 \w+, 32000 Hz, .*\), "
        r"\d+ entries found",
        log,
    )
    # every validation segment was encoded in epoch 1 at the latest: later epochs read them all
    assert re.search(
        r"Cache hits, valid epoch 3: tokens of (\d+)/\1 \(100%\) segments; T5 outputs \(description\)", log
    )
    assert re.search(r"Cache hits, train epoch 3: tokens of [1-9]\d*/", log)


def test_token_cache_key_follows_the_codebooks_in_use(tiny_model, tmp_path):
    """A codec set to use fewer of its codebooks (set_num_codebooks, as MusicGen does when its LM models fewer
    than the codec has) encodes the same audio into fewer rows: its tokens are other tokens, kept in another
    folder, and an entry stored with every codebook is never served to it."""
    from types import SimpleNamespace

    from audiocraft.models import loaders

    codec = loaders.load_compression_model(str(tiny_model), device="cpu")  # our own copy: its setting changes
    audio = torch.randn(1, codec.channels, codec.sample_rate // 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        every = codec.encode(audio)[0][0]
    root = tmp_path / "tokens"
    full = caches.TokenCache(root, codec, 1.0)
    codec.set_num_codebooks(every.shape[0] - 1)
    with torch.no_grad():
        fewer_tokens = codec.encode(audio)[0][0]
    assert fewer_tokens.shape[0] == every.shape[0] - 1 and torch.equal(fewer_tokens, every[:-1])
    fewer = caches.TokenCache(root, codec, 1.0)
    assert fewer.folder != full.folder
    segment = tmp_path / "segment.wav"
    segment.write_bytes(b"the entry is named by the file's path, size and mtime")
    info = SimpleNamespace(meta=SimpleNamespace(path=str(segment)), seek_time=0.0, n_frames=audio.shape[-1])
    full.store(info, every)
    assert torch.equal(full.load(info), every.short()) and fewer.load(info) is None


def test_token_cache_entries_hold_every_int16_code(tmp_path):
    """Entries are int16: the largest int16 code comes back as it was, one more is refused, not wrapped."""
    from types import SimpleNamespace

    codec = torch.nn.Linear(1, 1)  # what the key reads of a codec: its weights and rates
    codec.sample_rate, codec.channels, codec.frame_rate, codec.num_codebooks = 32000, 1, 50, 1
    cache = caches.TokenCache(tmp_path / "tokens", codec, 1.0)
    segment = tmp_path / "segment.wav"
    segment.write_bytes(b"any file")
    info = SimpleNamespace(meta=SimpleNamespace(path=str(segment)), seek_time=0.0, n_frames=2)
    largest = torch.iinfo(torch.int16).max
    cache.store(info, torch.tensor([[0, largest]]))
    assert cache.load(info).tolist() == [[0, largest]]
    with pytest.raises(ValueError, match="cannot be stored as int16"):
        cache.store(info, torch.tensor([[0, largest + 1]]))


def test_token_cache_layout_is_key_then_two_hex_then_the_entry(tmp_path):
    """<root>/<key>/<2 hex>/<40 hex>.safetensors, as the class says: another layout would orphan the caches on disk."""
    import json
    from types import SimpleNamespace

    codec = torch.nn.Linear(1, 1)
    codec.sample_rate, codec.channels, codec.frame_rate, codec.num_codebooks = 32000, 1, 50, 1
    cache = caches.TokenCache(tmp_path / "tokens", codec, 1.0)
    segment = tmp_path / "segment.wav"
    segment.write_bytes(b"any file")
    info = SimpleNamespace(meta=SimpleNamespace(path=str(segment)), seek_time=0.5, n_frames=2)
    path = cache.entry_path(info)
    stat = segment.stat()
    fields = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, 0.5, 2]
    name = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    assert path == (tmp_path / "tokens").resolve() / cache.key / name[:2] / f"{name}.safetensors"
    assert cache.key == hashlib.sha1(json.dumps(cache.ingredients, sort_keys=True).encode()).hexdigest()[:16]


def test_a_segment_hard_linked_into_a_new_dataset_version_keeps_its_entry_and_a_rewritten_one_does_not(tmp_path):
    """A new version of a dataset hard-links the segments it did not convert again: same tokens, same entry. The
    same bytes written anew at the old path are another file (a new inode): a new entry."""
    import os
    from types import SimpleNamespace

    codec = torch.nn.Linear(1, 1)
    codec.sample_rate, codec.channels, codec.frame_rate, codec.num_codebooks = 32000, 1, 50, 1
    cache = caches.TokenCache(tmp_path / "tokens", codec, 1.0)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    old, linked = tmp_path / "v1" / "seg_000.wav", tmp_path / "v2" / "seg_000.wav"
    old.write_bytes(b"segment")
    os.link(old, linked)

    def entry(path):
        return cache.entry_path(SimpleNamespace(meta=SimpleNamespace(path=str(path)), seek_time=0.0, n_frames=50))

    assert entry(linked) == entry(old)
    first = entry(old)
    old.unlink()
    keep = tmp_path / "keep"
    keep.write_bytes(b"x")  # so that the freed inode is not handed straight back
    old.write_bytes(b"segment")
    assert entry(old) != first
