"""Byte-level BPE tokenizer: training and loading through HF `tokenizers`.

Byte-level means every UTF-8 byte is a base symbol, so any text encodes without unknown tokens
and `decode(encode(s)) == s` holds exactly (no normaliser, no added prefix space, no post-processor:
BOS/EOS are added by the caller where a format wants them).

The special tokens take the first ids, in the order of SPECIAL_TOKENS, so their ids are the same for
every tokenizer megads trains (`<|bos|>` = 0, `<|eos|>` = 1, `<|pad|>` = 2, ...).

On disk a tokenizer is a directory with
- `tokenizer.json`: the HF tokenizers file (loadable by `tokenizers` and `transformers`), and
- `tokenizer_config.json`: the special tokens and their ids, in HF's field names.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable

from megads.errors import DataError

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>",
                  "<think>", "</think>", "<answer>", "</answer>"]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids megads needs.

    `path` is the directory holding tokenizer.json (the trainer copies it next to the final model);
    `hash` identifies the tokenizer (sha256 of its canonical JSON) so datasets can check they were
    made with it.
    """

    def __init__(self, hf_tokenizer, path: str | os.PathLike, file_hash: str):
        self.hf = hf_tokenizer
        self.path = str(path)
        self.hash = file_hash
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = hf_tokenizer.token_to_id(BOS)
        self.eos_id = hf_tokenizer.token_to_id(EOS)
        self.pad_id = hf_tokenizer.token_to_id(PAD)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; runs in parallel threads inside `tokenizers`."""
        fast = getattr(self.hf, "encode_batch_fast", None)  # tokenizers >= 0.20: skips offsets
        encode = fast if fast is not None else self.hf.encode_batch
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte-level pieces are reassembled into UTF-8 (invalid bytes become U+FFFD)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of a token string (e.g. a special token); DataError if the vocabulary lacks it."""
        tid = self.hf.token_to_id(token)
        if tid is None:
            raise DataError(f"{self.path}: tokenizer has no token {token!r}")
        return tid

    @property
    def special_ids(self) -> dict[str, int]:
        """The megads special tokens this tokenizer has, with their ids."""
        out = {}
        for t in SPECIAL_TOKENS:
            tid = self.hf.token_to_id(t)
            if tid is not None:
                out[t] = tid
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def tokenizer_hash(json_path: str | os.PathLike) -> str:
    """sha256 of tokenizer.json's canonical form (key order and whitespace do not matter)."""
    try:
        with open(json_path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{json_path}: cannot read tokenizer ({e})") from None
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise DataError(f"{path}: no tokenizer found (expected a directory with {TOKENIZER_FILE} "
                        f"or the file itself; train one with `megads tokenizer train`)")
    return p


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a directory holding tokenizer.json, or from the file itself."""
    from tokenizers import Tokenizer as HFTokenizer

    file = _resolve(path)
    digest = tokenizer_hash(file)
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise DataError(f"{file}: not a valid tokenizers file ({e})") from None
    return Tokenizer(hf, file.parent, digest)


def train_tokenizer(files: list[str], vocab_size: int, out_dir: str | os.PathLike,
                    json_key: str = "text", min_frequency: int = 2,
                    show_progress: bool = False, split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE on `files` (JSONL or text, see sources.py) and save it to `out_dir`.

    Malformed JSONL lines are skipped (they are reported in full by `preprocess`). The files are
    written under temporary names and renamed, so an interrupted run leaves no half tokenizer.
    The final vocabulary can be smaller than `vocab_size` when the corpus has too few pairs.
    split_digits: every digit is its own token (as LLaMA's and DeepSeek's tokenizers split
    numbers), which small models need to learn arithmetic.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from megads.data.sources import check_inputs, iter_texts

    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size: must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                        f"special tokens), got {vocab_size}")
    files = check_inputs(files)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), hf.pre_tokenizer])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    counter = {"docs": 0}
    skipped: list[str] = []

    def texts():
        for t in iter_texts(files, json_key, on_error="skip", skipped=skipped):
            counter["docs"] += 1
            yield t

    hf.train_from_iterator(texts(), trainer=trainer)
    if skipped:
        log.warning("tokenizer training skipped %d malformed records (first: %s)", len(skipped), skipped[0])
    if counter["docs"] == 0:
        raise DataError(f"no documents to train a tokenizer on in {', '.join(files)}")
    for i, t in enumerate(SPECIAL_TOKENS):  # stable ids: the trainer puts them first, in order
        assert hf.token_to_id(t) == i, (t, hf.token_to_id(t))
    return save_tokenizer(hf, out_dir)


def save_tokenizer(hf, out_dir: str | os.PathLike) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json atomically to `out_dir`; return the loaded wrapper."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
    hf.save(str(tmp))
    ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS if hf.token_to_id(t) is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "vocab_size": hf.get_vocab_size(with_added_tokens=True),
        "special_token_ids": ids,
    }
    tmp_cfg = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp_cfg.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / TOKENIZER_FILE)
    os.replace(tmp_cfg, out / CONFIG_FILE)
    return load_tokenizer(out)
