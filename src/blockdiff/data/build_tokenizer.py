"""Regenerate the shipped tiny tokenizer (``src/blockdiff/data/tokenizer/``) deterministically.

    python -m blockdiff.data.build_tokenizer [OUT_DIR]

Design (a word-level vocabulary with character fallback, no training step, so the output is a
pure function of this file and ``synthetic.vocabulary_words()``):

* Gemma 4's control tokens sit at the released tokenizer's ids (``gemma4.SPECIAL_TOKEN_IDS``: pad 0,
  eos 1, bos 2, unk 3, mask 4, the tool tokens 46-52, ``<|think|>`` 98, ``<|channel>`` 100, ``<channel|>`` 101,
  ``<|turn>`` 105, ``<turn|>`` 106); ordinary vocabulary fills the ids between and after them;
* the chat template is blockdiff's own Gemma 4 template (``gemma4_chat_template.jinja``), written beside
  the tokenizer as ``chat_template.jinja``;
* a regex pre-tokenizer splits text into known words (with an optional leading space), else
  single characters (with an optional leading space), else single whitespace characters. So
  every digit is its own token (arithmetic stays learnable), any printable ASCII text round
  trips, and only non-ASCII characters map to ``<unk>``;
* the decoder just concatenates pieces (spaces live inside the tokens);
* like Gemma, plain encoding prepends ``<bos>``; the chat template adds it itself.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from blockdiff.data.gemma4 import SPECIAL_TOKEN_IDS, project_chat_template
from blockdiff.data.synthetic import vocabulary_words

SPECIAL_TOKENS = [SPECIAL_TOKEN_IDS[i] for i in sorted(SPECIAL_TOKEN_IDS)]

# Small general vocabulary so ad-hoc prompts (and GSM8K-like text) are not all characters.
COMMON_WORDS = (
    "a an the and or but if then else so of to in on at by for with from as into than "
    "is are was were be been has have had do does did will would can could should may must "
    "it its he she they we you i me him her them us his their our your my this that these those "
    "what which who whom whose when where why how many much more most less least all each every "
    "some any no not none one two three four five six seven eight nine ten hundred thousand "
    "half twice times total sum difference product number numbers answer question "
    "day days week weeks month months year years hour hours minute minutes "
    "money dollar dollars cent cents price cost costs pay pays paid sell sells sold buy bought "
    "make makes made take takes took give gave get got put left right there here after before "
    "per rate percent every other same new old first second third last next "
    "user model system assistant please think step solve calculate "
    "thought call response"
)

PRINTABLE = [chr(c) for c in range(0x20, 0x7F)] + ["\t"]


def build_vocab() -> dict[str, int]:
    """Deterministic vocabulary: the control tokens at their ids; newline, characters, then words (sorted)
    fill the other ids in order."""
    ordinary: list[str] = ["\n"]
    for ch in PRINTABLE:
        ordinary += [ch, " " + ch]
    for word in word_list():
        ordinary += [word, " " + word]
    ordinary = list(dict.fromkeys(t for t in ordinary if t not in SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in SPECIAL_TOKEN_IDS.items()}
    next_id = 0
    for tok in ordinary:
        while next_id in SPECIAL_TOKEN_IDS:
            next_id += 1
        vocab[tok] = next_id
        next_id += 1
    return vocab


def word_list() -> list[str]:
    words = set(COMMON_WORDS.split()) | set(vocabulary_words())
    words |= {w.capitalize() for w in COMMON_WORDS.split()}  # sentence starts
    words.add("####")  # GSM8K final-answer marker: one token instead of four
    return sorted(w for w in words if len(w) > 1)  # single characters are covered already


def pre_tokenizer_pattern() -> str:
    # Longest words first so alternation prefers them; the lookahead stops "pen" matching "pens".
    words = sorted(word_list(), key=lambda w: (-len(w), w))
    alternation = "|".join(re.escape(w) for w in words)
    return rf" ?(?:{alternation})(?![A-Za-z0-9_])| ?[^\s]|\s"


def build_tokenizer() -> Tokenizer:
    vocab = build_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pre_tokenizer_pattern()), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)])
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "additional_special_tokens": SPECIAL_TOKENS[5:],  # the chat format's control tokens
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "padding_side": "right",
    }


def special_tokens_map() -> dict:
    cfg = tokenizer_config()
    keys = ["bos_token", "eos_token", "pad_token", "unk_token", "mask_token", "additional_special_tokens"]
    return {k: cfg[k] for k in keys}


def write(out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    (out / "chat_template.jinja").write_text(project_chat_template(), encoding="utf-8")
    for name, obj in (("tokenizer_config.json", tokenizer_config()),
                      ("special_tokens_map.json", special_tokens_map())):
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).with_name("tokenizer")
    write(out)
    print(f"wrote tiny tokenizer ({len(build_vocab())} tokens) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
