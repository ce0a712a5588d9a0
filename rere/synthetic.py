"""A synthetic catalogue for benchmarks and tests: product-like titles, a byte-level BPE
tokenizer trained on them, prompts of purchase histories, the item trie and a random Qwen2.

A BPE trained on a few thousand titles stops far below a Qwen2.5-sized vocabulary (151,936:
the corpus has too few distinct pairs to merge), so for paper-shaped benchmarks the trained
ids are spread over a larger model vocabulary by a seeded random injection (`model_vocab`):
the trie keeps the shape BPE gives the titles (shared brand and word prefixes, ~20 tokens per
title at a small BPE), while every vocabulary-sized tensor (logits, masks, top-k) has the
paper's width. Nothing is downloaded; everything follows from the seed.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

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


def spread_ids(trained: int, model_vocab: int, keep: Sequence[int], seed: int) -> torch.Tensor:
    """(trained,) new id of each trained token id: a seeded injection into [0, model_vocab), with
    the ids in `keep` (pad, EOS) mapped to themselves.

    >>> new = spread_ids(300, 151_936, keep=[0, 1], seed=0)
    >>> new[:2].tolist(), len(set(new.tolist())), int(new.max()) < 151_936
    ([0, 1], 300, True)
    """
    if model_vocab < trained:
        raise ValueError(f"model_vocab {model_vocab} is smaller than the trained vocabulary {trained}")
    keep = sorted(set(keep))
    others = torch.tensor([i for i in range(model_vocab) if i not in keep])
    pick = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[: trained - len(keep)]]
    new = torch.empty(trained, dtype=torch.long)
    new[keep] = torch.tensor(keep)
    rest = torch.tensor([i for i in range(trained) if i not in keep], dtype=torch.long)
    new[rest] = pick
    return new


def build_setup(args: argparse.Namespace, seed: int) -> dict:
    """Catalogue, tokenizer, trie, prompts and model, all from `seed`.

    `args`: items, prompts, history, vocab_size (BPE), hidden_size, layers, and optionally
    model_vocab (spread the BPE's ids over a vocabulary this wide; None: the BPE's own size).
    """
    rng = random.Random(seed)
    titles = synthetic_titles(args.items, rng)
    histories = [rng.sample(range(len(titles)), args.history) for _ in range(args.prompts)]
    corpus = [completion_text(t) for t in titles] + [prompt_text([titles[i] for i in h]) for h in histories]
    tokenizer = train_tokenizer(corpus, args.vocab_size)
    pad_id, eos_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    vocab = tokenizer.get_vocab_size()
    seqs = [enc.ids + [eos_id] for enc in tokenizer.encode_batch([completion_text(t) for t in titles])]
    prompts = [enc.ids for enc in tokenizer.encode_batch([prompt_text([titles[i] for i in h]) for h in histories])]
    model_vocab = getattr(args, "model_vocab", None)
    if model_vocab:
        new = spread_ids(vocab, model_vocab, keep=[pad_id, eos_id], seed=seed).tolist()
        seqs = [[new[t] for t in s] for s in seqs]
        prompts = [[new[t] for t in p] for p in prompts]
        vocab = model_vocab
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
    return {
        "seqs": seqs,
        "prompts": prompts,
        "trie": trie,
        "model": model,
        "pad_id": pad_id,
        "eos_id": eos_id,
        "tokenizer": tokenizer,  # tokenizers.Tokenizer (the BPE's own ids, before any spreading)
        "titles": titles,
        "histories": histories,
    }
