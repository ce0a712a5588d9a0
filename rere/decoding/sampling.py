"""Constrained ancestral sampling over the catalogue, with the same shared prompt prefill."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rere import RereError
from rere.decoding.beam import Results, chunks
from rere.decoding.cache import decode_step, eval_mode, expand_cache, left_pad, prefill
from rere.decoding.trie import ItemTrie


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
    with eval_mode(model):
        for _, chunk in chunks(prompt_ids, batch_size):
            results.extend(_sample_batch(model, chunk, trie, num_samples, temperature, generator, pad_token_id, device))
    return results


def _sample_batch(model, prompts, trie, num_samples, temperature, generator, pad_token_id, device) -> Results:
    b, g = len(prompts), num_samples
    ids, mask = left_pad(prompts, pad_token_id, device)
    logits, cache, last_pos = prefill(model, ids, mask)  # (b, V)
    logits = logits.repeat_interleave(g, dim=0)  # (b*G, V)
    nodes = torch.zeros(b * g, dtype=torch.long, device=device)
    scores = torch.zeros(b * g, device=device)
    tokens = torch.full((b * g,), trie.eos_token_id, dtype=torch.long, device=device)
    sample_mask = mask.repeat_interleave(g, dim=0)  # (b*G, T)
    sample_pos = last_pos.repeat_interleave(g, dim=0)  # (b*G, 1)
    for t in range(trie.max_depth):
        if t > 0:
            sample_mask = torch.cat([sample_mask, sample_mask.new_ones((b * g, 1))], dim=1)  # (b*G, T+t)
            logits = decode_step(model, tokens, sample_mask, sample_pos + t, cache)  # (b*G, V)
        done = trie.is_leaf(nodes)  # (b*G,) finished rows stay at their leaf (EOS only)
        log_probs = torch.log_softmax(logits, dim=-1)  # (b*G, V)
        tempered = trie.mask_(torch.log_softmax(logits / temperature, dim=-1), nodes)  # (b*G, V)
        tokens = torch.multinomial(tempered.exp(), 1, generator=generator).squeeze(1)  # (b*G,)
        scores = scores + torch.where(done, 0.0, log_probs.gather(1, tokens[:, None]).squeeze(1))
        nodes = torch.where(done, nodes, trie.step(nodes, tokens))
        if trie.is_leaf(nodes).all():
            break
        if t == 0:
            expand_cache(cache, g, trie.max_depth)
    items = trie.item_of_leaf[nodes.clamp(min=0)]  # (b*G,)
    if (nodes < 0).any() or (items < 0).any():
        raise RereError("constrained sampling left the item trie; this is a bug in rere.decoding.")
    items, scores = items.view(b, g).tolist(), scores.view(b, g).tolist()  # (b, G)
    return [list(zip(i, s, strict=True)) for i, s in zip(items, scores, strict=True)]
