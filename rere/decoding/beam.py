"""Our constrained beam search: transformers 5.x `_beam_search`'s selection rule, one prefill
per prompt (the prompt's KV cache is shared by its beams), the trie mask at every step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from rere import RereError
from rere.decoding.cache import decode_step, eval_mode, expand_cache, left_pad, prefill
from rere.decoding.trie import NEG_INF, ItemTrie

# transformers' beam search marks finished/unused candidates by adding -1e9; we mirror it so
# that candidate ranks (and so the returned beams) are the same as the stock implementation's.
BEAM_PENALTY = -1.0e9

Results = list[list[tuple[int, float]]]


def check_beams(trie: ItemTrie, num_beams: int) -> None:
    if num_beams < 1:
        raise RereError(f"num_beams must be >= 1, got {num_beams}.")
    if trie.num_items < num_beams:
        raise RereError(
            f"the catalogue has {trie.num_items} items but {num_beams} beams were asked for; a prompt's beams are "
            f"distinct items, so lower num_beams to at most {trie.num_items}."
        )


def chunks(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple[int, Sequence[Sequence[int]]]]:
    if batch_size < 1:
        raise RereError(f"batch_size must be >= 1, got {batch_size}.")
    for start in range(0, len(prompt_ids), batch_size):
        yield start, prompt_ids[start : start + batch_size]


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
    shared_prefill: bool = True,
    scoring: str = "live",
) -> Results:
    """Top `num_beams` catalogue items per prompt, best first: [[(item position, log-prob), ...], ...].

    Same selection rule as transformers 5.x `generate(num_beams=B, num_return_sequences=B,
    do_sample=False, length_penalty=0.0, early_stopping=False)` with `TrieLogitsProcessor`
    (see `stock_beam_search`): each step keeps the 2B best (beam, token) candidates, sends
    those among the first B that end with EOS to the finished pool and continues the B best
    unfinished ones; a prompt stops when no running beam can beat its B-th finished item.
    The difference is the work:

    - shared prefill: each prompt is run through the model once (b rows, not b*B), then its
      KV cache is repeated to the B beams (`SharedPromptLayer`);
    - scoring "live" (the default): the output layer and log-softmax run only for the beams
      that can still reach the finished pool (`_live_beams`), and only the trie's allowed
      (beam, token) candidates are gathered and ranked, so after the full-vocabulary
      log-softmax (which the scores need) the per-step work grows with the allowed tokens,
      not with B x vocabulary. "allowed": the same for every beam. "dense" masks the whole
      (b*B, V) table and ranks B x V entries per prompt, as stock does. All three rank the
      same finite candidates, so they return the same beams (scores equal up to the last
      bits of a matrix product over fewer rows).

    `shared_prefill=False` and the other scorings exist for `rere bench decode`, which times
    each change on its own. Nothing is read from `model.generation_config` (no sampling,
    no warpers, whatever the model's file says).

    `stats`, if given, accumulates seconds spent in "prefill_s", "decode_s" (forward passes
    after the prefill), "constraint_s" (applying the trie: masking, or gathering the
    allowed candidates), "select_s" (ranking candidates: log-softmax and top-k), the number
    of "steps", and "beam_rows" / "scored_rows" (beams per step, and those whose next-token
    scores were computed, summed over steps).
    """
    check_beams(trie, num_beams)
    if scoring not in SCORINGS:
        raise RereError(f"scoring must be one of {SCORINGS}, got {scoring!r}.")
    results: Results = []
    device = next(model.parameters()).device
    trie = trie.to(device)
    work = list(chunks(prompt_ids, batch_size))
    with eval_mode(model):
        for _, chunk in tqdm(work, desc="beam search", unit="batch", disable=not progress):
            results.extend(
                _beam_search_batch(model, chunk, trie, num_beams, pad_token_id, device, stats, shared_prefill, scoring)
            )
    return results


SCORINGS = ("live", "allowed", "dense")


def _beam_search_batch(
    model, prompts, trie: ItemTrie, num_beams: int, pad_token_id: int, device, stats, shared: bool, scoring: str
) -> Results:
    dense = scoring == "dense"
    timer = Timer(stats)
    b, beams, keep = len(prompts), num_beams, 2 * num_beams  # one EOS id: 2B candidates, as stock
    ids, mask = left_pad(prompts, pad_token_id, device)
    if not shared:  # every beam its own copy of the prompt, as stock `generate` does
        ids, mask = ids.repeat_interleave(beams, dim=0), mask.repeat_interleave(beams, dim=0)  # (b*B, T)
    with timer("prefill_s"):
        logits, cache, last_pos = prefill(model, ids, mask)  # (b or b*B, V), its cache, (b or b*B, 1)
    if not shared:
        logits, last_pos = logits[::beams], last_pos[::beams]  # a prompt's rows are copies: (b, V), (b, 1)
    vocab = logits.shape[-1]
    # (b*B, V) logits and log-probs reused each step (allowed scoring): on CPU a fresh tensor of
    # that size costs more in page faults than the arithmetic that fills it.
    logits_buffer = log_probs_buffer = None

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
    beam_mask = mask if not shared else mask.repeat_interleave(beams, dim=0)  # (b*B, T)
    beam_pos = last_pos.repeat_interleave(beams, dim=0)  # (b*B, 1)

    for t in range(trie.max_depth):
        if t > 0:
            beam_mask = torch.cat([beam_mask, beam_mask.new_ones((b * beams, 1))], dim=1)  # (b*B, T+t)
            # "live" skips the output layer for beams that can no longer reach the finished
            # pool (see `_live_beams`); every beam still goes through the decoder.
            rows = _live_beams(running_scores, finished, finished_scores, open_) if scoring == "live" else None
            if scoring == "allowed":
                rows = torch.arange(b * beams, device=device)  # (b*B,)
            with timer("decode_s"):
                tokens = next_tokens.reshape(-1)  # (b*B,)
                logits = decode_step(model, tokens, beam_mask, beam_pos + t, cache, logits_buffer, rows)  # (L, V)
        else:
            rows = torch.arange(b, device=device) * beams  # step 0: beam 0 of each prompt, (b,)
        if stats is not None:
            stats["beam_rows"] = stats.get("beam_rows", 0) + b * beams
            stats["scored_rows"] = stats.get("scored_rows", 0) + (b * beams if rows is None else len(rows))
        if dense:
            top_scores, source, tokens = _dense_candidates(logits, running_scores, running_nodes, trie, keep, timer)
        else:
            if log_probs_buffer is None:
                logits_buffer = logits.new_empty((b * beams, vocab))
                log_probs_buffer = logits.new_empty((b * beams, vocab))
            top_scores, source, tokens = _allowed_candidates(
                logits, rows, running_scores, running_nodes, trie, keep, timer, log_probs_buffer
            )
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
        if t == 0 and shared:
            expand_cache(cache, beams, trie.max_depth)  # every beam of a prompt shares its prompt cache
        else:  # (at t = 0 a prompt's rows are still copies of each other: any order is the same)
            cache.reorder_cache((origin + row_offset).view(-1))  # (b*B,)

    if stats is not None:
        stats["steps"] = stats.get("steps", 0) + t + 1
    return collect(finished, finished_items, finished_scores, num_beams)


def _dense_candidates(logits, running_scores, running_nodes, trie: ItemTrie, keep: int, timer):
    """The 2B best (score, beam, token) per prompt from the masked (b, B x V) table, as stock.

    logits (b, V) at step 0 (one row per prompt: its beams are copies), else (b*B, V)."""
    b, beams = running_scores.shape
    vocab = logits.shape[-1]
    with timer("select_s"):
        log_probs = torch.log_softmax(logits, dim=-1)
        if len(logits) == b:  # step 0: beams 1.. start at -inf, so only beam 0's candidates are real
            log_probs = log_probs.repeat_interleave(beams, dim=0)  # (b*B, V)
    with timer("constraint_s"):
        trie.mask_(log_probs, running_nodes.reshape(-1))  # (b*B, V)
    with timer("select_s"):
        scores = log_probs.view(b, beams, vocab) + running_scores[:, :, None]  # (b, B, V)
        top_scores, top_idx = torch.topk(scores.view(b, beams * vocab), keep)  # (b, 2B)
    return top_scores, top_idx // vocab, top_idx % vocab  # (b, 2B) score, beam it extends, token


def _live_beams(running_scores, finished, finished_scores, open_) -> torch.Tensor:
    """Flat indices (L,) of the beams whose descendants can still enter the finished pool.

    Scores only fall with length, so a beam scoring below the worst of a full pool (B finished
    items), or at or below BEAM_PENALTY (an ended beam kept running, or -inf), or of a prompt
    that stopped, only ever makes candidates that rank below every candidate that can still
    finish. Dropping them leaves those candidates, and their places among the 2B kept, as
    they were: the finished pool, hence the returned beams, is unchanged.
    """
    full = finished.all(dim=1, keepdim=True)  # (b, 1)
    floor = torch.where(full, finished_scores.min(dim=1, keepdim=True).values, BEAM_PENALTY)  # (b, 1)
    live = open_ & (running_scores > floor)  # (b, B)
    return live.view(-1).nonzero().squeeze(1)  # (L,) one host sync


def _allowed_candidates(logits, rows, running_scores, running_nodes, trie: ItemTrie, keep: int, timer, buffer):
    """The 2B best (score, beam, token) per prompt among the allowed candidates of beams `rows`.

    logits (L, V) of the flat beams rows (L,) (prompt * B + beam); the other beams make no
    candidates (at step 0 only beam 0 is real: the others start at -inf). The same float
    values as `_dense_candidates` (full-vocabulary log-softmax, then + the beam's running
    score), so the same finite candidates rank first."""
    b, beams = running_scores.shape
    device = logits.device
    with timer("select_s"):
        log_probs = torch.log_softmax(logits, dim=-1, out=buffer[: len(logits)])  # (L, V)
    with timer("constraint_s"):
        nodes = running_nodes.view(-1)[rows]  # (L,)
        running = running_scores.view(-1)[rows]  # (L,)
        narrow, narrow_tokens, wide_at, wide_tokens, wide_scores = trie.children_scores(log_probs, nodes)
        k = narrow.shape[1]
        # Every candidate as a flat entry: the narrow tables (L*K, unused slots at -inf), then the
        # rows at wide nodes (S); packed per prompt into (b, W), W the most any prompt has.
        beam = torch.cat([rows.repeat_interleave(k), rows[wide_at]])  # (L*K + S,) flat beam
        score = torch.cat([(narrow + running[:, None]).view(-1), wide_scores + running[wide_at]])
        token = torch.cat([narrow_tokens.reshape(-1), wide_tokens])
        prompt = beam // beams  # (E,) grouped by prompt within each part (rows are sorted)
        n = len(rows) * k
        narrow_counts = torch.bincount(prompt[:n], minlength=b)  # (b,)
        wide_counts = torch.bincount(prompt[n:], minlength=b)  # (b,)
        counts = narrow_counts + wide_counts
        slot = torch.arange(len(beam), device=device)  # (E,) -> place within its prompt's row
        slot[:n] -= (torch.cumsum(narrow_counts, 0) - narrow_counts)[prompt[:n]]
        slot[n:] += narrow_counts[prompt[n:]] - n - (torch.cumsum(wide_counts, 0) - wide_counts)[prompt[n:]]
        width = max(int(counts.max()), keep)  # at least 2B (tiny catalogues, stopped prompts)
        candidates = score.new_full((b, width), NEG_INF)  # (b, W)
        candidates[prompt, slot] = score
        cand_beam = torch.zeros((b, width), dtype=torch.long, device=device)
        cand_beam[prompt, slot] = beam % beams
        cand_token = torch.full((b, width), trie.eos_token_id, dtype=torch.long, device=device)
        cand_token[prompt, slot] = token
    with timer("select_s"):
        top_scores, at = torch.topk(candidates, keep)  # (b, 2B)
    return top_scores, cand_beam.gather(1, at), cand_token.gather(1, at)  # (b, 2B) score, beam, token


def collect(finished: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, num_beams: int) -> Results:
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


class Timer:
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
