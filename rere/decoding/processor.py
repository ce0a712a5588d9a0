"""The stock path: transformers' own `generate` beam search, constrained by `TrieLogitsProcessor`.

The processor is stateless: each step it recomputes every beam's trie node from the beam's
generated tokens through `PrefixIndex` (a hash of each node's token path), so one instance
serves any number of `generate` calls. `stock_beam_search` is what `beam_search` is checked
against and the benchmarks' baseline.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rere import RereError
from rere.decoding.beam import Results, check_beams, chunks, collect
from rere.decoding.cache import eval_mode, left_pad
from rere.decoding.trie import ItemTrie

# One prefix index per trie object, alive as long as the trie is.
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TrieLogitsProcessor(LogitsProcessor):
    """Masks every token that does not continue a catalogue item (stock `generate`, transformers 5.x).

    Stateless: the generation step is `input_ids.shape[1] - prompt_length` and each row's
    trie node is recomputed from its generated tokens, so one instance can serve any number
    of `generate` calls. `prompt_length` is the padded width of the (left-padded) prompt
    batch. Rows off the trie (stock beam search's filler beams, whose score is already
    -inf) and finished rows allow only EOS. Masks `scores` in place and returns it.
    """

    def __init__(self, trie: ItemTrie, prompt_length: int):
        self.trie = trie
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] < self.prompt_length:
            raise RereError(
                f"TrieLogitsProcessor was built for prompts of {self.prompt_length} tokens but got input_ids of "
                f"length {input_ids.shape[1]}; build it with the padded prompt width of this batch."
            )
        if self.trie.device != scores.device:
            self.trie = self.trie.to(scores.device)  # a device cache, not generation state
        nodes = PrefixIndex.of(self.trie).locate(input_ids[:, self.prompt_length :])  # (N,)
        return self.trie.mask_(scores, nodes)


# Two primes below 2**31: token (< 2**18) * base**j stays below 2**49 and a sum over a few thousand
# positions below 2**63, so int64 arithmetic is exact; the key h1 * M2 + h2 is below 2**62.
HASH_MODULI = (2_147_483_647, 2_147_483_629)
_HASH_BASES = [(1_000_003, 998_244_353), (911_382_323, 972_663_749), (31_337, 1_234_567_891)]


def _prefix_hashes(
    parents: list[int], tokens: list[int], depth: list[int], num_nodes: int, max_depth: int
) -> PrefixIndex:
    """Hash every node's token path (edges in BFS order: a parent precedes its children)."""
    m1, m2 = HASH_MODULI
    for b1, b2 in _HASH_BASES:
        p1 = [pow(b1, j, m1) for j in range(max_depth)]
        p2 = [pow(b2, j, m2) for j in range(max_depth)]
        h1, h2 = [0] * num_nodes, [0] * num_nodes
        for e, (parent, tok) in enumerate(zip(parents, tokens, strict=True)):
            child, j = e + 1, depth[parent]  # BFS numbering: edge e leads to node e + 1
            h1[child] = (h1[parent] + tok * p1[j]) % m1
            h2[child] = (h2[parent] + tok * p2[j]) % m2
        keys = torch.tensor([a * m2 + b for a, b in zip(h1, h2, strict=True)], dtype=torch.long)  # (num_nodes,)
        depth_t = torch.tensor(depth, dtype=torch.long)
        by_key = torch.sort(keys, stable=True).indices
        order = by_key[torch.sort(depth_t[by_key], stable=True).indices]  # (num_nodes,) by (depth, key)
        sorted_keys, sorted_depth = keys[order], depth_t[order]
        if not ((sorted_keys[1:] == sorted_keys[:-1]) & (sorted_depth[1:] == sorted_depth[:-1])).any():
            counts = torch.bincount(depth_t, minlength=max_depth + 1)
            return PrefixIndex(
                sorted_keys, order, [0] + torch.cumsum(counts, 0).tolist(), torch.tensor([p1, p2]), max_depth
            )
    raise RereError("item trie: prefix hash collision with every built-in base; please report this catalogue.")


class PrefixIndex:
    """Prefix hash -> trie node, so that a stateless processor finds each beam's node from its
    generated tokens in a fixed number of tensor ops (our own loops carry the node instead).

    Nodes are sorted by (depth, key); the nodes of depth d are [depth_start[d], depth_start[d + 1]).
    Built once per trie (`of`) and moved with it (`to`).
    """

    def __init__(self, prefix_keys, prefix_nodes, depth_start: list[int], hash_powers, max_depth: int):
        self.prefix_keys = prefix_keys  # (num_nodes,) 62-bit hash of each node's token path
        self.prefix_nodes = prefix_nodes  # (num_nodes,) node of each key
        self.depth_start = depth_start  # max_depth + 2 offsets
        self.hash_powers = hash_powers  # (2, max_depth) base**j modulo each of HASH_MODULI
        self.hash_moduli = torch.tensor(HASH_MODULI, device=hash_powers.device)  # (2,)
        self.hash_mix = torch.tensor([HASH_MODULI[1], 1], device=hash_powers.device)  # (2,)
        self.max_depth = max_depth
        self.device = hash_powers.device

    @classmethod
    def of(cls, trie: ItemTrie) -> PrefixIndex:
        """The index of `trie` (computed on first use, then kept with the trie)."""
        cached = _INDEXES.get(trie)
        if cached is None:
            parents = (trie.edge_keys // trie.vocab_size).tolist()  # (E,) BFS order: edge e leads to node e + 1
            depth = [0] * trie.num_nodes
            for e, parent in enumerate(parents):
                depth[e + 1] = depth[parent] + 1
            cached = _prefix_hashes(parents, trie.edge_token.tolist(), depth, trie.num_nodes, trie.max_depth)
            cached = cached.to(trie.device)
            _INDEXES[trie] = cached
        return cached

    def to(self, device: torch.device | str) -> PrefixIndex:
        device = torch.device(device)
        if device == self.device:
            return self
        return PrefixIndex(
            self.prefix_keys.to(device),
            self.prefix_nodes.to(device),
            self.depth_start,
            self.hash_powers.to(device),
            self.max_depth,
        )

    def locate(self, tokens: torch.Tensor) -> torch.Tensor:
        """Node of each row of generated tokens (N, t) -> (N,), in a fixed number of tensor ops.

        Hashes each row's t tokens (two polynomial hashes modulo 31-bit primes, one 62-bit
        key) and looks the key up among the depth-t nodes. Exact for every row whose tokens
        are a trie path (keys are unique per depth, checked at build), which is every beam
        the mask ever let through. Any other row (past a leaf, stock's filler beams) gives
        -1, or by a hash coincidence some node of the same depth; such rows already carry
        a score of -inf or about -1e9 and cannot reach the returned beams. Token ids must be
        non-negative and below 2**18 (ids at or above vocab_size simply match no node).
        About ten tensor ops whatever t: this runs at every step of stock beam search.
        """
        n, t = tokens.shape
        if t == 0:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        if t > self.max_depth:
            return torch.full((n,), -1, dtype=torch.long, device=self.device)
        hashes = (tokens @ self.hash_powers[:, :t].T) % self.hash_moduli  # (N, 2) exact in int64
        key = hashes @ self.hash_mix  # (N,) h1 * M2 + h2
        lo, hi = self.depth_start[t], self.depth_start[t + 1]
        keys = self.prefix_keys[lo:hi]
        at = torch.searchsorted(keys, key).clamp_(max=hi - lo - 1)  # (N,)
        return torch.where(keys[at] == key, self.prefix_nodes[lo:hi][at], -1)


@contextlib.contextmanager
def _neutral_generation_config(model) -> Iterator[None]:
    """`generate` fills every unset option from `model.generation_config` (a checkpoint's file
    can ask for top-k/top-p sampling, repetition penalties, bad words...). Swap in a default
    config for the call so only the explicit options below apply."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def beam_generation_config(
    trie: ItemTrie, num_beams: int, pad_token_id: int, with_scores: bool = True
) -> GenerationConfig:
    """Deterministic beam search over whole items: canonical scores (length_penalty 0), no
    sampling, no warpers, at most `trie.max_depth` new tokens."""
    return GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=num_beams,
        length_penalty=0.0,
        early_stopping=False,
        max_new_tokens=trie.max_depth,
        eos_token_id=trie.eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=with_scores,
    )


def stock_beam_search(
    model,
    prompt_ids: Sequence[Sequence[int]],
    trie: ItemTrie,
    num_beams: int,
    pad_token_id: int,
    batch_size: int = 32,
    *,
    processor: Callable[[ItemTrie, int], LogitsProcessor] | None = None,
    with_scores: bool = True,
    progress: bool = False,
) -> Results:
    """Same contract as `beam_search`, through stock `model.generate` beam search.

    `processor(trie, prompt_length)` builds the constraint (default `TrieLogitsProcessor`);
    the benchmark passes a peer-style one. Without `with_scores` the scores are NaN (stock
    `generate` only returns sequence scores with output_scores, which copies every step's
    scores). Used to check `beam_search` against and as the benchmark's baseline.
    """
    check_beams(trie, num_beams)
    make = processor or TrieLogitsProcessor
    device = next(model.parameters()).device
    trie = trie.to(device)
    config = beam_generation_config(trie, num_beams, pad_token_id, with_scores)
    results: Results = []
    work = list(chunks(prompt_ids, batch_size))
    with eval_mode(model), _neutral_generation_config(model):
        for _, chunk in tqdm(work, desc="stock beam search", unit="batch", disable=not progress):
            ids, mask = left_pad(chunk, pad_token_id, device)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([make(trie, ids.shape[1])]),
            )
            items = trie.items_of(out.sequences[:, ids.shape[1] :]).view(len(chunk), num_beams)  # (b, B)
            if with_scores:
                scores = out.sequences_scores.float().view(len(chunk), num_beams)  # (b, B)
                results.extend(collect(items >= 0, items, scores, num_beams))
            else:  # distinctness is still checked; the scores are unknown
                rows = collect(items >= 0, items, torch.zeros(items.shape), num_beams)
                results.extend([[(i, math.nan) for i, _ in row] for row in rows])
    return results
