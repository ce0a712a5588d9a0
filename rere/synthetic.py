"""A synthetic catalogue for benchmarks and tests: product-like titles, a byte-level BPE
tokenizer trained on them, prompts of purchase histories, the item trie and a random Qwen2.

Nothing is downloaded; everything follows from the seed.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rere.decoding import ItemTrie

PAD, EOS = "<pad>", "<eos>"

_SYLLABLES = ["ka", "lo", "zen", "tri", "vo", "mar", "ex", "qui", "ra", "sol", "nu", "ve", "tor", "lix", "ban", "do"]
_ADJECTIVES = (
    "Ergonomic Portable Heavy-Duty Compact Premium Adjustable Rechargeable Waterproof Slim Ultra-Light Foldable "
    "Wireless Insulated Reusable Magnetic Non-Slip Quiet Professional Vintage Modern Classic Deluxe Eco-Friendly "
    "Durable Soft Ventilated Anti-Glare Stackable Retractable Cordless"
).split()
_MATERIALS = ["Stainless Steel", "Bamboo", "Leather", "Aluminum", "Silicone", "Cotton", "Glass", "Walnut", "Canvas"]
_NOUNS = [
    "Mouse", "Desk Lamp", "Notebook", "Stapler", "Water Bottle", "Backpack", "Phone Case", "Headphones", "Keyboard",
    "Coffee Mug", "Yoga Mat", "Pen Set", "Monitor Stand", "Paper Shredder", "Label Maker", "File Organizer",
    "Desk Chair", "Whiteboard", "Calculator", "USB Hub", "Laptop Sleeve", "Bookends", "Sticky Notes", "Highlighters",
    "Planner", "Scissors", "Tape Dispenser", "Webcam", "Speaker", "Charging Cable", "Travel Mug", "Lunch Box",
]  # fmt: skip
_COLORS = ["Black", "White", "Navy Blue", "Rose Gold", "Gray", "Red", "Forest Green", "Sky Blue", "Beige", "Purple"]
_SIZES = ["12 oz", "15.6 inch", "A5", "Large", "XL", "500 ml", "Letter Size", "10 x 12 in", "Medium", "2 ft"]


def synthetic_titles(n: int, rng: random.Random) -> list[str]:
    """`n` distinct product titles like 'Voqui Portable Bamboo Desk Lamp KL-482, Gray (Pack of 3)'."""
    brands = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title() for _ in range(400)})
    titles: dict[str, None] = {}
    while len(titles) < n:
        words = [rng.choice(brands)]
        words += rng.sample(_ADJECTIVES, rng.randint(0, 2))
        if rng.random() < 0.4:
            words.append(rng.choice(_MATERIALS))
        words.append(rng.choice(_NOUNS))
        if rng.random() < 0.5:
            letters = "".join(rng.choice("ABCDEFGHKLMNPRSTXZ") for _ in range(2))
            words.append(f"{letters}-{rng.randint(10, 9999)}")
        title = " ".join(words)
        if rng.random() < 0.5:
            title += f", {rng.choice(_COLORS)}"
        if rng.random() < 0.3:
            title += f", {rng.choice(_SIZES)}"
        if rng.random() < 0.2:
            title += f" (Pack of {rng.randint(2, 12)})"
        titles[title] = None
    return list(titles)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (the `tokenizers` library) with <pad> = 0 and <eos> = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def prompt_text(history: list[str]) -> str:
    return "Purchase history: " + ", ".join(f'"{t}"' for t in history) + "\nNext item: "


def completion_text(title: str) -> str:
    return f'"{title}"\n'


def build_setup(args: argparse.Namespace, seed: int) -> dict:
    """Catalogue, tokenizer, trie, prompts and model, all from `seed`."""
    rng = random.Random(seed)
    titles = synthetic_titles(args.items, rng)
    histories = [rng.sample(range(len(titles)), args.history) for _ in range(args.prompts)]
    corpus = [completion_text(t) for t in titles] + [prompt_text([titles[i] for i in h]) for h in histories]
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    vocab = tokenizer.get_vocab_size()
    seqs = [enc.ids + [eos_id] for enc in tokenizer.encode_batch([completion_text(t) for t in titles])]
    prompts = [enc.ids for enc in tokenizer.encode_batch([prompt_text([titles[i] for i in h]) for h in histories])]
    trie = ItemTrie.from_sequences(seqs, vocab)
    torch.manual_seed(seed)
    heads = max(1, args.hidden_size // 64)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=max(512, 2 * max(len(p) for p in prompts)),
        tie_word_embeddings=True,
        # Wider than the default 0.02 so that a random model's next-token distributions are
        # peaked like a trained one's, rather than near-uniform (where beams are all near-ties).
        initializer_range=0.2,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    return {"seqs": seqs, "prompts": prompts, "trie": trie, "model": model, "pad_id": pad_id, "eos_id": eos_id}
