"""The detector's tokenizer: BERT uncased WordPiece as a `tokenizers` JSON, from a checkpoint or generated.

The runtime reads `grounding_dino_tokenizer.json` with the `tokenizers` library (no torch, no transformers).
With a real checkpoint it comes from the checkpoint's own files (tokenizer.json, or vocab.txt converted), which
parity with that checkpoint requires; with random weights the export generates a small vocabulary in which
every ASCII word tokenises without [UNK] (letters and digits, and their ## continuations).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from persense.runtime.errors import PersenseError

TOKENIZER_FILE = "grounding_dino_tokenizer.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DELIMITERS = ("[CLS]", "[SEP]", ".", "?")  # Grounding DINO's phrase delimiters (transformers' SPECIAL_TOKENS)
COMMON_NOUNS = """
apple orange banana lemon lime pear peach plum cherry grape berry strawberry tomato potato onion carrot pepper
egg bread cake cookie candy donut pizza nut bean seed rice corn leaf flower rose tree plant grass stone rock
coin ring bead button pill tablet bottle cup glass mug bowl plate spoon fork knife can jar box bag basket
ball toy block brick tile book pen pencil marker crayon key lock door window chair table bed lamp clock
phone screen card ticket paper sheet cloth shirt shoe sock hat glove sheep cow horse pig goat dog cat bird
duck chicken goose fish shark whale crab shrimp ant bee fly bug insect butterfly spider snail worm frog
person people man woman child boy girl face head eye hand finger foot car truck bus bike boat ship plane
train wheel tire cell dot spot star circle square triangle shape object thing item piece part unit
marble pebble shell crystal cube sphere cylinder cone pipe tube rod stick bar nail screw bolt nut washer
""".split()


def generated_vocab() -> list[str]:
    """A small self-contained WordPiece vocabulary: specials, punctuation, a-z, 0-9, their ## forms, common nouns."""
    pieces = list(string.ascii_lowercase + string.digits)
    vocab = SPECIALS + list(string.punctuation) + pieces + ["##" + p for p in pieces] + COMMON_NOUNS
    return list(dict.fromkeys(vocab))


def bert_tokenizer_json(vocab: list[str]) -> str:
    """BERT uncased normaliser and pre-tokeniser, WordPiece over `vocab`, [CLS] x [SEP] template, as JSON."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    ids = {token: i for i, token in enumerate(vocab)}
    missing = [t for t in ("[UNK]", "[CLS]", "[SEP]") if t not in ids]
    if missing:
        raise PersenseError(f"detector vocabulary lacks {', '.join(missing)}; not a BERT vocabulary")
    tokenizer = Tokenizer(WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer.to_str()


def _read_vocab_txt(path: Path) -> list[str]:
    """The tokens of a BERT vocab.txt, one per "\n"-ended line, in id order (as transformers reads it: tokens such as
    U+2028 that str.splitlines would split on stay whole)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def tokenizer_json(source: Path | None) -> str:
    """The tokenizer JSON from a tokenizer.json, a vocab.txt, a checkpoint folder holding either, or generated."""
    from tokenizers import Tokenizer

    if source is None:
        return bert_tokenizer_json(generated_vocab())
    if source.is_dir():
        found = [source / name for name in ("tokenizer.json", "vocab.txt") if (source / name).is_file()]
        if not found:
            raise PersenseError(
                f"{source}: no tokenizer.json or vocab.txt; pass the checkpoint's tokenizer with "
                f"--detector-tokenizer PATH"
            )
        source = found[0]
    if not source.is_file():
        raise PersenseError(f"{source}: detector tokenizer not found")
    if source.suffix == ".txt":
        return bert_tokenizer_json(_read_vocab_txt(source))
    text = source.read_text(encoding="utf-8")
    try:
        Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises its own exception type
        raise PersenseError(f"{source}: not a tokenizers JSON file ({str(exc).splitlines()[0]})") from exc
    return text


def delimiter_ids(text: str) -> list[int]:
    """Ids of Grounding DINO's phrase delimiters ([CLS], [SEP], ".", "?") in a tokenizer JSON."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(text)
    ids = [tokenizer.token_to_id(token) for token in DELIMITERS]
    missing = [token for token, i in zip(DELIMITERS, ids) if i is None]
    if missing:
        raise PersenseError(f"detector tokenizer lacks {', '.join(missing)}; not a BERT tokenizer")
    return ids


def vocab_size(text: str) -> int:
    """Number of tokens of a tokenizer JSON (its largest id + 1)."""
    vocab = json.loads(text)["model"]["vocab"]
    return max(vocab.values()) + 1
