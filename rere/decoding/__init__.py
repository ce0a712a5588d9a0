"""Catalogue-constrained decoding: a token trie compiled to tensors, beam search and sampling.

A generative recommender writes the next item as tokens; only the catalogue's token
sequences are valid. The peers check that with a Python loop over every beam at every step
(string key -> dict of allowed tokens). Here, one file per idea:

- `trie.py`: `ItemTrie`, every item's completion tokens as tensors (child tables, allowed
  next tokens per node, `mask_`); a beam's state is one integer node id.
- `cache.py`: the model side of our loops: left-padded prefill, one-token decode steps, and
  the shared-prompt KV cache (a prompt's keys/values written once for all its beams).
- `beam.py`: `beam_search`, our own loop with the same selection rule as transformers 5.x
  `_beam_search` (length_penalty 0, early_stopping False), each prompt through the model once.
- `sampling.py`: `sample`, constrained ancestral sampling with the same shared prefill.
- `processor.py`: the stock path: `TrieLogitsProcessor` (stateless, finds each beam's node
  through a prefix hash) plugged into `model.generate` (`stock_beam_search`), the reference
  that `beam_search` is tested against and the benchmarks' baseline.

Scores are sequence log-probabilities under the model's full-vocabulary softmax (masking
does not renormalise), the same numbers stock beam search reports.
"""

from rere.decoding.beam import Results, beam_search
from rere.decoding.cache import SharedPromptLayer, left_pad
from rere.decoding.processor import PrefixIndex, TrieLogitsProcessor, beam_generation_config, stock_beam_search
from rere.decoding.sampling import sample
from rere.decoding.trie import ItemTrie, catalogue_trie

__all__ = [
    "ItemTrie",
    "PrefixIndex",
    "Results",
    "SharedPromptLayer",
    "TrieLogitsProcessor",
    "beam_generation_config",
    "beam_search",
    "catalogue_trie",
    "left_pad",
    "sample",
    "stock_beam_search",
]
