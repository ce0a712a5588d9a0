"""`ReReTrainer`: TRL's GRPOTrainer with ReRe's rollout (constrained beams or sampling).

Pinned to trl 1.16.0: the rollout goes through GRPOTrainer's `rollout_func` hook, and
`_generate_and_score_completions(inputs)` is wrapped to hand the batch's rows to the rollout
and to log it; tests/test_rl.py fails loudly if either changes.

Several processes: TRL's sampler spreads a prompt's G copies over consecutive positions of
the global batch, so a group can straddle two processes. The rollout therefore gathers every
process's prompts, decodes each group once (groups are shared out between processes),
gathers the results and gives each process its own slice; the columns that need the whole
group (does it contain the target?) are computed there, before TRL gathers the rewards and
normalises them per group.

Checkpoints (rl.save_steps) hold, besides what Trainer saves (policy, optimizer, scheduler,
RNG states, trainer state), the reference model: with sync_ref_model it is a copy of the
policy at the last sync, which TRL would otherwise rebuild from the start model on resume.
The sampler's order is drawn from seed + epoch, so a run resumed in a later epoch sees the
same prompts as an uninterrupted one (TRL's sampler seeds one generator once per run).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_model, save_model
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler

from rere import RereError
from rere.decoding import beam_search, sample
from rere.rl.rollout import distinct_first, group_stats, sample_ranks


class ReReTrainer(GRPOTrainer):
    """GRPOTrainer whose rollout is ReRe's (constrained beams or sampling over the catalogue)."""

    def __init__(
        self,
        *args,
        index,
        trie,
        item_seqs,
        sampling: str,
        rollout_log: Path | None = None,
        filter_prompts: int = 0,
        decode_batch_prompts: int | None = None,
        target_advantage: bool = False,
        **kwargs,
    ):
        self.rere_index = index
        self.rere_trie = trie
        self.rere_item_seqs = item_seqs  # item position -> completion token ids (EOS included)
        self.rere_sampling = sampling
        self.rere_decode_batch = decode_batch_prompts  # prompts per decoding chunk; None: all at once
        self.rere_rollout_log = rollout_log
        self._rere_inputs: list[dict] | None = None
        self._rere_groups: list[dict] = []
        # rl.filter_groups: decode up to this many prompts per step and train on groups whose
        # rewards are not all equal (0: off, train on the sampled batch as it is).
        self.rere_filter_prompts = filter_prompts
        self._rere_predecoded: dict[int, list[tuple[int, float]]] = {}
        # loss rft: advantage 1 for the completion that names the target, 0 for the others
        self.rere_target_advantage = target_advantage
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*'rollout_func'.*experimental")
            super().__init__(*args, rollout_func=self._rollout, **kwargs)
        if filter_prompts and self.accelerator.num_processes > 1:
            raise RereError(
                "rl.filter_groups selects groups across the whole batch and runs in one process only; "
                "set rl.filter_groups=false or train with one process."
            )

    # TRL calls this with the local rows of one generation batch (each prompt's G copies).
    def _generate_and_score_completions(self, inputs):
        if self.rere_filter_prompts:
            inputs = self._groups_with_signal(inputs)
        self._rere_inputs = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._rere_inputs = None
            self._rere_predecoded = {}
        if self.rere_target_advantage:
            output["advantages"] = self._target_advantages(output["advantages"])
        self._log_groups(output["advantages"])
        return output

    def _target_advantages(self, advantages: torch.Tensor) -> torch.Tensor:
        """`loss: rft`: this process's advantages replaced by 1 for each completion that names
        its group's target and 0 for the others (TRL's process slice of the global batch)."""
        hits = [float(item == grp["target"]) for grp in self._rere_groups for item in grp["items"]]
        start = self.accelerator.process_index * len(advantages)
        return torch.tensor(hits[start : start + len(advantages)], dtype=advantages.dtype, device=advantages.device)

    # ------------------------------------------------------------------------------------------
    # DAPO-style dynamic sampling: spend the step on groups that carry an advantage

    def _groups_with_signal(self, inputs: list[dict]) -> list[dict]:
        """The generation batch's B prompts replaced by B prompts whose G rewards are not all
        equal (a group with equal rewards has zero advantage and trains nothing).

        Candidates are the batch's own prompts, then further train prompts drawn with a
        seeded RNG (seed, step), decoded B at a time until B groups have signal or
        `filter_prompts` prompts were decoded; the rest of the batch is filled with the
        earliest decoded groups without signal. Every variant decodes with the same rule
        and budget; the decoded groups are kept so the rollout does not decode them again.
        """
        g = self.num_generations
        batch = [inputs[i] for i in range(0, len(inputs), g)]  # one row per group, in batch order
        want = len(batch)
        pool = self.train_dataset
        taken = {int(r["row"]) for r in batch}
        rng = random.Random(self.args.seed * 1_000_003 + self.state.global_step)
        extra = [i for i in rng.sample(range(len(pool)), min(len(pool), self.rere_filter_prompts)) if i not in taken]
        candidates = batch + [pool[i] for i in extra[: max(0, self.rere_filter_prompts - want)]]
        signal, flat, decoded = [], [], 0
        for start in range(0, len(candidates), want):
            chunk = candidates[start : start + want]
            ids = self.processing_class(text=[r["prompt"] for r in chunk])["input_ids"]
            for row, picks in zip(chunk, self._decode(ids, first_group=start), strict=True):
                self._rere_predecoded[int(row["row"])] = picks
                (signal if self._has_signal(row, picks) else flat).append(row)
            decoded += len(chunk)
            if len(signal) >= want:
                break
        chosen = (signal + flat)[:want]
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollout/decoded_prompts"].append(float(decoded))
        self._metrics[mode]["rollout/signal_share_decoded"].append(len(signal) / decoded)
        return [dict(row) for row in chosen for _ in range(g)]

    def _has_signal(self, row: dict, picks: list[tuple[int, float]]) -> bool:
        """Whether the weighted sum of this group's rewards varies across its G completions."""
        g = self.num_generations
        items = [self.rere_index.item_ids[pos] for pos, _ in picks]
        ranks = list(range(1, g + 1)) if self.rere_sampling == "beam" else sample_ranks(items, [lp for _, lp in picks])
        columns = {k: [v] * g for k, v in row.items() if k != "prompt"}
        columns.update(
            item_id=items,
            beam_rank=ranks,
            target_in_group=[int(row["target"]) in items] * g,
            group_size=[g] * g,
        )
        total = [0.0] * g
        for func, weight in zip(self.reward_funcs, self.reward_weights.tolist(), strict=True):
            values = func(prompts=[row["prompt"]] * g, completions=[""] * g, **columns)
            total = [t + weight * float(v) for t, v in zip(total, values, strict=True)]
        return max(total) - min(total) > 1e-12

    def _decode(self, prompt_ids: list[list[int]], first_group: int) -> list[list[tuple[int, float]]]:
        """G (item position, log-prob) per prompt, in the order the completions are handed back."""
        g = self.num_generations
        if not prompt_ids:
            return []
        pad = self.processing_class.pad_token_id
        chunk = self.rere_decode_batch or len(prompt_ids)
        with (
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
            ) as model,
            torch.no_grad(),
        ):
            was_training = model.training
            model.eval()
            try:
                if self.rere_sampling == "beam":
                    return beam_search(model, prompt_ids, self.rere_trie, g, pad, chunk)
                # The draws depend on the seed, the step and the group, not on the process layout.
                generator = torch.Generator(device=model.device)
                generator.manual_seed(self.args.seed * 1_000_003 + self.state.global_step * 7919 + first_group)
                n = g if self.rere_sampling == "sample" else math.ceil(1.5 * g)
                drawn = sample(model, prompt_ids, self.rere_trie, n, self.temperature, generator, pad, chunk)
                return drawn if self.rere_sampling == "sample" else [distinct_first(d, g) for d in drawn]
            finally:
                model.train(was_training)

    def _rollout(self, prompts: list[str], trainer) -> dict:
        """TRL's rollout_func: completions for the local rows, each group decoded once."""
        rows = self._rere_inputs
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("ReReTrainer: the rollout was called without its batch rows (TRL changed?)")
        g = self.num_generations
        local_ids = self.processing_class(text=prompts)["input_ids"]
        local = [(int(r["row"]), int(r["target"]), ids) for r, ids in zip(rows, local_ids, strict=True)]
        everyone = gather_object(local)  # global batch, in process order
        if len(everyone) % g:
            raise RuntimeError(f"global batch of {len(everyone)} completions is not a whole number of groups of {g}")
        groups = [everyone[i : i + g] for i in range(0, len(everyone), g)]
        for k, grp in enumerate(groups):
            if any(x[0] != grp[0][0] for x in grp):
                raise RuntimeError(f"group {k} mixes rows {[x[0] for x in grp]}: TRL's sampler layout changed")

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = list(range(rank, len(groups), world))
        if all(groups[k][0][0] in self._rere_predecoded for k in mine):  # decoded while filtering
            decoded = [self._rere_predecoded[groups[k][0][0]] for k in mine]
        else:
            decoded = self._decode([groups[k][0][2] for k in mine], first_group=rank)
        if any(len(d) != g for d in decoded):
            raise RuntimeError(f"the rollout returned {[len(d) for d in decoded]} completions per prompt, not {g}")
        by_group = dict(gather_object(list(zip(mine, decoded, strict=True))))

        item_ids = self.rere_index.item_ids
        columns: dict[str, list] = {k: [] for k in ("item_id", "beam_rank", "target_in_group", "group_size")}
        completion_ids = []
        self._rere_groups = []
        for k, grp in enumerate(groups):
            picks = by_group[k]  # G x (item position, log-prob)
            items = [item_ids[pos] for pos, _ in picks]
            logps = [float(lp) for _, lp in picks]
            ranks = list(range(1, g + 1)) if self.rere_sampling == "beam" else sample_ranks(items, logps)
            target = grp[0][1]
            for (pos, _), item, r in zip(picks, items, ranks, strict=True):
                completion_ids.append(list(self.rere_item_seqs[pos]))
                columns["item_id"].append(item)
                columns["beam_rank"].append(r)
                columns["target_in_group"].append(target in items)
                columns["group_size"].append(g)
            self._rere_groups.append(
                {"row": grp[0][0], "target": target, "items": items, "ranks": ranks, "logps": logps}
            )
        for key, value in group_stats(
            [x["items"] for x in self._rere_groups], [x["target"] for x in self._rere_groups]
        ).items():
            self._metrics["train" if self.model.training else "eval"][key].append(value)

        start = rank * len(prompts)  # this process's slice of the global batch
        sl = slice(start, start + len(prompts))
        return {
            "prompt_ids": [list(x[2]) for x in local],
            "completion_ids": completion_ids[sl],
            "logprobs": None,
            **{k: v[sl] for k, v in columns.items()},
        }

    def _log_groups(self, local_advantages) -> None:
        """Append this batch's groups, with TRL's advantages, to rollouts.jsonl (main process)."""
        advantages = self.accelerator.gather(local_advantages.detach()).float().cpu().tolist()
        if self.rere_rollout_log is None or not self.accelerator.is_main_process:
            return
        g = self.num_generations
        with open(self.rere_rollout_log, "a", encoding="utf-8") as f:
            for k, grp in enumerate(self._rere_groups):
                record = {"step": self.state.global_step, **grp, "advantages": advantages[k * g : (k + 1) * g]}
                f.write(json.dumps(record, sort_keys=True) + "\n")

    # ---------------------------------------------------------------------------------------------
    # Resuming: a resumed run trains exactly as an uninterrupted one

    def _get_train_sampler(self, dataset=None):
        # GRPOTrainer._get_train_sampler's RepeatSampler (trl 1.16), with an epoch-seeded order.
        return EpochSeededRepeatSampler(
            data_source=self.train_dataset if dataset is None else dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _save_checkpoint(self, model, trial):
        # Written before Trainer's files: trainer_state.json comes last and marks the checkpoint complete.
        if self.ref_model is not None and self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            save_model(self.accelerator.unwrap_model(self.ref_model), str(folder / REF_MODEL))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.ref_model is not None:
            path = Path(resume_from_checkpoint) / REF_MODEL
            if not path.is_file():
                raise RuntimeError(f"{resume_from_checkpoint} has no {REF_MODEL}: it was not written by ReReTrainer")
            load_model(self.accelerator.unwrap_model(self.ref_model), str(path), device=str(self.accelerator.device))


REF_MODEL = "ref_model.safetensors"  # the reference model's weights, in every checkpoint


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler, with epoch e's order drawn from seed + e (Trainer calls `set_epoch`
    before each epoch, also the one it resumes in)."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed(self.seed + epoch)
