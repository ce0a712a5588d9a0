"""Prompts, seeded instruction choice, and in-context item tokens for three tokenizer families."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from rere import RereError
from rere.model import train_tokenizer
from rere.prompts import (
    INSTRUCTIONS,
    build_prompt,
    completion_text,
    item_token_ids,
    probe_prompts,
    row_key,
    row_prompt,
    row_rng,
)

CODES = ['"Toy Story (1995)"', '"Heat (1995)"', '"Up (2009)"', '"Heat (1995) 2"']
CORPUS = [
    'History: "Toy Story (1995)", "Heat (1995)"\nNext:\n"Up (2009)"\n',
    '### Instruction:\nRecommend the next item.\n\n### Input:\n"Up (2009)"\n\n### Response:\n"Heat (1995) 2"\n',
] * 20 + ["the quick brown fox jumps over the lazy dog 0123456789"] * 5


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def gpt2_style():
    """Byte-level BPE with GPT-2's pre-tokenizer, wrapped as transformers' GPT2Tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    return GPT2Tokenizer(vocab=model["vocab"], merges=_merges(model))


def llama_style():
    """Metaspace BPE with byte fallback (SentencePiece-like), wrapped as LlamaTokenizer (adds BOS)."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    # Trained on whitespace- and newline-separated words, as SentencePiece is: no merge spans "\n".
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    )
    model = json.loads(backend.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=_merges(model))


def test_compact_prompt_and_completion_text():
    assert build_prompt(['"A"', "<a_1><b_2>"], "compact", random.Random(0)) == 'History: "A", <a_1><b_2>\nNext:\n'
    assert completion_text('"A"') == '"A"\n'
    with pytest.raises(RereError, match="prompt style 'chat' is unknown"):
        build_prompt(['"A"'], "chat", random.Random(0))


def test_instruction_prompt_layout():
    prompt = build_prompt(['"A"', '"B"'], "instruction", random.Random(0))
    instruction = random.Random(0).choice(INSTRUCTIONS)
    assert prompt == f'### Instruction:\n{instruction}\n\n### Input:\n"A", "B"\n\n### Response:\n'


def test_instruction_variant_is_seeded_per_row():
    def variant(seed, key):
        prompt = build_prompt(['"A"'], "instruction", row_rng(seed, key))
        return next(i for i, text in enumerate(INSTRUCTIONS) if text in prompt)

    # The same (seed, row) gives the same variant every time, in any process (sha256, not hash()).
    assert [variant(42, f"u{i}") for i in range(30)] == [variant(42, f"u{i}") for i in range(30)]
    assert (
        row_rng(42, "u1").random()
        == random.Random(int.from_bytes(__import__("hashlib").sha256(b"42\x1fu1").digest()[:8], "big")).random()
    )
    # Rows spread over every variant, and the seed changes the assignment.
    assert {variant(42, f"u{i}") for i in range(60)} == set(range(len(INSTRUCTIONS)))
    assert [variant(1, f"u{i}") for i in range(30)] != [variant(42, f"u{i}") for i in range(30)]


def test_row_prompt_uses_content_key_and_reports_unknown_items():
    row = {"user_id": "7", "item_id": 3, "timestamp": 100, "history_item_id": [1, 0], "_line": 5}
    code_of = {0: '"A"', 1: '"B"', 3: '"D"'}
    assert row_key(row) == "7:3:100"
    expected = build_prompt(['"B"', '"A"'], "instruction", row_rng(9, "7:3:100"))
    assert row_prompt(row, code_of, "instruction", 9) == expected
    with pytest.raises(RereError, match="line 5: history item 1 is not in the index"):
        row_prompt(row, {0: '"A"'}, "compact", 9)


def test_probe_prompts_cover_every_instruction_variant():
    probes = probe_prompts(CODES, "instruction", 0)
    assert len(probes) == len(INSTRUCTIONS)
    assert all(any(text in p for p in probes) for text in INSTRUCTIONS)
    assert all(p.endswith("### Response:\n") for p in probes)
    assert len(probe_prompts(CODES, "compact", 0)) == 3


@pytest.mark.parametrize("style", ["compact", "instruction"])
def test_scratch_tokenizer_boundary_is_stable(style):
    tok = train_tokenizer(iter(CORPUS), 400, 256)
    ids = item_token_ids(tok, CODES, probe_prompts(CODES, style, 0))
    assert len(ids) == len(CODES)
    for code, seq in zip(CODES, ids, strict=True):
        assert seq[-1] == tok.eos_token_id
        assert tok.decode(seq[:-1]) == code + "\n"
    # In context, the first token is the completion's own: it starts with '"', not with "\n".
    assert [tok.convert_ids_to_tokens(seq[0]) for seq in ids] == ['"', '"Heat', '"Up', '"Heat']


@pytest.mark.parametrize("style", ["compact", "instruction"])
def test_gpt2_style_boundary_is_stable(style):
    tok = gpt2_style()
    ids = item_token_ids(tok, CODES, probe_prompts(CODES, style, 0))
    assert ids[2] == tok('"Up (2009)"\n')["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids[2]) == ['"', "Up", "Ġ(", "2009", ')"', "Ċ", "<|endoftext|>"]


def test_llama_style_tokens_are_taken_in_context():
    tok = llama_style()
    ids = item_token_ids(tok, CODES, probe_prompts(CODES, "instruction", 0))
    # Standalone, SentencePiece-style tokenizers prefix the first word with "▁"; after a
    # prompt they do not: the trie must hold the in-context tokens.
    assert tok.tokenize('"Up (2009)"\n') == ["▁", '"Up', '▁(2009)"', "\n"]
    assert tok.convert_ids_to_tokens(ids[2]) == ['"Up', '▁(2009)"', "\n", "</s>"]
    assert tok.convert_ids_to_tokens(ids[0]) == ['"T', "oy", "▁Story", '▁(1995)"', "\n", "</s>"]
    assert all(seq[-1] == tok.eos_token_id for seq in ids)


def _unstable_tokenizer():
    """BPE over the whole string (no pre-tokenizer) with a merge across the boundary: '\\n' + '"'."""
    chars = sorted(set("".join(CORPUS) + "".join(CODES)))
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    vocab['\n"'] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", '"')]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", name_or_path="toy-unstable")


def test_unstable_boundary_raises_naming_tokenizer_and_item():
    tok = _unstable_tokenizer()
    with pytest.raises(RereError, match=r"toy-unstable.*boundary is unstable.*item '\"Toy Story \(1995\)\"'"):
        item_token_ids(tok, CODES, probe_prompts(CODES, "compact", 0))
    # A prompt ending in a space instead of "\n" is fine for this tokenizer: the check is real.
    ids = item_token_ids(tok, CODES, "History: x ")
    assert tok.convert_ids_to_tokens(ids[0][:2]) == ['"', "T"]


def test_items_that_tokenize_identically_are_refused():
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate('"Hitory:Nex \nA')}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(RereError, match=r"items '\"Aé\"' and '\"Aè\"' tokenize identically"):
        item_token_ids(tok, ['"Aé"', '"Aè"'], "History: A\nNext:\n")


def test_completion_tokens_that_depend_on_the_prompt_are_refused():
    # An empty "prompt" makes the Llama-style tokenizer prefix the first word with "▁"; after
    # a real prompt it does not. Probes that disagree must fail, not silently pick one.
    tok = llama_style()
    item_token_ids(tok, CODES, ["History: x\nNext:\n", "### Response:\n"])
    with pytest.raises(RereError, match=r"item '\"Toy Story \(1995\)\"' is tokenized as \['▁\"Toy'.*\['\"T', 'oy'"):
        item_token_ids(tok, CODES, ["", "History: x\nNext:\n"])
