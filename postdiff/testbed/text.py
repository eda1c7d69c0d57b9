"""Captions and the tokenizer of the embedded model.

The tokenizer is a real `transformers.CLIPTokenizer` built from vocabulary files that this module writes:
every single character (with and without the end-of-word mark) plus whole words of a small vocabulary,
reached by left-to-right merges, so any lower-case text tokenizes and the known words are one token each.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

from .data import CLASS_NAMES

# Every way a prompt may name a class; the first is the canonical name used in "a photo of a NAME".
CLASS_SYNONYMS = {
    0: ("t-shirt", "t-shirts", "tshirt", "tee", "top", "t-shirt/top"),
    1: ("trouser", "trousers", "pants", "jeans"),
    2: ("pullover", "pullovers", "sweater", "jumper"),
    3: ("dress", "dresses"),
    4: ("coat", "coats", "jacket"),
    5: ("sandal", "sandals"),
    6: ("shirt", "shirts", "blouse"),
    7: ("sneaker", "sneakers", "trainer", "trainers"),
    8: ("bag", "bags", "handbag", "purse"),
    9: ("ankle boot", "ankle boots", "boot", "boots"),
}
TEMPLATES = (
    "a photo of a {}",
    "a photo of an {}",
    "{}",
    "a picture of a {}",
    "a picture of an {}",
    "an image of a {}",
    "a {}",
    "a black and white photo of a {}",
    "a photo of the {}",
    "a small photo of a {}",
)
EXTRA_WORDS = ("a", "an", "the", "of", "photo", "picture", "image", "black", "and", "white", "small", "/")
EMPTY_CAPTION_SHARE = 0.1  # captions dropped to "" so the model learns the unconditional branch for CFG
MAX_LENGTH = 16

assert tuple(names[0] for names in CLASS_SYNONYMS.values()) == CLASS_NAMES

def caption_for(label: int, rng: random.Random) -> str:
    if rng.random() < EMPTY_CAPTION_SHARE:
        return ""
    return rng.choice(TEMPLATES).format(rng.choice(CLASS_SYNONYMS[label]))

def canonical_prompt(label: int) -> str:
    return f"a photo of a {CLASS_NAMES[label]}"

def classes_named(prompt: str) -> list[int]:
    """The classes that `prompt` names by any of their synonyms, as whole words ("a photo of a cat": none)."""
    text = prompt.lower()
    return [label for label, names in CLASS_SYNONYMS.items()
            if any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) for name in names)]

def _word_pieces() -> list[str]:
    words = set(EXTRA_WORDS)
    for names in CLASS_SYNONYMS.values():
        for name in names:
            words.update(part for part in name.replace("-", " - ").replace("/", " / ").split())
    return sorted(w for w in words if w.isalpha())

def write_tokenizer_files(folder: Path, max_length: int = MAX_LENGTH, extra_words: tuple[str, ...] = ()) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for `CLIPTokenizer.from_pretrained(folder)`;
    `extra_words` (the video model's motions) come after the image models' words, whose ids stay as they are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for special in ("<|startoftext|>", "<|endoftext|>"):
        add(special)
    for char in string.ascii_lowercase + string.digits + string.punctuation:
        add(char)
        add(char + "</w>")
    merges: list[str] = []
    known = _word_pieces()
    for word in known + sorted(set(extra_words) - set(known)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            merges.append(f"{merged} {symbol}")
            merged += symbol
            add(merged)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder
