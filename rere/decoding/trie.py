"""The item trie: every catalogue item's completion tokens (each ending with EOS) as tensors.

A dense table for the root's transitions, a sorted edge list (CSR order) for the others,
and per node its allowed next tokens, as a padded (node, K) table for nodes with at most K
children, read from the CSR rows for the few wider nodes. A beam's state is one integer node
id; `step`, `walk` and `mask_` are a handful of tensor ops whatever the number of beams.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from rere import RereError

log = logging.getLogger(__name__)

NEG_INF = float("-inf")


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

    def children_scores(
        self, scores: torch.Tensor, nodes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scores of exactly the tokens allowed after each row's node, leaving `scores` untouched.

        What `mask_` keeps finite, without writing (N, W): per row its narrow children as a
        (N, K) table, and for the rows at wide nodes their CSR entries, flattened.
        Returns (narrow_scores (N, K), narrow_tokens (N, K), wide_rows (S,), wide_tokens (S,),
        wide_scores (S,)); unused slots of the narrow table score -inf (a wide row's slots are
        all unused; a leaf's or the sink's one slot is EOS). Each allowed (row, token) appears
        exactly once. Cost: (N, K) gathers plus the S wide entries; one host sync, as `mask_`.

        >>> trie = ItemTrie.from_sequences([[5, 6, 2], [5, 7, 2], [8, 2]], vocab_size=10, max_sparse_children=1)
        >>> s, t, wr, wt, ws = trie.children_scores(torch.arange(20.0).view(2, 10), torch.tensor([1, 2]))
        >>> s.tolist(), t.tolist(), wr.tolist(), wt.tolist(), ws.tolist()  # node 1 is wide: tokens 6, 7
        ([[-inf], [12.0]], [[6], [2]], [0, 0], [6, 7], [6.0, 7.0])
        """
        if scores.shape[-1] < self.vocab_size:
            raise RereError(
                f"the model scores {scores.shape[-1]} tokens but the item trie was built for a vocabulary of "
                f"{self.vocab_size}; build the trie with the model's vocabulary size."
            )
        rows = nodes  # (N,) -1 indexes the last row of each table: the sink
        tokens = self.sparse_children[rows]  # (N, K)
        wide = self.wide[rows]  # (N,)
        used = torch.where(wide, 0, self.fanout[rows].clamp(min=1))  # (N,) leaves and the sink: EOS
        slot = torch.arange(tokens.shape[1], device=scores.device)  # (K,)
        narrow = scores.gather(1, tokens).masked_fill_(slot >= used[:, None], NEG_INF)  # (N, K)
        wide_at = wide.nonzero().squeeze(1)  # (D,) the host sync
        if len(wide_at):
            wide_rows, wide_tokens = self._csr_entries(wide_at, rows[wide_at])  # (S,), (S,)
            flat = wide_rows * scores.shape[1] + wide_tokens  # (S,)
            wide_scores = scores.reshape(-1).index_select(0, flat)  # (S,)
        else:
            wide_rows = wide_tokens = torch.zeros(0, dtype=torch.long, device=scores.device)
            wide_scores = scores.new_zeros(0)
        return narrow, tokens, wide_rows, wide_tokens, wide_scores

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


def catalogue_trie(model, tokenizer, index, style: str, seed: int) -> tuple[ItemTrie, list[list[int]]]:
    """The trie of the tokens `model` writes for each catalogue item after a prompt of this
    style (EOS included), and those token sequences (item position -> token ids)."""
    from rere.prompts import catalogue_token_ids

    seqs = catalogue_token_ids(tokenizer, index, style, seed)
    return ItemTrie.from_sequences(seqs, model.config.get_text_config().vocab_size), seqs
