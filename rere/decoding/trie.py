"""Catalogue-constrained decoding: a token trie compiled to tensors, beam search and sampling.

A generative recommender writes the next item as tokens; only the catalogue's token
sequences are valid. The peers check that with a Python loop over every beam at every step
(string key -> dict of allowed tokens). Here:

- `ItemTrie` holds every item's completion tokens (each ends with EOS) as tensors: a dense
  table for the root's transitions, a sorted edge list (CSR order) for the others, and per
  node its allowed next tokens, as a padded (node, K) table for nodes with at most K
  children, read from the CSR rows for the few wider nodes. A beam's state is one integer
  node id.
- `TrieLogitsProcessor` plugs the trie into stock `generate` beam search: stateless (each
  beam's node is recomputed from its generated tokens), a handful of tensor ops per step.
- `beam_search` is our own loop with the same selection rule as transformers 5.x
  `_beam_search` (length_penalty 0, early_stopping False), but each prompt goes through the
  model once: the prompt's KV cache is computed for one row and repeated to the beams.
- `sample` is constrained ancestral sampling with the same shared prefill.

Scores are sequence log-probabilities under the model's full-vocabulary softmax (masking
does not renormalise), the same numbers stock beam search reports.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from rere import RereError

log = logging.getLogger(__name__)

NEG_INF = float("-inf")
# transformers' beam search marks finished/unused candidates by adding -1e9; we mirror it so
# that candidate ranks (and so the returned beams) are the same as the stock implementation's.
BEAM_PENALTY = -1.0e9

Results = list[list[tuple[int, float]]]


class ItemTrie:
    """The catalogue's completion token sequences as tensors (build with `from_sequences`).

    Node 0 is the root; nodes are numbered breadth first with each node's children sorted by
    token, so edges listed by (parent, token) are in CSR order and their keys
    `parent * vocab_size + token` are strictly increasing (a transition is one searchsorted).
    A leaf is the node reached by an item's final EOS; `item_of_leaf[node]` is the item's
    position in the input list (-1 for inner nodes). Row `sink` (= num_nodes) stands for any
    state off the trie; leaves and the sink allow only EOS, so no state ever has an empty
    set of continuations (stock beam search keeps finished and filler beams alive with
    scores near -1e9 or -inf, and they must not break the mask).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        eos_token_id: int,
        max_depth: int,
        root_child: torch.Tensor,
        edge_keys: torch.Tensor,
        edge_child: torch.Tensor,
        item_of_leaf: torch.Tensor,
        sparse_children: torch.Tensor,
        edge_token: torch.Tensor,
        edge_start: torch.Tensor,
        fanout: torch.Tensor,
        wide: torch.Tensor,
        prefix_keys: torch.Tensor,
        prefix_nodes: torch.Tensor,
        depth_start: list[int],
        hash_powers: torch.Tensor,
    ):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.max_depth = max_depth  # tokens in the longest item, EOS included
        self.root_child = root_child  # (V,) child of the root for each token, -1 if none
        self.edge_keys = edge_keys  # (E,) parent * V + token, strictly increasing
        self.edge_child = edge_child  # (E,) child node of each edge
        self.item_of_leaf = item_of_leaf  # (num_nodes,) item position at a leaf, else -1
        self.sparse_children = sparse_children  # (num_nodes + 1, K) allowed tokens, padded with a repeat
        self.edge_token = edge_token  # (E,) token of each edge (CSR column)
        self.edge_start = edge_start  # (num_nodes + 1,) first edge of each node (CSR row start)
        self.fanout = fanout  # (num_nodes + 1,) children per node (sink: 0)
        self.wide = wide  # (num_nodes + 1,) bool: more than K children, read from the CSR rows
        # Prefix hash -> node, for the stateless processor: nodes sorted by (depth, key); the
        # nodes of depth d are [depth_start[d], depth_start[d + 1]).
        self.prefix_keys = prefix_keys  # (num_nodes,) 62-bit hash of each node's token path
        self.prefix_nodes = prefix_nodes  # (num_nodes,) node of each key
        self.depth_start = depth_start  # max_depth + 2 offsets
        self.hash_powers = hash_powers  # (2, max_depth) base**j modulo each of HASH_MODULI
        self.hash_moduli = torch.tensor(HASH_MODULI, device=hash_powers.device)  # (2,)
        self.hash_mix = torch.tensor([HASH_MODULI[1], 1], device=hash_powers.device)  # (2,)
        self.num_nodes = item_of_leaf.shape[0]
        self.sink = self.num_nodes
        self.num_items = int((item_of_leaf >= 0).sum())

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], vocab_size: int, max_sparse_children: int = 16) -> ItemTrie:
        """Compile item token sequences (each ending with the same EOS id) into a trie.

        Raises RereError on an empty catalogue, an empty or out-of-vocabulary sequence,
        sequences that do not all end with the same token, an EOS before the end, or two
        items with the same tokens (naming both positions).

        >>> trie = ItemTrie.from_sequences([[5, 6, 2], [5, 7, 2], [8, 2]], vocab_size=10)
        >>> trie.num_items, trie.max_depth, trie.eos_token_id
        (3, 3, 2)
        >>> trie.allowed(trie.walk(torch.tensor([[5], [8]]))).nonzero().tolist()
        [[0, 6], [0, 7], [1, 2]]
        """
        if not seqs:
            raise RereError("the item catalogue is empty: no token sequences to build a trie from.")
        if max_sparse_children < 1:
            raise ValueError(f"max_sparse_children must be >= 1, got {max_sparse_children}")
        if not seqs[0]:
            raise RereError("item 0 has no tokens; every item needs its completion tokens followed by EOS.")
        eos = int(seqs[0][-1])
        children: list[dict[int, int]] = [{}]  # build-time node -> {token: node}
        leaf_of: dict[int, int] = {}  # build-time leaf node -> item position
        for pos, seq in enumerate(seqs):
            if not seq:
                raise RereError(f"item {pos} has no tokens; every item needs its completion tokens followed by EOS.")
            if int(seq[-1]) != eos:
                raise RereError(
                    f"item {pos} ends with token {int(seq[-1])}, item 0 with {eos}: every item's tokens must end "
                    "with the same EOS id."
                )
            node = 0
            for j, tok in enumerate(seq):
                tok = int(tok)
                if not 0 <= tok < vocab_size:
                    raise RereError(f"item {pos}: token {tok} is outside the vocabulary [0, {vocab_size}).")
                if tok == eos and j != len(seq) - 1:
                    raise RereError(f"item {pos}: the EOS id {eos} appears at position {j}, before the end.")
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children.append({})
                    children[node][tok] = nxt
                node = nxt
            if node in leaf_of:
                raise RereError(
                    f"items {leaf_of[node]} and {pos} have the same tokens {list(seq)}; item codes must be unique."
                )
            leaf_of[node] = pos

        # Breadth-first renumbering: children of a node are contiguous and sorted by token.
        order = [0]
        new_id = {0: 0}
        parents, tokens, childs = [], [], []
        depth = [0]
        i = 0
        while i < len(order):
            kids = children[order[i]]
            for tok in sorted(kids):
                new_id[kids[tok]] = len(order)
                order.append(kids[tok])
                depth.append(depth[i] + 1)
                parents.append(i)
                tokens.append(tok)
                childs.append(new_id[kids[tok]])
            i += 1
        num_nodes = len(order)
        parent_t = torch.tensor(parents, dtype=torch.long)  # (E,)
        token_t = torch.tensor(tokens, dtype=torch.long)  # (E,)
        child_t = torch.tensor(childs, dtype=torch.long)  # (E,)

        item_of_leaf = torch.full((num_nodes,), -1, dtype=torch.long)
        for old, pos in leaf_of.items():
            item_of_leaf[new_id[old]] = pos
        root_child = torch.full((vocab_size,), -1, dtype=torch.long)
        at_root = parent_t == 0
        root_child[token_t[at_root]] = child_t[at_root]

        # Allowed next tokens per node: padded table for narrow nodes, CSR rows for wide ones.
        fanout = torch.bincount(parent_t, minlength=num_nodes + 1)  # (num_nodes + 1,) the sink has none
        start = torch.cumsum(fanout, 0) - fanout  # (num_nodes + 1,) CSR row start
        k = max_sparse_children
        sparse = torch.full((num_nodes + 1, k), eos, dtype=torch.long)  # leaves and sink: EOS only
        narrow = (fanout > 0) & (fanout <= k)
        rank = torch.arange(len(tokens)) - start[parent_t]  # (E,) position of each edge in its row
        first = token_t[start[fanout > 0]]  # (inner nodes,) first child token, used as padding
        sparse[fanout > 0] = first[:, None].expand(-1, k)
        on_narrow = narrow[parent_t]
        sparse[parent_t[on_narrow], rank[on_narrow]] = token_t[on_narrow]

        prefix = _prefix_hashes(parents, tokens, depth, num_nodes, max(depth))
        trie = cls(
            vocab_size=vocab_size,
            eos_token_id=eos,
            max_depth=max(depth),
            root_child=root_child,
            edge_keys=parent_t * vocab_size + token_t,
            edge_child=child_t,
            item_of_leaf=item_of_leaf,
            sparse_children=sparse,
            edge_token=token_t,
            edge_start=start,
            fanout=fanout,
            wide=fanout > k,
            **prefix,
        )
        log.debug(
            "item trie: %d items, %d nodes, depth %d, %d wide nodes",
            trie.num_items,
            num_nodes,
            trie.max_depth,
            int((fanout > k).sum()),
        )
        return trie

    @property
    def device(self) -> torch.device:
        return self.edge_keys.device

    def to(self, device: torch.device | str) -> ItemTrie:
        """A copy with every table on `device` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        names = inspect.signature(ItemTrie.__init__).parameters
        kwargs = {n: getattr(self, n) for n in names if n != "self"}
        return ItemTrie(**{n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in kwargs.items()})

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each node by each token; -1 where the edge does not exist. (N,), (N,) -> (N,)."""
        in_vocab = (tokens >= 0) & (tokens < self.vocab_size)
        keys = nodes.clamp(min=0) * self.vocab_size + tokens.clamp(0, self.vocab_size - 1)  # (N,)
        at = torch.searchsorted(self.edge_keys, keys).clamp(max=len(self.edge_keys) - 1)  # (N,)
        hit = (self.edge_keys[at] == keys) & (nodes >= 0) & in_vocab
        return torch.where(hit, self.edge_child[at], -1)

    def is_leaf(self, nodes: torch.Tensor) -> torch.Tensor:
        """(N,) -> (N,) bool; -1 (off the trie) is not a leaf."""
        return self.item_of_leaf[nodes.clamp(min=0)].ge(0) & nodes.ge(0)

    def walk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Node reached by each row of generated tokens (N, T) -> (N,); -1 when off the trie.

        A row that reaches a leaf stays there: whatever follows an item's EOS (padding,
        further EOS of a finished beam) does not move it.
        """
        n, t = tokens.shape
        if t == 0:
            return torch.zeros(n, dtype=torch.long, device=self.device)
        first = tokens[:, 0]
        in_vocab = (first >= 0) & (first < self.vocab_size)
        nodes = torch.where(in_vocab, self.root_child[first.clamp(0, self.vocab_size - 1)], -1)  # (N,) dense level
        for j in range(1, t):
            nodes = torch.where(self.is_leaf(nodes), nodes, self.step(nodes, tokens[:, j]))
        return nodes

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

    def mask_(self, scores: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Set every token not allowed after each row's node to -inf, in place; returns `scores`.

        scores (N, W) with W >= vocab_size (extra columns, e.g. a padded embedding matrix,
        are never allowed); nodes (N,), -1 = off the trie (allows EOS only, like a leaf).
        Cost: a gather, a fill and a scatter over (N, K), plus for rows at wide nodes a
        gather/scatter of exactly their allowed tokens (a ragged CSR read). One host sync per
        call (the number of rows at wide nodes and of their tokens), none per beam.
        """
        if scores.shape[-1] < self.vocab_size:
            raise RereError(
                f"the model scores {scores.shape[-1]} tokens but the item trie was built for a vocabulary of "
                f"{self.vocab_size}; build the trie with the model's vocabulary size."
            )
        rows = nodes  # (N,) -1 indexes the last row of each table: the sink
        idx = self.sparse_children[rows]  # (N, K)
        kept = scores.gather(1, idx)  # (N, K)
        wide = self.wide[rows].nonzero().squeeze(1)  # (D,) the host sync
        if len(wide):
            wide_rows, wide_tokens = self._csr_entries(wide, rows[wide])  # (S,), (S,)
            if scores.is_contiguous():  # flat index_select/index_copy_: several times faster than [rows, cols]
                flat = wide_rows * scores.shape[1] + wide_tokens  # (S,)
                wide_kept = scores.view(-1).index_select(0, flat)  # (S,)
            else:
                wide_kept = scores[wide_rows, wide_tokens]  # (S,)
        scores.fill_(NEG_INF)
        scores.scatter_(1, idx, kept)
        if len(wide):
            if scores.is_contiguous():
                scores.view(-1).index_copy_(0, flat, wide_kept)
            else:
                scores[wide_rows, wide_tokens] = wide_kept
        return scores

    def _csr_entries(self, beams: torch.Tensor, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(beam, allowed token) pairs for beams (D,) at nodes (D,): each node's CSR row, flattened."""
        counts = self.fanout[nodes]  # (D,)
        total = int(counts.sum())
        beam_of = beams.repeat_interleave(counts, output_size=total)  # (S,)
        # Entry s of the flattened rows is edge s - (row's offset in the output) + (row's first edge).
        shift = self.edge_start[nodes] - (torch.cumsum(counts, 0) - counts)  # (D,)
        edge = torch.arange(total, device=self.device) + shift.repeat_interleave(counts, output_size=total)  # (S,)
        return beam_of, self.edge_token[edge]

    def allowed(self, nodes: torch.Tensor) -> torch.Tensor:
        """(N,) nodes -> (N, V) bool of allowed next tokens (through `mask_`, for checks and tests)."""
        scores = torch.zeros((len(nodes), self.vocab_size), device=self.device)
        return self.mask_(scores, nodes).isfinite()

    def items_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Item position of each row of generated tokens (N, T) -> (N,); -1 if not a whole item."""
        nodes = self.walk(tokens)
        return torch.where(self.is_leaf(nodes), self.item_of_leaf[nodes.clamp(min=0)], -1)


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
        nodes = self.trie.locate(input_ids[:, self.prompt_length :])  # (N,)
        return self.trie.mask_(scores, nodes)


# Two primes below 2**31: token (< 2**18) * base**j stays below 2**49 and a sum over a few thousand
# positions below 2**63, so int64 arithmetic is exact; the key h1 * M2 + h2 is below 2**62.
HASH_MODULI = (2_147_483_647, 2_147_483_629)
_HASH_BASES = [(1_000_003, 998_244_353), (911_382_323, 972_663_749), (31_337, 1_234_567_891)]


def _prefix_hashes(parents: list[int], tokens: list[int], depth: list[int], num_nodes: int, max_depth: int) -> dict:
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
            return {
                "prefix_keys": sorted_keys,
                "prefix_nodes": order,
                "depth_start": [0] + torch.cumsum(counts, 0).tolist(),
                "hash_powers": torch.tensor([p1, p2], dtype=torch.long),
            }
    raise RereError("item trie: prefix hash collision with every built-in base; please report this catalogue.")


# --------------------------------------------------------------------------------------------
# Shared helpers


def _check_beams(trie: ItemTrie, num_beams: int) -> None:
    if num_beams < 1:
        raise RereError(f"num_beams must be >= 1, got {num_beams}.")
    if trie.num_items < num_beams:
        raise RereError(
            f"the catalogue has {trie.num_items} items but {num_beams} beams were asked for; a prompt's beams are "
            f"distinct items, so lower num_beams to at most {trie.num_items}."
        )


def _batches(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[int, Sequence[Sequence[int]]]]:
    if batch_size < 1:
        raise RereError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(prompt_ids), batch_size):
        yield start, prompt_ids[start : start + batch_size]


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (b, T) input ids and attention mask."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RereError(f"prompt {i} is empty; every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Deterministic forward passes (no dropout), restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """One forward pass over the left-padded prompts: last-position logits (b, V), the cache,
    and each row's last position id (b, 1). Position ids follow `generate`: count of real
    tokens so far minus one, 0 on padding."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (b, T)
    kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # only the last position's logits: (b, 1, V), not (b, T, V)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=DynamicCache(config=model.config),
        use_cache=True,
        **kwargs,
    )
    return out.logits[:, -1, :].float(), out.cache, positions[:, -1:]


class _SharedPromptLayer(DynamicLayer):
    """One attention layer's cache for the beams (or samples) of prompts that share their prompt.

    `DynamicLayer` grows by concatenation (a copy of the whole cache per token) and beam
    reordering gathers the whole cache (another copy per step). Here the prompt's keys and
    values are written once, repeated to the rows of each prompt, into a buffer with room
    for `capacity` new tokens: a new token is written in place, and a reorder, which only
    ever permutes rows of the same prompt, touches only the generated slots (the prompt
    part is identical across those rows).
    """

    def __init__(self, layer: DynamicLayer, repeats: int, capacity: int):
        super().__init__()
        keys, values = layer.keys, layer.values  # (b, H, T, D)
        b, heads, prompt, dim = keys.shape
        self.key_buffer = keys.new_empty((b * repeats, heads, prompt + capacity, dim))
        self.value_buffer = values.new_empty((b * repeats, values.shape[1], prompt + capacity, values.shape[-1]))
        self.key_buffer[:, :, :prompt] = keys.repeat_interleave(repeats, dim=0)  # (b*R, H, T, D)
        self.value_buffer[:, :, :prompt] = values.repeat_interleave(repeats, dim=0)
        self.prompt_length = self.length = prompt
        self.device = keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]  # (b*R, H, T+t, D) view, no copy
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if self.length + new > self.key_buffer.shape[-2]:
            raise RuntimeError("shared-prompt cache is full; this is a bug in rere.decoding.")
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        start, end = self.prompt_length, self.length
        if end > start:
            self.key_buffer[:, :, start:end] = self.key_buffer[beam_idx, :, start:end]
            self.value_buffer[:, :, start:end] = self.value_buffer[beam_idx, :, start:end]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prompt cache is already expanded")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a shared-prompt cache keeps all its rows")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prompt cache is not croppable")


def _expand_cache(cache: DynamicCache, repeats: int, capacity: int) -> None:
    """Expand a prefilled cache of b prompts to b*repeats rows, in place.

    Plain attention layers become `_SharedPromptLayer`s; any other layer kind (sliding
    window, linear attention...) makes the whole cache fall back to transformers' own
    `batch_repeat_interleave`, reordered by `reorder_cache` like stock beam search does.
    Rows r*repeats .. r*repeats + repeats - 1 belong to prompt r; reorders must stay within them.
    """
    if cache.layers and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
        cache.layers = [_SharedPromptLayer(layer, repeats, capacity) for layer in cache.layers]
    else:
        cache.batch_repeat_interleave(repeats)


def _decode_step(model, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """Feed one token per row: tokens (N,), mask (N, T+t+1), positions (N, 1) -> logits (N, V)."""
    out = model(
        input_ids=tokens[:, None],  # (N, 1)
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :].float()


# --------------------------------------------------------------------------------------------
# Beam search


def beam_search(
    model,
    prompt_ids: Sequence[Sequence[int]],
    trie: ItemTrie,
    num_beams: int,
    pad_token_id: int,
    batch_size: int = 32,
    *,
    progress: bool = False,
    stats: dict | None = None,
) -> Results:
    """Top `num_beams` catalogue items per prompt, best first: [[(item position, log-prob), ...], ...].

    Same selection rule as transformers 5.x `generate(num_beams=B, num_return_sequences=B,
    do_sample=False, length_penalty=0.0, early_stopping=False)` with `TrieLogitsProcessor`
    (see `stock_beam_search`): each step keeps the 2B best (beam, token) candidates, sends
    those among the first B that end with EOS to the finished pool and continues the B best
    unfinished ones; a prompt stops when no running beam can beat its B-th finished item.
    The difference is the work: each prompt is run through the model once (b rows, not
    b*B), then its KV cache is repeated to the B beams. Nothing is read from
    `model.generation_config` (no sampling, no warpers, whatever the model's file says).

    `stats`, if given, accumulates seconds spent in "prefill_s", "decode_s" (forward passes
    after the prefill), "mask_s" (trie masking) and the number of "steps".
    """
    _check_beams(trie, num_beams)
    results: Results = []
    device = next(model.parameters()).device
    trie = trie.to(device)
    batches = list(_batches(prompt_ids, batch_size))
    with _eval_mode(model):
        for _, chunk in tqdm(batches, desc="beam search", unit="batch", disable=not progress):
            results.extend(_beam_search_batch(model, chunk, trie, num_beams, pad_token_id, device, stats))
    return results


def _beam_search_batch(model, prompts, trie: ItemTrie, num_beams: int, pad_token_id: int, device, stats) -> Results:
    timer = _Timer(stats)
    b, beams, keep = len(prompts), num_beams, 2 * num_beams  # one EOS id: 2B candidates, as stock
    ids, mask = left_pad(prompts, pad_token_id, device)
    with timer("prefill_s"):
        logits, cache, last_pos = _prefill(model, ids, mask)  # (b, V), cache of b rows, (b, 1)
    vocab = logits.shape[-1]
    # Step 0 scores every beam from the one prompt row; beams 1.. start at -inf so only beam 0's
    # candidates are real (stock starts them at -1e9: the same ranks among real candidates).
    log_probs = torch.log_softmax(logits, dim=-1).repeat_interleave(beams, dim=0)  # (b*B, V)

    running_scores = torch.full((b, beams), NEG_INF, device=device)
    running_scores[:, 0] = 0.0
    running_nodes = torch.zeros((b, beams), dtype=torch.long, device=device)
    next_tokens = torch.zeros((b, beams), dtype=torch.long, device=device)  # fed from step 1 on
    finished_scores = torch.full((b, beams), BEAM_PENALTY, device=device)
    finished_items = torch.full((b, beams), -1, dtype=torch.long, device=device)
    finished = torch.zeros((b, beams), dtype=torch.bool, device=device)
    open_ = torch.ones((b, 1), dtype=torch.bool, device=device)  # can this prompt still improve?
    in_top_b = torch.arange(keep, device=device) < beams  # (2B,) only these may finish
    row_offset = torch.arange(b, device=device)[:, None] * beams  # (b, 1)
    beam_mask = mask.repeat_interleave(beams, dim=0)  # (b*B, T)
    beam_pos = last_pos.repeat_interleave(beams, dim=0)  # (b*B, 1)

    for t in range(trie.max_depth):
        if t > 0:
            beam_mask = torch.cat([beam_mask, beam_mask.new_ones((b * beams, 1))], dim=1)  # (b*B, T+t)
            with timer("decode_s"):
                logits = _decode_step(model, next_tokens.reshape(-1), beam_mask, beam_pos + t, cache)  # (b*B, V)
            log_probs = torch.log_softmax(logits, dim=-1)
        with timer("mask_s"):
            trie.mask_(log_probs, running_nodes.reshape(-1))  # (b*B, V)
        scores = log_probs.view(b, beams, vocab) + running_scores[:, :, None]  # (b, B, V)
        top_scores, top_idx = torch.topk(scores.view(b, beams * vocab), keep)  # (b, 2B)
        source = top_idx // vocab  # (b, 2B) beam each candidate extends
        tokens = top_idx % vocab  # (b, 2B)
        children = trie.step(running_nodes.gather(1, source).view(-1), tokens.view(-1)).view(b, keep)  # (b, 2B)
        if t == trie.max_depth - 1:
            ends = torch.ones_like(tokens, dtype=torch.bool)  # stock's max_length criterion
        else:
            ends = tokens == trie.eos_token_id  # (b, 2B)

        # The B best unfinished candidates run on.
        run_scores = top_scores + ends.float() * BEAM_PENALTY  # (b, 2B)
        chosen = torch.topk(run_scores, beams).indices  # (b, B)
        running_scores = run_scores.gather(1, chosen)
        running_nodes = children.gather(1, chosen)
        next_tokens = tokens.gather(1, chosen)
        origin = source.gather(1, chosen)  # (b, B)

        # Candidates among the first B that end join the finished pool if they beat its worst.
        just_ended = ends & in_top_b  # (b, 2B)
        cand_scores = top_scores + (~open_).float() * BEAM_PENALTY + (~just_ended).float() * BEAM_PENALTY
        cand_items = torch.where(children >= 0, trie.item_of_leaf[children.clamp(min=0)], -1)  # (b, 2B)
        pool = torch.topk(torch.cat([finished_scores, cand_scores], dim=1), beams).indices  # (b, B)
        finished_scores = torch.cat([finished_scores, cand_scores], dim=1).gather(1, pool)
        finished_items = torch.cat([finished_items, cand_items], dim=1).gather(1, pool)
        finished = torch.cat([finished, just_ended], dim=1).gather(1, pool)

        # Scores only fall with length (length_penalty 0): stop a prompt once its best running
        # beam cannot beat the worst of B finished items.
        worst = torch.where(finished, finished_scores.min(dim=1, keepdim=True).values, BEAM_PENALTY)  # (b, B)
        open_ = open_ & (running_scores[:, :1] > worst).any(dim=1, keepdim=True)
        if not open_.any() or ends.all():
            break
        if t == 0:
            _expand_cache(cache, beams, trie.max_depth)  # every beam of a prompt shares its prompt cache
        else:
            cache.reorder_cache((origin + row_offset).view(-1))  # (b*B,)

    if stats is not None:
        stats["steps"] = stats.get("steps", 0) + t + 1
    return _collect(finished, finished_items, finished_scores, num_beams)


def _collect(finished: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, num_beams: int) -> Results:
    """Per prompt, the finished (item, score) pairs; raise if a prompt has fewer than B items."""
    out: Results = []
    for row, (done, its, scs) in enumerate(zip(finished.tolist(), items.tolist(), scores.tolist(), strict=True)):
        pairs = [(i, s) for d, i, s in zip(done, its, scs, strict=True) if d and i >= 0 and s > BEAM_PENALTY / 2]
        distinct = len({i for i, _ in pairs})
        if distinct < num_beams or distinct != len(pairs):
            raise RereError(
                f"beam search found {distinct} distinct items for prompt {row} of its batch, fewer than num_beams="
                f"{num_beams}; beams can lose items whose prefixes fall out of the beam, so lower num_beams."
            )
        out.append(pairs)
    return out


class _Timer:
    """Accumulate wall seconds into stats[key] (no-op when stats is None)."""

    def __init__(self, stats: dict | None):
        self.stats = stats

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        if self.stats is None:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# The stock path: transformers' own beam search with the trie processor


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
    _check_beams(trie, num_beams)
    make = processor or TrieLogitsProcessor
    device = next(model.parameters()).device
    trie = trie.to(device)
    config = beam_generation_config(trie, num_beams, pad_token_id, with_scores)
    results: Results = []
    batches = list(_batches(prompt_ids, batch_size))
    with _eval_mode(model), _neutral_generation_config(model):
        for _, chunk in tqdm(batches, desc="stock beam search", unit="batch", disable=not progress):
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
                results.extend(_collect(items >= 0, items, scores, num_beams))
            else:  # distinctness is still checked; the scores are unknown
                rows = _collect(items >= 0, items, torch.zeros(items.shape), num_beams)
                results.extend([[(i, math.nan) for i, _ in row] for row in rows])
    return results


# --------------------------------------------------------------------------------------------
# Sampling


def sample(
    model,
    prompt_ids: Sequence[Sequence[int]],
    trie: ItemTrie,
    num_samples: int,
    temperature: float,
    generator: torch.Generator,
    pad_token_id: int,
    batch_size: int = 32,
) -> Results:
    """`num_samples` catalogue items per prompt by constrained ancestral sampling.

    Each step draws from softmax(logits / temperature) restricted to the tokens that
    continue an item, so every sample is a catalogue item; duplicates are allowed. Samples
    are returned in draw order with their log-probability under the model at temperature 1
    (full-vocabulary softmax, like `beam_search`'s scores). Shared prompt prefill as in
    `beam_search`. `generator` must live on the model's device; the same generator state
    gives the same samples.
    """
    if not temperature > 0:
        raise RereError(f"sampling temperature must be > 0, got {temperature}.")
    if num_samples < 1:
        raise RereError(f"num_samples must be >= 1, got {num_samples}.")
    device = next(model.parameters()).device
    trie = trie.to(device)
    results: Results = []
    with _eval_mode(model):
        for _, chunk in _batches(prompt_ids, batch_size):
            results.extend(_sample_batch(model, chunk, trie, num_samples, temperature, generator, pad_token_id, device))
    return results


def _sample_batch(model, prompts, trie, num_samples, temperature, generator, pad_token_id, device) -> Results:
    b, g = len(prompts), num_samples
    ids, mask = left_pad(prompts, pad_token_id, device)
    logits, cache, last_pos = _prefill(model, ids, mask)  # (b, V)
    logits = logits.repeat_interleave(g, dim=0)  # (b*G, V)
    nodes = torch.zeros(b * g, dtype=torch.long, device=device)
    scores = torch.zeros(b * g, device=device)
    tokens = torch.full((b * g,), trie.eos_token_id, dtype=torch.long, device=device)
    sample_mask = mask.repeat_interleave(g, dim=0)  # (b*G, T)
    sample_pos = last_pos.repeat_interleave(g, dim=0)  # (b*G, 1)
    for t in range(trie.max_depth):
        if t > 0:
            sample_mask = torch.cat([sample_mask, sample_mask.new_ones((b * g, 1))], dim=1)  # (b*G, T+t)
            logits = _decode_step(model, tokens, sample_mask, sample_pos + t, cache)  # (b*G, V)
        done = trie.is_leaf(nodes)  # (b*G,) finished rows stay at their leaf (EOS only)
        log_probs = torch.log_softmax(logits, dim=-1)  # (b*G, V)
        tempered = trie.mask_(torch.log_softmax(logits / temperature, dim=-1), nodes)  # (b*G, V)
        tokens = torch.multinomial(tempered.exp(), 1, generator=generator).squeeze(1)  # (b*G,)
        scores = scores + torch.where(done, 0.0, log_probs.gather(1, tokens[:, None]).squeeze(1))
        nodes = torch.where(done, nodes, trie.step(nodes, tokens))
        if trie.is_leaf(nodes).all():
            break
        if t == 0:
            _expand_cache(cache, g, trie.max_depth)
    items = trie.item_of_leaf[nodes.clamp(min=0)]  # (b*G,)
    if (nodes < 0).any() or (items < 0).any():
        raise RereError("constrained sampling left the item trie; this is a bug in rere.decoding.")
    items, scores = items.view(b, g).tolist(), scores.view(b, g).tolist()  # (b, G)
    return [list(zip(i, s, strict=True)) for i, s in zip(items, scores, strict=True)]
