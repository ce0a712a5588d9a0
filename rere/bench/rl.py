"""`rere bench rl`: one rollout of G completions per prompt, ReRe's constrained beams against
TRL's default sampling (each prompt repeated G times), same prompts and model."""

from __future__ import annotations

import json
import time

import torch
from transformers import GenerationConfig

from rere.decoding import beam_search, left_pad, sample
from rere.io import atomic_path
from rere.synthetic import build_setup


def trl_default_rollout(
    model, prompt_ids: list[list[int]], g: int, pad_token_id: int, eos_token_id: int, max_new_tokens: int
):
    """What GRPOTrainer does without our rollout: each prompt repeated G times as separate
    rows, one `generate(do_sample=True)` call, unconstrained, temperature 1, no top-k/top-p.
    Returns the completions' token ids (B*G rows, prompt dropped)."""
    repeated = [p for p in prompt_ids for _ in range(g)]  # (B*G) rows, TRL's layout
    ids, mask = left_pad(repeated, pad_token_id, next(model.parameters()).device)
    gen = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)  # (B*G, T + new)
    return out[:, ids.shape[1] :].tolist()


def bench_rl(args, config) -> int:
    """Wall time of one rollout for the same prompts and model: G constrained beams per prompt
    (ReRe, shared prompt prefill) vs TRL's default sampling of G completions (prompt repeated
    G times), plus our constrained sampling. Synthetic catalogue and model from rere.bench."""
    seed = int(config["seed"])
    setup = build_setup(args, seed)
    model, trie, prompt_ids, pad, eos = (setup[k] for k in ("model", "trie", "prompts", "pad_id", "eos_id"))
    g, bs = args.beams, args.batch_size
    longest = max(len(s) for s in setup["seqs"])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def batches():
        return [prompt_ids[i : i + bs] for i in range(0, len(prompt_ids), bs)]

    # Warm-up: first calls pay for lazy initialisation.
    beam_search(model, prompt_ids[:1], trie, g, pad, bs)
    trl_default_rollout(model, prompt_ids[:1], g, pad, eos, longest)

    timings = {}
    start = time.perf_counter()
    beams = [r for b in batches() for r in beam_search(model, b, trie, g, pad, len(b))]
    timings["beam"] = time.perf_counter() - start
    start = time.perf_counter()
    sampled = [c for b in batches() for c in trl_default_rollout(model, b, g, pad, eos, longest)]
    timings["trl_sampling"] = time.perf_counter() - start
    start = time.perf_counter()
    constrained = [r for b in batches() for r in sample(model, b, trie, g, 1.0, generator, pad, len(b))]
    timings["constrained_sampling"] = time.perf_counter() - start

    valid = {tuple(s) for s in setup["seqs"]}
    sampled_valid = sum(tuple(c[: c.index(eos) + 1] if eos in c else c) in valid for c in sampled)
    figures = {
        "prompts": len(prompt_ids),
        "G": g,
        "prompts_per_call": bs,
        "items": trie.num_items,
        "max_completion_tokens": longest,
        "model": f"qwen2 hidden {args.hidden_size} x {args.layers} layers",
        "torch_threads": torch.get_num_threads(),
        "s_beam_rollout": timings["beam"],
        "s_trl_default_sampling": timings["trl_sampling"],
        "s_constrained_sampling": timings["constrained_sampling"],
        "ratio_trl_sampling_over_beam": timings["trl_sampling"] / timings["beam"],
        "beam_distinct_items_per_prompt": sum(len({i for i, _ in r}) for r in beams) / len(beams),
        "constrained_sampling_distinct_items_per_prompt": sum(len({i for i, _ in r}) for r in constrained)
        / len(constrained),
        "trl_sampling_valid_share": sampled_valid / len(sampled),
    }
    print(
        f"rollout of G={g} completions for {figures['prompts']} prompts ({bs} per call), {figures['model']}, "
        f"{figures['items']} items, completions <= {longest} tokens, {figures['torch_threads']} torch threads:"
    )
    print(f"  rere constrained beam search (shared prefill): {timings['beam']:8.2f} s")
    print(f"  TRL default sampling (prompt repeated G times): {timings['trl_sampling']:8.2f} s")
    print(f"  rere constrained sampling (shared prefill):    {timings['constrained_sampling']:8.2f} s")
    print(f"  ratio TRL sampling / beam rollout: {figures['ratio_trl_sampling_over_beam']:.2f}x")
    print(
        f"  distinct items per prompt: beams {figures['beam_distinct_items_per_prompt']:.1f}, constrained samples "
        f"{figures['constrained_sampling_distinct_items_per_prompt']:.1f}; TRL samples that are catalogue items: "
        f"{100 * figures['trl_sampling_valid_share']:.1f}%"
    )
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0
