"""`rere bench rl`: the rollout, ReReTrainer's and TRL's, and one real RL step split into its parts.

(a) Rollout of G completions for the same prompts and model, each figure min / median / max
over `--repeats` (the three alternate within a repeat, the ratio is paired per repeat):
ReRe's constrained beam search (each prompt once, shared prefill), TRL's default sampling
(each prompt repeated G times, `generate(do_sample=True)`, unconstrained, at most the longest
item's tokens) and our constrained sampling.

(b) One RL step of the real `ReReTrainer` (rere.rl.stage.build_trainer, the config's rl
settings with G = --beams, --batch-size prompts per step, beta from the config), `--repeats`
steps after one warm-up step, split by timing the trainer's own methods:
- rollout: TRL's `_generate`, which calls ReReTrainer's rollout (tokenise the prompts,
  constrained beam search, reward columns) and collects the completions;
- reference forward: TRL's `_get_per_token_logps_and_entropies` called with the reference model;
- policy forward/backward: `training_step` (TRL's wrapper around forward, loss, backward)
  minus `_prepare_inputs` (which holds the rollout, rewards and reference forward);
- optimiser: from the end of `training_step` to the `on_optimizer_step` callback (gradient
  clipping and `optimizer.step()`);
- other: the rest of the step (rewards, advantages, data loading, scheduler, logging).
The timing subclass only wraps those methods; ReReTrainer itself is unchanged.

Statistics about the completions (valid share, distinct items) are not reported: for the
randomly initialised model used here they say nothing about a trained one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import GenerationConfig, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rere import RereError
from rere.bench.decode import fmt_spread, spread
from rere.decoding import beam_search, left_pad, sample
from rere.io import atomic_path
from rere.synthetic import EOS, PAD, build_setup, prompt_text

log = logging.getLogger(__name__)


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


def bench_rl(args: argparse.Namespace, config: dict) -> int:
    seed = int(config["seed"])
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        raise RereError("`rere bench rl` runs on CPU only (the RL step uses the trainer's own device placement).")
    setup = build_setup(args, seed)
    rollout = _rollouts(args, setup, seed)
    step = _rl_steps(args, config, setup, seed)
    figures = {
        "prompts": len(setup["prompts"]),
        "G": args.beams,
        "prompts_per_call": args.batch_size,
        "items": setup["trie"].num_items,
        "max_completion_tokens": max(len(s) for s in setup["seqs"]),
        "model": f"qwen2 hidden {args.hidden_size} x {args.layers} layers, vocab {setup['trie'].vocab_size}",
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "rollout": rollout,
        "rl_step": step,
    }
    _print(figures)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


# (a) rollouts


def _rollouts(args: argparse.Namespace, setup: dict, seed: int) -> dict:
    model, trie, prompt_ids, pad, eos = (setup[k] for k in ("model", "trie", "prompts", "pad_id", "eos_id"))
    g, bs = args.beams, args.batch_size
    longest = max(len(s) for s in setup["seqs"])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    batches = [prompt_ids[i : i + bs] for i in range(0, len(prompt_ids), bs)]
    runs = {
        "beam": lambda: [beam_search(model, b, trie, g, pad, len(b)) for b in batches],
        "trl_sampling": lambda: [trl_default_rollout(model, b, g, pad, eos, longest) for b in batches],
        "constrained_sampling": lambda: [sample(model, b, trie, g, 1.0, generator, pad, len(b)) for b in batches],
    }
    # Warm-up: first calls pay for lazy initialisation.
    beam_search(model, prompt_ids[:1], trie, g, pad, 1)
    trl_default_rollout(model, prompt_ids[:1], g, pad, eos, longest)
    sample(model, prompt_ids[:1], trie, g, 1.0, generator, pad, 1)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    ratio = [b / t for b, t in zip(seconds["beam"], seconds["trl_sampling"], strict=True)]
    return {**{f"s_{k}": spread(v) for k, v in seconds.items()}, "beam_over_trl_sampling": spread(ratio)}


# (b) one real RL step, split


PARTS = ("rollout", "reference_forward", "policy_forward_backward", "optimiser", "other")


def _timed_trainer_class():
    """ReReTrainer with timers around the methods named in the module docstring."""
    from trl import GRPOTrainer

    from rere.rl.trainer import ReReTrainer

    for name in ("_generate", "_prepare_inputs", "_get_per_token_logps_and_entropies", "training_step"):
        if not hasattr(GRPOTrainer, name):
            raise RereError(f"trl's GRPOTrainer has no {name}; `rere bench rl` times it (trl changed?)")

    class TimedReReTrainer(ReReTrainer):
        def _timing(self) -> dict:
            if not hasattr(self, "_bench_times"):
                self._bench_times = {}
            return self._bench_times

        def _add(self, key: str, seconds: float) -> None:
            self._timing()[key] = self._timing().get(key, 0.0) + seconds

        def _generate(self, prompts):
            start = time.perf_counter()
            try:
                return super()._generate(prompts)
            finally:
                self._add("rollout", time.perf_counter() - start)

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            finally:
                if model is self.ref_model:
                    self._add("reference_forward", time.perf_counter() - start)

        def _prepare_inputs(self, generation_batch):
            start = time.perf_counter()
            try:
                return super()._prepare_inputs(generation_batch)
            finally:
                self._add("prepare_inputs", time.perf_counter() - start)

        def training_step(self, model, inputs, num_items_in_batch=None):
            start = time.perf_counter()
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._timing()["training_step_end"] = time.perf_counter()
                self._add("training_step", time.perf_counter() - start)

    return TimedReReTrainer


class _StepClock(TrainerCallback):
    """Each step's wall time and optimiser time, and the trainer's per-method times, per step."""

    def __init__(self):
        self.trainer = None
        self.steps: list[dict] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._bench_times = {}
        self.begin = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimiser_end = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        t = dict(self.trainer._bench_times)
        total = time.perf_counter() - self.begin
        part = {
            "rollout": t.get("rollout", 0.0),
            "reference_forward": t.get("reference_forward", 0.0),
            "policy_forward_backward": t.get("training_step", 0.0) - t.get("prepare_inputs", 0.0),
            "optimiser": self.optimiser_end - t["training_step_end"],
        }
        part["other"] = total - sum(part.values())
        self.steps.append({"total": total, **part})


def _rl_steps(args: argparse.Namespace, config: dict, setup: dict, seed: int) -> dict:
    from transformers import PreTrainedTokenizerFast, set_seed

    from rere.rewards import reward_funcs
    from rere.rl.inputs import RLInputs
    from rere.rl.settings import RLSettings
    from rere.rl.stage import build_trainer

    variant = "rere" if "rere" in config["rl"]["variants"] else next(iter(config["rl"]["variants"]))
    settings = dataclasses.replace(
        RLSettings.from_config(config, variant),
        sampling="beam",
        num_generations=args.beams,
        batch_prompts=args.batch_size,
        max_steps=args.repeats + 1,  # the first step is a warm-up
        max_train_rows=None,
        warmup_ratio=0.0,
        eval_every=0,
        save_steps=0,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=setup["tokenizer"], pad_token=PAD, eos_token=EOS, padding_side="left"
    )
    titles, n = setup["titles"], len(setup["titles"])
    # One train row per prompt, enough rows for every step; targets drawn from the catalogue.
    rows_needed = settings.batch_prompts * settings.max_steps
    histories = [setup["histories"][i % len(setup["histories"])] for i in range(rows_needed)]
    train = [
        {"prompt": prompt_text([titles[i] for i in h]), "target": (7 * k + 3) % n, "history": list(h), "row": k}
        for k, h in enumerate(histories)
    ]
    clock = _StepClock()
    with tempfile.TemporaryDirectory(prefix="rere-bench-rl-") as tmp:
        model = setup["model"]
        model.save_pretrained(Path(tmp) / "start")  # TRL loads the reference model from the policy's path
        model.config._name_or_path = str(Path(tmp) / "start")
        inp = RLInputs(
            settings=settings,
            index=SimpleNamespace(item_ids=list(range(n))),  # item position = item id
            model=model,
            tokenizer=tokenizer,
            meta={"trust_remote_code": False},
            train=train,
            item_seqs=setup["seqs"],
            trie=setup["trie"],
            funcs=reward_funcs(settings.reward),
            valid_rows=None,
            save_dtype=model.dtype,
        )
        set_seed(seed)
        trainer = build_trainer(inp, config, Path(tmp) / "out", callbacks=[clock], trainer_class=_timed_trainer_class())
        clock.trainer = trainer
        for quiet in (ProgressCallback, PrinterCallback):  # the figures are printed at the end
            trainer.remove_callback(quiet)
        threads = torch.get_num_threads()
        trainer.train()
        torch.set_num_threads(threads)
    timed = clock.steps[1:]  # after the warm-up step
    if not timed:
        raise RereError("the RL benchmark recorded no step after the warm-up; this is a bug in rere.bench.rl.")
    total = [s["total"] for s in timed]
    return {
        "steps_timed": len(timed),
        "completions_per_step": settings.batch_prompts * settings.num_generations,
        "beta": settings.beta,
        "s_total": spread(total),
        **{f"s_{p}": spread([s[p] for s in timed]) for p in PARTS},
        **{f"share_{p}": statistics.median(s[p] / s["total"] for s in timed) for p in PARTS},
    }


def _print(f: dict) -> None:
    r, s = f["rollout"], f["rl_step"]
    print(
        f"rere bench rl: rollout of G={f['G']} completions for {f['prompts']} prompts ({f['prompts_per_call']} per call), "
        f"{f['model']}, {f['items']} items, completions <= {f['max_completion_tokens']} tokens, "
        f"{f['torch_threads']} torch threads, {f['repeats']} repeats (min/median/max seconds):"
    )
    print(f"  rere constrained beam search (shared prefill):  {fmt_spread(r['s_beam'])}")
    print(f"  TRL default sampling (prompt repeated G times): {fmt_spread(r['s_trl_sampling'])}")
    print(f"  rere constrained sampling (shared prefill):     {fmt_spread(r['s_constrained_sampling'])}")
    print(f"  beam rollout / TRL sampling, paired per repeat: {fmt_spread(r['beam_over_trl_sampling'])}x")
    print(
        f"one ReReTrainer step ({s['completions_per_step']} completions, beta {s['beta']}), {s['steps_timed']} steps "
        f"after a warm-up step, seconds min/median/max (median share):"
    )
    print(f"  {'total':26} {fmt_spread(s['s_total'])}")
    for p in PARTS:
        print(f"  {p.replace('_', ' '):26} {fmt_spread(s['s_' + p])} ({100 * s['share_' + p]:.0f}%)")
