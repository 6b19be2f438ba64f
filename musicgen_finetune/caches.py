"""Caches of what the frozen parts of MusicGen compute, so that fine-tuning does not redo it every epoch.

- `TokenCache`: the EnCodec tokens of each training/validation segment, on disk under
  `<output>/cache/tokens/<key>/`, `<key>` a short hash of everything that changes tokens (the compression model's
  weights, rates, channels, codebooks, the segment duration, the AudioCraft version). Our segments are pre-cut and
  read from their start, so a (file, seek_time, n_frames) always gives the same audio, hence the same tokens.
  `CachedCompressionModel` puts it in front of the solver's compression model: its `encode(audio)` answers the
  batch's segments from the cache and encodes only the missing ones.
- `CachedT5Encoder`: the frozen T5's `last_hidden_state` per distinct input, in memory, in front of AudioCraft's
  `T5Conditioner.t5`. The conditioner's `output_proj` (trained) still runs every step.

Why not AudioCraft's own cache (`cache.path`/`cache.write`, audiocraft/utils/cache.py, used by
solvers/musicgen.py): it stores whole batches per epoch number, written by a separate pass per epoch, so it is tied
to the batch size and to the order of the epochs, and it loads pickled MusicInfo objects with `torch.load` (not
weights-only). That suits 32-GPU runs over a huge dataset, not a small single-GPU fine-tune; its `cache.*` keys
are left as upstream has them (off).
"""

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import typing as tp
from pathlib import Path

import torch

from .files import write_atomically

logger = logging.getLogger(__name__)

KEY_LENGTH = 16  # hex digits of a cache folder's name
TOKEN_LIMIT = 2**15  # tokens are stored as int16


@dataclasses.dataclass
class HitCounter:
    """Hits and misses since the last `take()`, for the per-epoch log."""

    hits: int = 0
    misses: int = 0

    def take(self) -> tp.Tuple[int, int]:
        counts = (self.hits, self.misses)
        self.hits = self.misses = 0
        return counts


def hit_rate(hits: int, misses: int) -> str:
    total = hits + misses
    return f"{hits}/{total} ({100 * hits / total:.0f}%)" if total else "0/0"


@contextlib.contextmanager
def sync_allowed() -> tp.Iterator[None]:
    """The caches move data to the CPU and to disk on purpose: keep upstream's CUDA sync check
    (`check_synchronization_points`, solvers/musicgen.py) from warning about it."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------------------------------------------- tokens


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha1 of every tensor of the model's state dict (names, dtypes, shapes and bytes); not for security."""
    hasher = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(data.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def token_key_ingredients(compression_model, segment_duration: float) -> dict:
    """Everything that changes the tokens of a segment, besides the segment itself."""
    import audiocraft

    return {
        "compression_model_sha1": state_dict_hash(compression_model),
        "sample_rate": int(compression_model.sample_rate),
        "channels": int(compression_model.channels),
        "frame_rate": float(compression_model.frame_rate),
        "num_codebooks": int(compression_model.num_codebooks),
        "segment_duration": float(segment_duration),
        "audiocraft": audiocraft.__version__,
    }


def short_hash(value: tp.Any, length: int = KEY_LENGTH) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


class TokenCache:
    """Tokens per segment in `<root>/<key>/<2 hex>/<entry>.safetensors` (int16 [K, T]).

    An entry is named by the segment file's absolute path, size and mtime_ns, and the segment's seek_time and
    n_frames, so a rewritten file misses; the folder key covers the model and the segment duration.
    """

    def __init__(self, root: tp.Union[str, Path], compression_model, segment_duration: float):
        self.ingredients = token_key_ingredients(compression_model, segment_duration)
        self.key = short_hash(self.ingredients)
        self.folder = Path(root).resolve() / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.is_file():  # what the hash is of, for whoever looks at the folder
            text = json.dumps(self.ingredients, indent=2) + "\n"
            write_atomically(key_file, lambda tmp: tmp.write_text(text))

    @staticmethod
    def entry_fields(info) -> list:
        """The file by its inode, not its path: a new version of the dataset hard-links the segments it did not
        convert again (data/conversion.py), and those keep their tokens."""
        stat = os.stat(info.meta.path)
        return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, float(info.seek_time), int(info.n_frames)]

    def entry_path(self, info) -> Path:
        name = short_hash(self.entry_fields(info), length=40)
        return self.folder / name[:2] / f"{name}.safetensors"

    def load(self, info) -> tp.Optional[torch.Tensor]:
        """The segment's tokens [K, T] (int16, CPU), or None."""
        from safetensors.torch import load_file

        path = self.entry_path(info)
        if not path.is_file():
            return None
        try:
            return load_file(path)["tokens"]
        except Exception as err:  # a damaged file (disk full, copied by hand): encode again, rewrite it
            logger.warning("Token cache entry %s is unreadable (%s); encoding the segment again.", path, err)
            return None

    def store(self, info, tokens: torch.Tensor) -> None:
        from safetensors.torch import save_file

        if tokens.min() < 0 or tokens.max() >= TOKEN_LIMIT:
            raise ValueError(
                f"tokens outside [0, {TOKEN_LIMIT}) cannot be stored as int16; turn the token cache "
                "off (token_cache.enabled=false) for this compression model."
            )
        metadata = {
            "path": os.path.abspath(info.meta.path),
            "seek_time": str(info.seek_time),
            "n_frames": str(info.n_frames),
        }
        data = {"tokens": tokens.detach().to("cpu", torch.int16).contiguous()}
        write_atomically(self.entry_path(info), lambda tmp: save_file(data, str(tmp), metadata=metadata))

    def count(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.safetensors"))

    def describe(self) -> str:
        i = self.ingredients
        return (
            f"Token cache at {self.folder} (compression model sha1 {i['compression_model_sha1'][:12]}, "
            f"{i['sample_rate']} Hz, {i['channels']} channel(s), {i['frame_rate']:g} frames/s, "
            f"{i['num_codebooks']} codebooks, {i['segment_duration']:g} s segments, "
            f"audiocraft {i['audiocraft']}), {self.count()} entries found"
        )


class CachedCompressionModel:
    """The solver's compression model, with `encode(audio)` answered from a `TokenCache` while `serving(infos)`
    names the batch's segments. Everything else (decode, rates, prompts of generation) goes to the model itself."""

    def __init__(self, model, cache: TokenCache):
        self.model = model
        self.cache = cache
        self.counter = HitCounter()
        self._infos: tp.Optional[list] = None

    def __getattr__(self, name: str):
        if name == "model":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def serving(self, infos: tp.Sequence) -> tp.Iterator[None]:
        self._infos = list(infos)
        try:
            yield
        finally:
            self._infos = None

    def encode(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        infos = self._infos
        if infos is None or len(infos) != x.shape[0]:
            return self.model.encode(x)
        with sync_allowed():
            return self._encode_cached(x, infos), None

    def _encode_cached(self, x: torch.Tensor, infos: list) -> torch.Tensor:
        tokens = [self.cache.load(info) for info in infos]
        missing = [i for i, t in enumerate(tokens) if t is None]
        self.counter.hits += len(infos) - len(missing)
        self.counter.misses += len(missing)
        if missing:
            # the whole batch when nothing is cached: exactly upstream's call
            codes, scale = self.model.encode(x if len(missing) == len(infos) else x[missing])
            if scale is not None:
                raise ValueError(
                    "the token cache does not support a scaled compression model; turn it off with "
                    "token_cache.enabled=false."
                )
            for index, code in zip(missing, codes, strict=True):
                self.cache.store(infos[index], code)
                tokens[index] = code
        shapes = {tuple(t.shape) for t in tokens}
        if len(shapes) > 1:
            raise RuntimeError(
                f"cached and encoded tokens differ in shape {sorted(shapes)} in {self.cache.folder}; "
                "delete that folder (it is rebuilt as training goes)."
            )
        return torch.stack([t.to(device=x.device, dtype=torch.long) for t in tokens])


# ---------------------------------------------------------------------------------------------------- T5


def valid_lengths(attention_mask: torch.Tensor) -> tp.Optional[tp.List[int]]:
    """Per row, the number of valid tokens, when each row is valid tokens then padding (the T5 tokenizer pads on
    the right; rows AudioCraft masks out entirely, empty texts, have 0). None for any other mask."""
    mask = attention_mask.detach().cpu().bool()
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return lengths.tolist() if torch.equal(mask, prefix) else None


class CachedT5Encoder:
    """Stands in for a frozen `T5Conditioner.t5` (modules/conditioners.py `forward`:
    `self.t5(**inputs).last_hidden_state`) and remembers each row's hidden states at its valid positions.

    A row is keyed by its valid token ids, which are exactly what T5 reads of a text (after AudioCraft's
    normalization and word dropout): a caption with the same words dropped again hits, and rows masked out (empty
    or missing texts) need no T5 at all. Misses run T5 on each missing row alone, at its own length; the
    batch is padded back to the tokenizer's length with zeros, which the conditioner's mask zeroes anyway (and
    multiplies T5's own values there by 0 too). Valid positions match the uncached batch within float rounding:
    T5 masks padding keys out of attention, so a row's valid outputs do not depend on the other rows.
    Entries live on the CPU, least recently used dropped beyond `max_bytes`.
    """

    def __init__(self, t5: torch.nn.Module, max_bytes: int):
        self.t5 = t5
        self.max_bytes = max_bytes
        self.entries: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
        self.bytes = 0
        self.counter = HitCounter()

    def __getattr__(self, name: str):
        if name == "t5":
            raise AttributeError(name)
        return getattr(self.t5, name)

    def __call__(
        self, input_ids: tp.Optional[torch.Tensor] = None, attention_mask: tp.Optional[torch.Tensor] = None, **kwargs
    ):
        if kwargs or input_ids is None or attention_mask is None:  # not the call upstream makes: no cache
            return self.t5(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        from transformers.modeling_outputs import BaseModelOutput

        with sync_allowed(), torch.no_grad():
            lengths = valid_lengths(attention_mask)
            if lengths is None:  # not right-padded: no cache
                return self.t5(input_ids=input_ids, attention_mask=attention_mask)
            return BaseModelOutput(last_hidden_state=self._hidden_states(input_ids, attention_mask, lengths))

    def _hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: tp.List[int]
    ) -> torch.Tensor:
        ids = input_ids.detach().cpu()
        keys = [tuple(ids[row, :length].tolist()) for row, length in enumerate(lengths)]
        missing: tp.Dict[tuple, int] = {}  # key -> first row with it
        for row, key in enumerate(keys):
            if not key or key in self.entries:  # masked-out rows need no T5 either: hits
                self.counter.hits += 1
                if key:
                    self.entries.move_to_end(key)
            elif key in missing:  # a caption twice in a batch: computed once, for the first row
                self.counter.hits += 1
            else:
                self.counter.misses += 1
                missing[key] = row
        found = {key: self.entries[key] for key in keys if key in self.entries}
        found.update(self._encode_missing(input_ids, attention_mask, missing, lengths))
        return self._padded(keys, found, input_ids.shape[1]).to(input_ids.device)

    def _encode_missing(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, missing: dict, lengths: tp.List[int]
    ) -> tp.Dict[tuple, torch.Tensor]:
        if not missing:
            return {}
        # Each caption alone, at its own length: its states then do not depend on which other captions shared its
        # batch (matrix kernels pick their blocking by shape), so a resumed run, whose cache starts empty, gets the
        # very values the uninterrupted run cached. Each caption is encoded once per run, so this costs little.
        computed = {}
        for key, row in missing.items():
            length = lengths[row]
            states = self.t5(
                input_ids=input_ids[row : row + 1, :length], attention_mask=attention_mask[row : row + 1, :length]
            ).last_hidden_state[0]
            computed[key] = states.detach().cpu().clone()
            self._remember(key, computed[key])
        return computed

    def _remember(self, key: tuple, states: torch.Tensor) -> None:
        self.entries[key] = states
        self.bytes += states.numel() * states.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def _padded(self, keys: tp.List[tuple], found: dict, length: int) -> torch.Tensor:
        """[B, length, D], each row's cached states then zeros (empty rows: all zeros)."""
        width = int(self.t5.config.d_model)
        dtype = next(iter(found.values())).dtype if found else next(self.t5.parameters()).dtype
        out = torch.zeros(len(keys), length, width, dtype=dtype)
        for row, key in enumerate(keys):
            if key:
                out[row, : len(key)] = found[key]
        return out

    def describe(self) -> str:
        return f"{len(self.entries)} kept, {self.bytes / 2**20:.1f} of {self.max_bytes / 2**20:g} MB"


def install_text_cache(condition_provider, max_mb: float) -> tp.Dict[str, CachedT5Encoder]:
    """A `CachedT5Encoder` on every frozen T5 conditioner (a fine-tuned T5 changes every step: none there).
    Idempotent. Returns {conditioner name: cache}."""
    from audiocraft.modules.conditioners import T5Conditioner

    installed = {}
    for name, conditioner in condition_provider.conditioners.items():
        if not isinstance(conditioner, T5Conditioner) or conditioner.finetune:
            continue
        if not isinstance(conditioner.t5, CachedT5Encoder):
            # a frozen T5 is a plain attribute, not a submodule (upstream keeps it out of checkpoints): same here
            conditioner.__dict__["t5"] = CachedT5Encoder(conditioner.t5, int(max_mb * 2**20))
        installed[name] = conditioner.t5
    return installed
