"""Constrained decoding: trie tables against brute force, the stateless processor, beam search
equal to stock `generate` (every variant the benchmark times), and sampling.

Tiny random Qwen2, Llama and GPT-2 models are built from config; the catalogue is synthetic
titles tokenized by a byte-level BPE trained here with the `tokenizers` library.
"""

import doctest
import functools
import math
import random
from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicLayer

from rere import RereError
from rere.decoding import (
    ItemTrie,
    PrefixIndex,
    SharedPromptLayer,
    TrieLogitsProcessor,
    beam_search,
    sample,
    stock_beam_search,
)
from rere.synthetic import completion_text, prompt_text, synthetic_titles, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["qwen2", "llama", "gpt2"]


@pytest.fixture(scope="module")
def catalogue():
    """40 titles, a 700-token BPE (completions of 7-19 tokens), 12 prompts of 1-3 titles."""
    rng = random.Random(1)
    titles = synthetic_titles(40, rng)
    histories = [rng.sample(range(40), rng.randint(1, 3)) for _ in range(12)]
    texts = [completion_text(t) for t in titles] + [prompt_text([titles[i] for i in h]) for h in histories]
    tokenizer = train_tokenizer(texts, 700)
    pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("<eos>")
    seqs = [tokenizer.encode(completion_text(t)).ids + [eos] for t in titles]
    prompts = [tokenizer.encode(prompt_text([titles[i] for i in h])).ids for h in histories]
    assert len({len(p) for p in prompts}) > 3  # left padding is exercised
    vocab = tokenizer.get_vocab_size()
    return {
        "seqs": seqs,
        "prompts": prompts,
        "pad": pad,
        "eos": eos,
        "vocab": vocab,
        "trie": ItemTrie.from_sequences(seqs, vocab),
    }


def tiny_model(arch: str, vocab: int, eos: int, seed: int = 0):
    """A random 2-layer model; a wide init makes next-token distributions peaked (few near-ties)."""
    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "initializer_range": 0.5, "eos_token_id": eos, "bos_token_id": eos}
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)).eval()
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        **common,
    )
    return model_cls(config).eval()


def teacher_forced_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion token | prefix) from one plain forward pass, no padding."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(completion))


def assert_same_beams(ours, theirs, tol=1e-4):
    """Equal items in equal order, scores within tol; a swap is only accepted between near-ties."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == len(b)
        for (ia, sa), (ib, sb) in zip(a, b, strict=True):
            assert sa == pytest.approx(sb, abs=tol)
            if ia != ib:  # only a tie may reorder: the other side's item sits next to it with an equal score
                assert any(i == ia and abs(s - sa) < tol for i, s in b), (a, b)


def test_trie_numbering_by_hand():
    # Root 0; depth 1: token 5 -> 1, 8 -> 2; depth 2: (1,6) -> 3, (1,7) -> 4, (2,EOS) -> 5;
    # depth 3: (3,EOS) -> 6, (4,EOS) -> 7. Leaves 6, 7, 5 are items 0, 1, 2.
    trie = ItemTrie.from_sequences([[5, 6, 2], [5, 7, 2], [8, 2]], vocab_size=10)
    assert trie.num_nodes == 8 and trie.max_depth == 3 and trie.eos_token_id == 2
    assert trie.item_of_leaf.tolist() == [-1, -1, -1, -1, -1, 2, 0, 1]
    assert trie.edge_keys.tolist() == [
        0 * 10 + 5,
        0 * 10 + 8,
        1 * 10 + 6,
        1 * 10 + 7,
        2 * 10 + 2,
        3 * 10 + 2,
        4 * 10 + 2,
    ]
    assert trie.step(torch.tensor([0, 1, 1, 2, -1]), torch.tensor([8, 7, 8, 2, 5])).tolist() == [2, 4, -1, 5, -1]
    assert trie.items_of(torch.tensor([[5, 7, 2], [8, 2, 0], [5, 6, 6]])).tolist() == [1, 2, -1]


def _random_catalogue(rng: random.Random, vocab: int, eos: int, n: int) -> list[list[int]]:
    seqs: set[tuple[int, ...]] = set()
    while len(seqs) < n:
        # A small alphabet at the front makes shared prefixes and wide nodes.
        head = [rng.randrange(3, 6) for _ in range(rng.randint(0, 2))]
        seqs.add(tuple(head + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))] + [eos]))
    return [list(s) for s in sorted(seqs, key=lambda s: rng.random())]


@pytest.mark.parametrize("max_sparse_children", [1, 3, 64])
def test_trie_agrees_with_brute_force_on_every_prefix(max_sparse_children):
    rng = random.Random(max_sparse_children)
    vocab, eos = 40, 1
    seqs = _random_catalogue(rng, vocab, eos, 150)
    trie = ItemTrie.from_sequences(seqs, vocab, max_sparse_children=max_sparse_children)
    assert trie.num_items == 150
    if max_sparse_children < 64:
        assert trie.wide.any()  # the CSR path for wide nodes is exercised
    prefixes = {tuple(s[:k]) for s in seqs for k in range(len(s))}
    for length in range(trie.max_depth):
        group = sorted(p for p in prefixes if len(p) == length)
        tokens = torch.tensor(group, dtype=torch.long).view(len(group), length)  # (n, length)
        walked = trie.walk(tokens)
        assert (walked >= 0).all()
        assert torch.equal(PrefixIndex.of(trie).locate(tokens), walked)  # hashed lookup == exact walk
        allowed = trie.allowed(walked)
        for row, prefix in enumerate(group):
            expected = {s[length] for s in seqs if tuple(s[:length]) == prefix}
            assert set(allowed[row].nonzero().flatten().tolist()) == expected, prefix
    full = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=eos)
    assert trie.items_of(full).tolist() == list(range(150))
    # Off the trie (and past a leaf): -1, and only EOS is allowed, never an empty row.
    off = torch.tensor([[2, 2], [39, 39]])
    assert trie.walk(off).tolist() == [-1, -1] and PrefixIndex.of(trie).locate(off).tolist() == [-1, -1]
    assert trie.allowed(torch.tensor([-1]))[0].nonzero().flatten().tolist() == [eos]


def test_trie_rejects_bad_catalogues():
    with pytest.raises(RereError, match="empty"):
        ItemTrie.from_sequences([], vocab_size=10)
    with pytest.raises(RereError, match="items 0 and 2 have the same tokens"):
        ItemTrie.from_sequences([[3, 4, 1], [3, 1], [3, 4, 1]], vocab_size=10)
    with pytest.raises(RereError, match="item 1 ends with token 4"):
        ItemTrie.from_sequences([[3, 1], [3, 4]], vocab_size=10)
    with pytest.raises(RereError, match="item 1: the EOS id 1 appears at position 0"):
        ItemTrie.from_sequences([[3, 1], [1, 3, 1]], vocab_size=10)
    with pytest.raises(RereError, match="token 12 is outside"):
        ItemTrie.from_sequences([[3, 1], [12, 1]], vocab_size=10)


def test_processor_masks_by_hand_and_is_stateless():
    trie = ItemTrie.from_sequences([[5, 6, 2], [5, 7, 2], [8, 2]], vocab_size=10)
    processor = TrieLogitsProcessor(trie, prompt_length=2)
    # Left-padded prompts (pad 0) of width 2; generated: [5] -> {6, 7}; [8] -> {EOS}; [3] off -> {EOS}.
    step1 = torch.tensor([[9, 9, 5], [0, 9, 8], [9, 9, 3]])
    scores = torch.arange(30, dtype=torch.float).view(3, 10)
    out = processor(step1, scores.clone())
    expected = torch.full((3, 10), -math.inf)
    expected[0, 6], expected[0, 7], expected[1, 2], expected[2, 2] = 6.0, 7.0, 12.0, 22.0
    assert torch.equal(out, expected)
    # Any order of steps, same instance: no step counter.
    step2 = torch.tensor([[9, 9, 5, 7], [0, 9, 8, 2]])
    assert processor(step2, torch.zeros(2, 10)).isfinite().nonzero().tolist() == [[0, 2], [1, 2]]
    step0 = torch.tensor([[9, 9]])
    assert processor(step0, torch.zeros(1, 10)).isfinite().nonzero().tolist() == [[0, 5], [0, 8]]
    assert torch.equal(processor(step1, scores.clone()), expected)
    # A model whose score rows are wider than the trie's vocabulary: extra columns are never allowed.
    wide = processor(step0, torch.zeros(1, 13))
    assert wide.isfinite().nonzero().tolist() == [[0, 5], [0, 8]]
    with pytest.raises(RereError, match="built for prompts of 2 tokens"):
        processor(torch.tensor([[9]]), torch.zeros(1, 10))


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_valid_distinct_and_scored(catalogue, arch):
    model = tiny_model(arch, catalogue["vocab"], catalogue["eos"])
    prompts, seqs = catalogue["prompts"], catalogue["seqs"]
    results = beam_search(model, prompts, catalogue["trie"], 6, catalogue["pad"], batch_size=5)
    assert len(results) == len(prompts)
    for prompt, beams in zip(prompts, results, strict=True):
        items = [i for i, _ in beams]
        assert len(items) == 6 and len(set(items)) == 6 and all(0 <= i < len(seqs) for i in items)
        scores = [s for _, s in beams]
        assert scores == sorted(scores, reverse=True)
        for item, score in beams[:3]:
            assert score == pytest.approx(teacher_forced_logprob(model, prompt, seqs[item]), abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_equals_stock_generate(catalogue, arch, seed):
    model = tiny_model(arch, catalogue["vocab"], catalogue["eos"], seed=seed)
    prompts = catalogue["prompts"][seed * 6 : seed * 6 + 6]
    args = (model, prompts, catalogue["trie"], 5, catalogue["pad"])
    assert_same_beams(beam_search(*args, batch_size=3), stock_beam_search(*args, batch_size=4))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_sparse_children", [1, 4, 16])
def test_every_beam_search_variant_equals_stock(catalogue, arch, max_sparse_children):
    """The benchmark's rows: with or without the shared prefill, dense, allowed-only or live
    scoring (allowed-only, skipping the output layer for beams that can no longer finish), the
    same beams as stock generate. Narrow tries make most nodes wide (the CSR path)."""
    trie = ItemTrie.from_sequences(catalogue["seqs"], catalogue["vocab"], max_sparse_children=max_sparse_children)
    if max_sparse_children < 16:
        assert trie.wide.any()
    model = tiny_model(arch, catalogue["vocab"], catalogue["eos"], seed=max_sparse_children)
    prompts, pad = catalogue["prompts"][:7], catalogue["pad"]
    stock = stock_beam_search(model, prompts, trie, 6, pad, batch_size=7)
    for shared in (True, False):
        dense = beam_search(model, prompts, trie, 6, pad, 3, shared_prefill=shared, scoring="dense")
        allowed = beam_search(model, prompts, trie, 6, pad, 3, shared_prefill=shared, scoring="allowed")
        live = beam_search(model, prompts, trie, 6, pad, 3, shared_prefill=shared, scoring="live")
        assert allowed == dense  # the very same float values are ranked
        assert [[i for i, _ in row] for row in live] == [[i for i, _ in row] for row in dense]
        assert_same_beams(live, dense)  # a matrix product over fewer rows: last-bit differences
        assert_same_beams(live, stock)
    with pytest.raises(RereError, match="scoring must be one of"):
        beam_search(model, prompts, trie, 6, pad, scoring="sparse")


def test_allowed_scoring_pads_when_the_trie_has_fewer_than_2b_candidates():
    # 3 items, 3 beams: at most 3 allowed candidates per step against 2B = 6 slots.
    trie = ItemTrie.from_sequences([[5, 2], [6, 7, 2], [6, 8, 2]], vocab_size=16, max_sparse_children=1)
    model = tiny_model("qwen2", 16, 2)
    prompts = [[3, 4], [9, 9, 9]]
    ours = beam_search(model, prompts, trie, 3, 0)
    assert beam_search(model, prompts, trie, 3, 0, scoring="allowed") == beam_search(
        model, prompts, trie, 3, 0, scoring="dense"
    )
    assert_same_beams(ours, beam_search(model, prompts, trie, 3, 0, scoring="dense"))
    assert_same_beams(ours, stock_beam_search(model, prompts, trie, 3, 0))
    assert all(sorted(i for i, _ in row) == [0, 1, 2] for row in ours)


def test_children_scores_are_what_the_mask_keeps():
    rng = random.Random(5)
    seqs = _random_catalogue(rng, 40, 1, 120)
    trie = ItemTrie.from_sequences(seqs, 40, max_sparse_children=3)
    nodes = torch.tensor([0, 1, 2, 5, 17, trie.num_nodes - 1, -1] + list(range(30, 60)))  # root, wide, leaves, sink
    scores = torch.randn(len(nodes), 43)  # wider than the vocabulary, like a padded embedding
    narrow, tokens, wide_rows, wide_tokens, wide_scores = trie.children_scores(scores, nodes)
    kept = {(r, t): v for r, row in enumerate(trie.mask_(scores.clone(), nodes).tolist()) for t, v in enumerate(row)}
    finite = {key: v for key, v in kept.items() if v != -math.inf}
    got = [((r, tokens[r, j].item()), narrow[r, j].item()) for r in range(len(nodes)) for j in range(tokens.shape[1])]
    got = [x for x in got if x[1] != -math.inf] + list(
        zip(zip(wide_rows.tolist(), wide_tokens.tolist(), strict=True), wide_scores.tolist(), strict=True)
    )
    assert len(got) == len(dict(got)) and dict(got) == finite  # each allowed (row, token) once, same values


def test_doctests():
    import rere.decoding.trie
    import rere.synthetic

    for module in (rere.decoding.trie, rere.synthetic):
        assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_head_is_used_only_when_it_gives_the_models_own_logits(catalogue, arch):
    from rere.decoding.cache import plain_head

    model = tiny_model(arch, catalogue["vocab"], catalogue["eos"])
    assert plain_head(model) is not None  # Qwen2, Llama, GPT-2: logits = lm_head(last hidden state)

    class Scaled(type(model)):  # logit scaling, as some architectures do: the head alone is not the logits
        @functools.wraps(type(model).forward)  # the same signature: generate passes the same arguments
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    scaled = tiny_model(arch, catalogue["vocab"], catalogue["eos"])
    scaled.__class__ = Scaled
    assert plain_head(scaled) is None
    trie, pad, prompts = catalogue["trie"], catalogue["pad"], catalogue["prompts"][:3]
    assert_same_beams(beam_search(scaled, prompts, trie, 4, pad), stock_beam_search(scaled, prompts, trie, 4, pad))


def test_shared_prompt_cache_matches_repeat_then_reorder():
    # 2 prompts of 3 tokens, 2 beams each; keys hold their own (row, position) so moves are visible.
    prompt_keys = torch.arange(6, dtype=torch.float).view(2, 1, 3, 1)  # (b, H, T, D)
    reference, layer = DynamicLayer(), DynamicLayer()
    reference.update(prompt_keys, -prompt_keys)
    layer.update(prompt_keys, -prompt_keys)
    reference.batch_repeat_interleave(2)
    shared = SharedPromptLayer(layer, repeats=2, capacity=2)
    for step in range(2):
        new = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(4, 1, 1, 1) + step  # (b*B, H, 1, D)
        ref_k, ref_v = reference.update(new, -new)
        k, v = shared.update(new, -new)
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
        order = torch.tensor([1, 1, 3, 2])  # beams only move within their prompt
        reference.reorder_cache(order)
        shared.reorder_cache(order)
    assert shared.get_seq_length() == 5
    # Step 0 rows end 10, 20, 30, 40 -> reorder -> 20, 20, 40, 30; step 1 appends 11, 21, 31, 41
    # -> (20,11) (20,21) (40,31) (30,41) -> reorder -> (20,21) (20,21) (30,41) (40,31).
    assert shared.keys[:, 0, :, 0].tolist() == [
        [0, 1, 2, 20, 21],
        [0, 1, 2, 20, 21],
        [3, 4, 5, 30, 41],
        [3, 4, 5, 40, 31],
    ]
    assert torch.equal(shared.keys, reference.keys) and torch.equal(shared.values, reference.values)


def test_sliding_window_model_falls_back_to_the_stock_cache():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.5,
        use_sliding_window=True,
        sliding_window=6,  # shorter than the prompts
        max_window_layers=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    trie = ItemTrie.from_sequences([[5, 6, 7, 8, 1], [5, 8, 1], [9, 1], [10, 11, 12, 13, 14, 1], [10, 11, 2, 1]], 50)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [2, 3, 4], [7] * 13]
    assert_same_beams(beam_search(model, prompts, trie, 4, 0), stock_beam_search(model, prompts, trie, 4, 0))


def test_one_processor_serves_two_generate_calls(catalogue):
    model = tiny_model("qwen2", catalogue["vocab"], catalogue["eos"])
    trie, pad = catalogue["trie"], catalogue["pad"]
    prompts = catalogue["prompts"][:4]
    width = max(len(p) for p in prompts)
    shared = TrieLogitsProcessor(trie, width)
    same_width = [prompts, prompts[::-1]]  # both batches pad to the same width
    first, second = (stock_beam_search(model, p, trie, 4, pad, 4, processor=lambda t, n: shared) for p in same_width)
    assert_same_beams(second[::-1], first)
    assert_same_beams(first, beam_search(model, prompts, trie, 4, pad))
    unscored = stock_beam_search(model, prompts, trie, 4, pad, with_scores=False)
    assert [[i for i, _ in row] for row in unscored] == [[i for i, _ in row] for row in first]
    assert all(math.isnan(s) for row in unscored for _, s in row)


def test_generation_config_cannot_turn_beam_search_into_sampling(catalogue):
    model = tiny_model("llama", catalogue["vocab"], catalogue["eos"])
    trie, pad, prompts = catalogue["trie"], catalogue["pad"], catalogue["prompts"][:3]
    clean_stock = stock_beam_search(model, prompts, trie, 4, pad)
    clean_ours = beam_search(model, prompts, trie, 4, pad)
    gc = model.generation_config
    gc.do_sample, gc.top_k, gc.top_p, gc.temperature = True, 2, 0.5, 0.3
    gc.repetition_penalty, gc.no_repeat_ngram_size = 3.0, 1
    for _ in range(2):
        assert stock_beam_search(model, prompts, trie, 4, pad) == clean_stock
        assert beam_search(model, prompts, trie, 4, pad) == clean_ours
    assert model.generation_config is gc and gc.do_sample and gc.top_k == 2  # restored, untouched
    assert_same_beams(clean_ours, clean_stock)


def test_left_padding_gives_the_same_beams_as_one_prompt_at_a_time(catalogue):
    model = tiny_model("gpt2", catalogue["vocab"], catalogue["eos"])
    trie, pad, prompts = catalogue["trie"], catalogue["pad"], catalogue["prompts"]
    batched = beam_search(model, prompts, trie, 4, pad, batch_size=len(prompts))
    alone = [beam_search(model, [p], trie, 4, pad)[0] for p in prompts]
    assert_same_beams(batched, alone)


def test_fewer_items_than_beams_raises():
    trie = ItemTrie.from_sequences([[5, 2], [6, 2], [7, 2]], vocab_size=16)
    model = tiny_model("qwen2", 16, 2)
    for search in (beam_search, stock_beam_search):
        with pytest.raises(RereError, match="3 items but 4 beams"):
            search(model, [[3, 4]], trie, 4, 0)
    assert len(beam_search(model, [[3, 4]], trie, 3, 0)[0]) == 3


def test_sample_is_valid_reproducible_and_scored(catalogue):
    model = tiny_model("qwen2", catalogue["vocab"], catalogue["eos"])
    trie, pad, seqs = catalogue["trie"], catalogue["pad"], catalogue["seqs"]
    prompts = catalogue["prompts"][:3]
    draws = sample(model, prompts, trie, 8, 1.5, torch.Generator().manual_seed(7), pad)
    again = sample(model, prompts, trie, 8, 1.5, torch.Generator().manual_seed(7), pad)
    assert draws == again
    assert [len(d) for d in draws] == [8, 8, 8]
    for prompt, row in zip(prompts, draws, strict=True):
        for item, score in row:
            assert 0 <= item < len(seqs)
            assert score == pytest.approx(teacher_forced_logprob(model, prompt, seqs[item]), abs=1e-4)
    with pytest.raises(RereError, match="temperature must be > 0"):
        sample(model, prompts, trie, 2, 0.0, torch.Generator(), pad)


def test_sample_follows_the_constrained_distribution():
    # Items: [3, EOS], [4, EOS], [5, 6, EOS]. At the root the draw is softmax(logits / T) over
    # {3, 4, 5}; afterwards each item has a single continuation, so P(item) is that softmax.
    trie = ItemTrie.from_sequences([[3, 1], [4, 1], [5, 6, 1]], vocab_size=16)
    model = tiny_model("qwen2", 16, 1, seed=3)
    prompt, temperature = [7, 8, 9], 2.0
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = torch.softmax(logits[[3, 4, 5]] / temperature, dim=0).tolist()
    draws = sample(model, [prompt], trie, 4000, temperature, torch.Generator().manual_seed(0), pad_token_id=0)[0]
    counts = Counter(i for i, _ in draws)
    for item in range(3):
        assert counts[item] / 4000 == pytest.approx(expected[item], abs=0.03)
