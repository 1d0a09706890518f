"""Supervised fine-tuning data: JSONL formats, the chat template, a token cache, packing.

Formats (one JSON object a line; detected per line from its keys):
- chat: `{"messages": [{"role": "system|user|assistant", "content": "…"}, …]}`;
- prompt/completion: `{"prompt": …, "completion": …}`; each a string (plain text, no template:
  `<|bos|>prompt completion<|eos|>`) or a message list (rendered with the chat template).

The chat template `megads-chat-v1` (also what `megads generate --chat` uses):

    <|bos|><|system|>{system}<|eos|><|user|>{user}<|eos|><|assistant|>{assistant}<|eos|>…

Every message is its role token, its content, then `<|eos|>`. `<think>`/`</think>` and
`<answer>`/`</answer>` inside a content are the tokenizer's special tokens. The assistant spans
(content and the closing `<|eos|>`, not the role token) are the ones marked for the loss; a
generation prompt ends with `<|assistant|>`.

Files are streamed in chunks whose strings are encoded in one parallel `encode_batch` call each.
Tokenised samples are cached as two Megatron-style indexed datasets under `data.cache_dir`
(tokens, and a 0/1 loss mask of the same length), keyed by the file's size and mtime, the
tokenizer's hash and the template, so an unchanged file is tokenised once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from megads.data.indexed import IndexedDataset, IndexedDatasetBuilder, best_dtype, exists
from megads.data.tokenizer import BOS, EOS
from megads.errors import DataError

log = logging.getLogger(__name__)

TEMPLATE = "megads-chat-v1"
ROLES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs role (system|user|assistant) and string content, got {m!r:.80}")
    return value


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation under megads-chat-v1; mask 1 on assistant spans."""
    eos = tok.token_id(EOS)
    ids, mask = [tok.token_id(BOS)], [0]
    for m in messages:
        role = tok.token_id(ROLES[m["role"]])
        body = tok.encode(m["content"]) + [eos]
        on = 1 if m["role"] == "assistant" else 0
        ids += [role] + body
        mask += [0] + [on] * len(body)
    if add_generation_prompt:
        ids.append(tok.token_id(ROLES["assistant"]))
        mask.append(0)
    return ids, mask


def render_record(tok, rec: dict) -> tuple[list[int], list[int]]:
    """One JSONL record (chat or prompt/completion) -> (ids, loss_mask). ValueError if malformed."""
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    if "messages" in rec:
        return render_chat(tok, _messages(rec["messages"], ""))
    if "prompt" in rec and "completion" in rec:
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, list) and isinstance(c, list):
            ids_p, mask_p = render_chat(tok, _messages(p, ""))
            full, mask = render_chat(tok, _messages(p + c, ""))
            return full, [0] * len(ids_p) + mask[len(ids_p):]
        if isinstance(p, str) and isinstance(c, str):
            a, b = [tok.token_id(BOS)] + tok.encode(p), tok.encode(c) + [tok.token_id(EOS)]
            return a + b, [0] * len(a) + [1] * len(b)
        raise ValueError("prompt and completion must both be strings or both message lists")
    raise ValueError("expected 'messages', or 'prompt' and 'completion'")


def cache_prefix(path: str, tok, cache_dir: str, kind: str = "sft") -> str:
    st = os.stat(path)
    key = json.dumps([os.path.abspath(path), st.st_size, st.st_mtime_ns, tok.hash, TEMPLATE, kind])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return str(Path(cache_dir) / f"{Path(path).stem}-{kind}-{digest}")


def _line_chunks(path: str, size: int = 2048):
    """(line number, raw bytes) of the non-blank lines of a file, `size` at a time (streamed)."""
    chunk = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                chunk.append((lineno, raw))
                if len(chunk) >= size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _strings(x, out: set) -> set:
    if isinstance(x, str):
        out.add(x)
    elif isinstance(x, dict):
        for v in x.values():
            _strings(v, out)
    elif isinstance(x, list):
        for v in x:
            _strings(v, out)
    return out


class _BatchEncoded:
    """The tokenizer, with every string of a chunk of records encoded up front in one
    `encode_batch` call (HF tokenizers runs it on all cores); `encode` then looks them up."""

    def __init__(self, tok, records: list):
        self._tok = tok
        texts = sorted(_strings(records, set()))
        self._ids = dict(zip(texts, tok.encode_batch(texts))) if texts else {}

    def encode(self, text: str) -> list[int]:
        ids = self._ids.get(text)
        return list(ids) if ids is not None else self._tok.encode(text)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _tokenize_jsonl(path: str, tok, cache_dir: str, kind: str, parts: list[str], render, on_error: str) -> list[str]:
    """Stream a JSONL file through `render(tokenizer, record) -> [ids/mask lists, one per part]` into aligned
    cached indexed datasets `<cache>.<part>`; reused when file, tokenizer and template are
    unchanged. A malformed line: DataError `file:line: reason` (on_error='fail') or skipped and
    counted (logged)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    prefix = cache_prefix(path, tok, cache_dir, kind=kind)
    names = [f"{prefix}.{p}" for p in parts]
    if all(exists(n) for n in names):
        return names
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # token ids in the vocabulary's dtype; masks in uint16 (the indexed format stores uint16 or int32)
    builders = [IndexedDatasetBuilder(n, np.uint16 if "mask" in p else best_dtype(tok.vocab_size))
                for n, p in zip(names, parts)]
    n_ok, skipped = 0, 0

    def bad(lineno, e):
        nonlocal skipped
        msg = f"{path}:{lineno}: {e}"
        if on_error == "fail":
            raise DataError(msg) from None
        skipped += 1
        if skipped <= 20:
            log.warning("skipped %s", msg)

    try:
        for chunk in _line_chunks(path):
            records = []  # (line, record or None, parse error), in file order
            for lineno, raw in chunk:
                try:
                    records.append((lineno, json.loads(raw.decode("utf-8")), None))
                except (ValueError, UnicodeDecodeError) as e:
                    records.append((lineno, None, e))
            enc = _BatchEncoded(tok, [r for _, r, _ in records if r is not None])  # one parallel encode_batch
            for lineno, rec, err in records:
                try:
                    if err is not None:
                        raise err
                    seqs = render(enc, rec)
                except (ValueError, UnicodeDecodeError) as e:
                    bad(lineno, e)
                    continue
                for b, x in zip(builders, seqs):
                    b.add_document(x)
                n_ok += 1
        if n_ok == 0:
            raise DataError(f"{path}: no usable records ({skipped} malformed skipped)")
        for b in builders:
            b.finalize()
    except BaseException:
        for b in builders:
            b.abort()
        raise
    log.info("tokenised %s: %d records, %d skipped", path, n_ok, skipped)
    return names


def tokenize_sft(path: str, tok, cache_dir: str, on_error: str = "skip") -> tuple[str, str]:
    """One chat / prompt-completion JSONL file -> cached (tokens, mask) indexed datasets."""
    def render(enc, rec):
        ids, mask = render_record(enc, rec)
        if not any(mask):
            raise ValueError("no assistant/completion tokens to learn from")
        return ids, mask

    t, m = _tokenize_jsonl(path, tok, cache_dir, "sft", ["tokens", "mask"], render, on_error)
    return t, m


class PackedSFTDataset:
    """Rows of exactly `seq_len` tokens for SFT: `tokens`, `labels` (-100 where there is no loss),
    `doc_ids` (-1 on padding) and `positions` (restarting at 0 in every sample).

    pack=True: samples are bin-packed into rows (best fit, longest first; no sample is split), the
    rows then shuffled with the seed; only a row's tail can be padding, and little is left (a few
    percent on skewed lengths, bench/RESULTS.md). pack=False: one sample per row, padded. A sample
    longer than seq_len + 1 tokens is truncated.
    """

    def __init__(self, pairs: list[tuple[IndexedDataset, IndexedDataset]], seq_len: int, seed: int,
                 pack: bool = True, loss_on: str = "assistant", pad_id: int = 0):
        self.seq_len, self.pad_id, self.loss_on = seq_len, pad_id, loss_on
        self.docs = [(t, m, i) for t, m in pairs for i in range(len(t))]
        lengths = [min(len(t[k]) - 1, seq_len) for t, _, k in self.docs]
        rng = np.random.RandomState(seed)
        if not pack:
            rows = [[int(d)] for d in rng.permutation(len(self.docs)) if lengths[d] > 0]
        else:
            rows = self._best_fit_decreasing(lengths, seq_len)
            rows = [rows[i] for i in rng.permutation(len(rows))]
        self.rows = rows

    @staticmethod
    def _best_fit_decreasing(lengths: list[int], seq_len: int) -> list[list[int]]:
        """Bin-pack samples into rows of seq_len: longest first, each into the open row with the
        least room that still fits it (O(n log n) with a sorted list of rooms)."""
        import bisect

        rows: list[list[int]] = []
        rooms: list[tuple[int, int]] = []  # sorted (room left, row id)
        for d in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            n = lengths[d]
            if n <= 0:
                continue
            j = bisect.bisect_left(rooms, (n, -1))
            if j < len(rooms):
                room, r = rooms.pop(j)
            else:
                room, r = seq_len, len(rows)
                rows.append([])
            rows[r].append(d)
            if room - n > 0:
                bisect.insort(rooms, (room - n, r))
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        S = self.seq_len
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, -100, dtype=np.int64)
        doc_ids = np.full(S, -1, dtype=np.int64)
        positions = np.zeros(S, dtype=np.int64)
        at = 0
        for j, d in enumerate(self.rows[i]):
            t, m, k = self.docs[d]
            ids = np.asarray(t[k], dtype=np.int64)[: S + 1]
            mask = np.asarray(m[k], dtype=np.int64)[: S + 1]
            n = len(ids) - 1
            tokens[at:at + n] = ids[:-1]
            lab = ids[1:].copy()
            if self.loss_on == "assistant":
                lab[mask[1:] == 0] = -100
            labels[at:at + n] = lab
            doc_ids[at:at + n] = j
            positions[at:at + n] = np.arange(n)
            at += n
        return {"tokens": tokens, "labels": labels, "doc_ids": doc_ids, "positions": positions}


class RowSubset:
    """A view of some rows of a dataset."""

    def __init__(self, ds, rows: np.ndarray):
        self.ds, self.rows = ds, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(self.rows[i])]


def split_rows(ds, split: str, seed: int = 0) -> tuple[RowSubset, RowSubset | None]:
    """(train, valid) row views by the data.split shares ('98,2'), seeded; valid None when empty."""
    from megads.data.dataset import parse_split

    tr, va = parse_split(split)
    n = len(ds)
    n_valid = int(round(n * va / (tr + va))) if va > 0 and n > 1 else 0
    order = np.random.RandomState(seed).permutation(n)
    valid = RowSubset(ds, np.sort(order[:n_valid])) if n_valid else None
    return RowSubset(ds, np.sort(order[n_valid:])), valid


# ------------------------------------------------------------------ preference pairs (DPO)
def render_pair(tok, rec: dict) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """A preference record {"prompt", "chosen", "rejected"} (strings, or message lists rendered with
    the chat template) -> ((chosen ids, mask), (rejected ids, mask)); masks 1 on the response."""
    if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "chosen", "rejected")):
        raise ValueError("expected 'prompt', 'chosen' and 'rejected'")
    return (render_record(tok, {"prompt": rec["prompt"], "completion": rec["chosen"]}),
            render_record(tok, {"prompt": rec["prompt"], "completion": rec["rejected"]}))


def tokenize_pairs(path: str, tok, cache_dir: str, on_error: str = "skip") -> list[str]:
    """Preference JSONL -> cached indexed datasets [chosen tokens, chosen mask, rejected tokens,
    rejected mask] (aligned by record); prefixes returned."""
    def render(enc, rec):
        (cw, mw), (cl, ml) = render_pair(enc, rec)
        if not any(mw) or not any(ml):
            raise ValueError("an empty chosen or rejected response")
        return cw, mw, cl, ml

    return _tokenize_jsonl(path, tok, cache_dir, "pref", ["chosen", "chosen_mask", "rejected", "rejected_mask"],
                           render, on_error)


class PairDataset:
    """Preference pairs as padded rows: `tokens` [2, S], `labels` [2, S] (-100 off the response),
    chosen first. `ref` (optional, [N, 2] float64) adds the reference log-probs of the pair."""

    def __init__(self, parts: list[list[IndexedDataset]], seq_len: int, pad_id: int = 0):
        self.parts, self.seq_len, self.pad_id = parts, seq_len, pad_id
        self.index = [(p, i) for p, part in enumerate(parts) for i in range(len(part[0]))]
        self.ref = None

    def __len__(self) -> int:
        return len(self.index)

    def _row(self, ids, mask):
        S = self.seq_len
        ids = np.asarray(ids, dtype=np.int64)[: S + 1]
        mask = np.asarray(mask, dtype=np.int64)[: S + 1]
        n = len(ids) - 1
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, -100, dtype=np.int64)
        tokens[:n] = ids[:-1]
        lab = ids[1:].copy()
        lab[mask[1:] == 0] = -100
        labels[:n] = lab
        return tokens, labels

    def __getitem__(self, i: int) -> dict:
        p, k = self.index[i]
        cw, mw, cl, ml = (d[k] for d in self.parts[p])
        tw, lw = self._row(cw, mw)
        tl, ll = self._row(cl, ml)
        out = {"tokens": np.stack([tw, tl]), "labels": np.stack([lw, ll]), "index": i}
        if self.ref is not None:
            out["ref"] = self.ref[i]
        return out
