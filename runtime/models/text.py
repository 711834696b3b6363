"""The detector's text side: the original's caption rule and BERT tokenisation with the exported tokenizer.

Grounding DINO's `predict_with_classes(classes=[word])` captions `". ".join([word])`, which
`preprocess_caption` lower-cases, strips and ends with "." (groundingdino/util/inference.py); the model
tokenises it with BERT's uncased WordPiece tokenizer as `[CLS] caption [SEP]`. Here the tokenizer is the
`tokenizers` JSON that persense-export wrote next to the detector, checked against its manifest hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from persense.runtime.errors import PersenseError
from persense.runtime.manifest import sha256_file

CLS, SEP, UNK = "[CLS]", "[SEP]", "[UNK]"


def all_caption(word: str) -> str:
    """persense.py's `enhance_class_name` for one class word: "all <plural>" (its second detection's class)."""
    last = word[-1].lower()
    if last == "s":
        return f"all {word}"
    if last == "y":
        return f"all {word}s" if len(word) > 1 and word[-2].lower() == "e" else f"all {word[:-1]}ies"
    if last == "h" or last in "aiou":
        return f"all {word}es"
    return f"all {word}s"


def caption_for(prompt: str) -> str:
    """The original's caption for one class: lower-cased, stripped, with "." appended unless it ends with one."""
    caption = prompt.lower().strip()
    return caption if caption.endswith(".") else caption + "."


@dataclass(frozen=True)
class TextTokens:
    """A tokenised caption as the detector engine takes it ([1,T] int64 arrays) and its tokens."""

    prompt: str
    caption: str
    tokens: tuple[str, ...]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        """The text inputs of the detector engine."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "token_type_ids": self.token_type_ids,
        }


class TextEncoder:
    """BERT tokenisation of prompts with the detector's tokenizer, refusing prompts the detector cannot take."""

    def __init__(self, path: str | Path, max_text_len: int) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own exception type for unreadable JSON
            raise PersenseError(
                f"{path}: not a tokenizers JSON file ({str(exc).splitlines()[0]}); "
                f"re-export the detector with persense-export --detector"
            ) from exc
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_text_len = max_text_len
        self.unk_id = self.tokenizer.token_to_id(UNK)
        probe = self.tokenizer.encode("a.").tokens
        if probe[:1] != [CLS] or probe[-1:] != [SEP]:
            raise PersenseError(
                f"{path}: the tokenizer does not wrap text as [CLS] ... [SEP] as BERT does; "
                f"re-export the detector with persense-export --detector"
            )

    @staticmethod
    def verified(path: Path, sha256: str, max_text_len: int) -> TextEncoder:
        """The encoder of a tokenizer file whose sha256 is the manifest's."""
        if not path.is_file():
            raise PersenseError(
                f"{path}: the detector's tokenizer is missing; re-export it with "
                f"`persense-export --detector ... --out {path.parent}`"
            )
        actual = sha256_file(path)
        if actual != sha256:
            raise PersenseError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest ({sha256[:12]}...): "
                f"the tokenizer was modified or replaced; re-export the detector"
            )
        return TextEncoder(path, max_text_len)

    def encode(self, prompt: str, allow_unknown: bool = False) -> TextTokens:
        """The caption of `prompt` tokenised; empty prompts, unknown words (unless `allow_unknown`: a caption
        persense derived, as the original tokenises whatever it gets) and over-long prompts are refused."""
        if not prompt.replace(".", " ").strip():
            raise PersenseError(f"text prompt {prompt!r} is empty: give the object's name, e.g. --text apple")
        caption = caption_for(prompt)
        encoding = self.tokenizer.encode(caption)
        unknown = [
            caption[start:end] for token, (start, end) in zip(encoding.ids, encoding.offsets) if token == self.unk_id
        ]
        if unknown and not allow_unknown:
            raise PersenseError(
                f"text prompt {prompt!r}: {', '.join(map(repr, unknown))} not in the detector's "
                f"vocabulary (tokenised to {UNK}); use another word"
            )
        if len(encoding.ids) > self.max_text_len:
            raise PersenseError(
                f"text prompt {prompt!r} is {len(encoding.ids)} tokens long; the detector takes at "
                f"most {self.max_text_len} (with [CLS] and [SEP]): shorten it"
            )

        def row(values: list[int]) -> np.ndarray:
            return np.asarray(values, np.int64).reshape(1, -1)

        return TextTokens(
            prompt,
            caption,
            tuple(encoding.tokens),
            row(encoding.ids),
            row(encoding.attention_mask),
            row(encoding.type_ids),
        )

    def decode(self, ids: list[int]) -> str:
        """Text of token ids as the original's `tokenizer.decode` gives it (pieces joined, special tokens kept)."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)
