"""Write a tiny, deterministic, random-initialised MusicGen in the facebook/musicgen-small snapshot layout.

No real weights exist on a fresh machine, so the demo and the tests make this one. It goes through the very code
path that loads the real musicgen-small: `state_dict.bin` (fp16 LM weights + its xp.cfg), the full EnCodec in
`compression_state_dict.bin`, and a local T5 encoder with a real sentencepiece tokenizer in `t5/`.
"""

import io
import json
import tempfile
import typing as tp
from pathlib import Path

import torch
from audiocraft.models import builders

import audiocraft

from ..config import compose
from ..files import replaced_when_complete
from . import folder as model_dir
from . import xp_cfg

# A few hundred words a caption may use, for the tokenizer: the demo's styles, and general music vocabulary.
TOKENIZER_CORPUS = """
hip hop 808 beat with trap drums, hard kick with long decay, crisp snare and rolling hi hats
boom bap beat with dusty drums, vinyl crackle, jazzy piano chords and a deep bass line
lofi chill instrumental, soft keys, warm tape saturation, relaxed groove for studying
ambient pad with slow evolving synths, reverb, no drums, calm and spacious
electronic dance track, four on the floor kick, bright lead synth, energetic build up and drop
acoustic guitar ballad, gentle strumming, warm and intimate, folk song
orchestral cinematic score with strings, brass, timpani, epic and dramatic
rock song with distorted electric guitars, live drums, bass, powerful and driving
major minor key tempo bpm slow fast medium dark bright happy sad aggressive mellow
C D E F G A B sharp flat 60 70 80 90 100 110 120 130 140 150 160 170 180 beats per minute
""".strip().splitlines()


def train_tokenizer(out: Path, vocab_size: int = 200) -> Path:
    """A real sentencepiece model with T5's special ids (pad 0, eos 1, unk 2), trained deterministically."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        seed_sentencepiece_size=10000,
        shuffle_input_sentence=False,
    )
    path = out / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def write_t5(out: Path, seed: int, width: int = 32) -> Path:
    """A 2-layer T5 encoder and its tokenizer, as `T5EncoderModel/T5Tokenizer.save_pretrained` write them."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = T5Tokenizer(str(train_tokenizer(Path(tmp))), legacy=False)
        tokenizer.save_pretrained(out)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(out, safe_serialization=True)
    return out


def read_clips(folders: tp.Sequence[Path], sample_rate: int, seconds: float) -> torch.Tensor:
    """Every wav below `folders` as mono at `sample_rate`, cut or padded to `seconds`: [N, 1, T]."""
    import soundfile as sf
    from audiocraft.data.audio_utils import convert_audio

    length = int(sample_rate * seconds)
    clips = []
    for path in sorted(p for folder in folders for p in Path(folder).rglob("*.wav")):
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        wav = convert_audio(torch.from_numpy(audio.T), rate, sample_rate, 1)[:, :length]
        clips.append(torch.nn.functional.pad(wav, (0, length - wav.shape[-1])))
    if not clips:
        raise FileNotFoundError(f"no .wav under {', '.join(map(str, folders))} to train the tiny codec on.")
    return torch.stack(clips)


CODEC_STEPS = 300
CODEC_RECIPE = 2  # raised whenever train_codec or its init changes, so that a model written before is rewritten


def init_codec_for_short_training(model) -> None:
    """Unit-norm conv weights and zero biases in the SEANet encoder and decoder. PyTorch's default init shrinks the
    signal at every layer, so the tiny SEANet's output starts as its biases, the same for every input, and a
    minute of training often never leaves that state (measured: 2 of 4 seeds ended with one code for every clip)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith(("encoder.", "decoder.")):
                continue
            if name.endswith(".bias"):
                parameter.zero_()
            elif name.endswith(".weight_g"):  # weight norm: the weight's norm per output channel
                parameter.fill_(1.0)


def train_codec(model, clips: torch.Tensor, steps: int, seed: int, segment: int = 8000) -> float:
    """A short reconstruction training (waveform L2 relative to each clip's energy, L1, a little multi-resolution
    STFT, commitment; no adversary): enough for the codec to keep a clip's coarse spectrum, so that generated audio
    shows the style its tokens carry (an 808's sub-bass against chiptune's square waves), not to sound good. A
    spectral loss alone left the sub-bass out; a plain L2 learns only the loudest clips (the 808s) and decoded
    chiptune as bass too. Returns the last loss."""
    from audiocraft.losses import MRSTFTLoss

    generator = torch.Generator().manual_seed(seed)
    spectral = MRSTFTLoss(factor_sc=1.0, factor_mag=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.zeros([])
    for _ in range(steps):
        index = torch.randint(len(clips), (8,), generator=generator)
        start = int(torch.randint(0, clips.shape[-1] - segment + 1, (), generator=generator))
        batch = clips[index, :, start : start + segment]
        result = model(batch)
        error = result.x - batch
        relative_l2 = (error.pow(2).mean(-1) / (batch.pow(2).mean(-1) + 1e-4)).mean()
        loss = relative_l2 + error.abs().mean() + 0.1 * spectral(result.x, batch) + result.penalty
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return loss.item()


def write_compression_model(
    out: Path,
    seed: int,
    codebook_size: int,
    num_codebooks: int,
    codec_data: tp.Sequence[Path] = (),
    codec_steps: int = CODEC_STEPS,
) -> None:
    """A small SEANet EnCodec at 32 kHz and 50 Hz (musicgen-small's rates), its codebooks initialised by k-means;
    random, or briefly trained on the wavs of `codec_data` (the demo's, so that its audio carries the styles)."""
    # trained: wide enough to tell the styles apart; random: as small as possible
    filters, dimension = (8, 64) if codec_data else (4, 16)
    cfg = compose(
        [
            "solver=compression/encodec_musicgen_32khz",
            "device=cpu",
            f"seanet.n_filters={filters}",
            f"seanet.dimension={dimension}",
            "seanet.lstm=0",
            f"rvq.bins={codebook_size}",
            f"rvq.n_q={num_codebooks}",
            "rvq.kmeans_iters=5",
        ]
    )
    torch.manual_seed(seed)
    model = builders.get_compression_model(cfg)
    model.train()
    if codec_data:
        init_codec_for_short_training(model)
        clips = read_clips(codec_data, model.sample_rate, seconds=3.0)
        print(f"Training the tiny codec on {len(clips)} clips for {codec_steps} steps ...", flush=True)
        with torch.no_grad():  # first forward initialises the codebooks from data (k-means), as in training
            model(clips[:16])
        print(f"  reconstruction loss {train_codec(model, clips, codec_steps, seed):.3f}", flush=True)
    else:
        with torch.no_grad():
            model(torch.randn(4, 1, 32000) * 0.1)
    model.eval()
    torch.save(xp_cfg.package(cfg, model.state_dict()), out / model_dir.COMPRESSION_FILE)


def write_lm(
    out: Path, seed: int, codebook_size: int, num_codebooks: int, t5_dir: Path, extra_overrides: tp.Sequence[str] = ()
) -> None:
    """The musicgen_lm architecture at 'xsmall' scale, with T5 text conditioning, weights stored in fp16."""
    overrides = [
        "solver=finetune/cpu_tiny",
        "model/lm/model_scale=xsmall",
        f"transformer_lm.card={codebook_size}",
        f"transformer_lm.n_q={num_codebooks}",
        f"conditioners.description.t5.name={t5_dir}",
        *extra_overrides,
    ]
    cfg = compose(overrides)
    torch.manual_seed(seed)
    lm = xp_cfg.build_lm(cfg)
    cfg.conditioners.description.t5.name = model_dir.T5_SUBDIR  # found beside the model, wherever it is moved
    state = {k: v.half() if v.is_floating_point() else v for k, v in lm.state_dict().items()}
    torch.save(xp_cfg.package(cfg, state, version=audiocraft.__version__, exported=True), out / model_dir.LM_FILE)


def write_tiny_model(
    out: tp.Union[str, Path],
    seed: int = 0,
    codebook_size: int = 64,
    num_codebooks: int = 4,
    codec_data: tp.Sequence[tp.Union[str, Path]] = (),
    codec_steps: int = CODEC_STEPS,
) -> Path:
    """Write the whole snapshot folder (replacing `out` only once it is complete). With `codec_data`, its codec
    is trained briefly on those folders' wavs (under a minute on a CPU); otherwise every weight is random."""
    out = Path(out).resolve()
    with replaced_when_complete(out) as staging:
        t5_dir = write_t5(staging / model_dir.T5_SUBDIR, seed)
        write_compression_model(staging, seed, codebook_size, num_codebooks, [Path(d) for d in codec_data], codec_steps)
        write_lm(staging, seed, codebook_size, num_codebooks, t5_dir)
        (staging / "README.md").write_text(
            "A tiny random-initialised MusicGen written by `musicgen_finetune.tiny_model` for demos and tests.\n"
            "Same layout as facebook/musicgen-small; it makes noise, not music.\n"
        )
        (staging / "tiny_model.json").write_text(
            json.dumps(
                {
                    "seed": seed,
                    "codebook_size": codebook_size,
                    "num_codebooks": num_codebooks,
                    "codec_trained_on": [str(Path(d).resolve()) for d in codec_data],
                    "codec_steps": codec_steps if codec_data else 0,
                    "codec_recipe": CODEC_RECIPE if codec_data else 0,
                },
                indent=2,
            )
            + "\n"
        )
    return out
