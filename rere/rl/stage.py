"""`rere rl`: ReRe reinforcement learning from the SFT model (TRL GRPOTrainer, our rollouts).

    rere rl --variant V --data data/D --index index/D --model models/D/sft --out models/D/V \\
        [--eval-out results/D/V]

For each train prompt (a user's history, target y) the policy writes G catalogue items and
GRPO pushes up the ones with above-group-average reward. ReRe changes two things in TRL's
GRPOTrainer, and only those two are replaced here (`ReReTrainer`):

1. The rollout. TRL repeats every prompt G times and samples each copy on its own; in a
   catalogue-constrained space that repeats the same few items. We take each prompt once,
   run constrained beam search with G beams (`sampling: beam`: G distinct valid items, best
   first), or constrained sampling (`sample`), or over-sample 1.5G and keep G with distinct
   items first (`dynamic`), and hand the G completions back in the repeated order TRL
   expects, with each completion's item id and rank as reward columns.
2. The rewards (rere.rewards): rule (1 for the target), ReRe's ranking penalty, and the
   ablations, as ordinary TRL reward functions.

Everything else comes from TRL options: group-normalised advantages (scale_rewards "group"),
the clipped policy-gradient loss (`loss: grpo` -> loss_type "grpo", `dapo` -> "dapo", `gspo`
-> loss_type "grpo" with importance_sampling_level "sequence"), the k3 KL penalty to a
reference model (beta), reference sync, logging, checkpoints. `loss: rft` (rejection-sampling
fine-tuning) keeps all of it but the advantages: 1 for the completion that names the target,
0 for the others, i.e. the cross-entropy of the target in the groups whose completions hold it
(the same groups GRPO learns from): what the prompts chosen by the rollout give without the
policy gradient's negatives.

Several processes (`accelerate launch --num_processes N`): TRL's sampler spreads a prompt's G
copies over consecutive positions of the global batch, so a group can straddle two processes.
The rollout therefore gathers every process's prompts, decodes each group once (groups are
shared out between processes), gathers the results and gives each process its own slice; the
columns that need the whole group (does it contain the target?) are computed there, before
TRL gathers the rewards and normalises them per group.

Pinned to trl 1.16.0: the rollout goes through GRPOTrainer's `rollout_func` hook, and
`_generate_and_score_completions(inputs)` is wrapped to hand the batch's rows to the rollout
and to log it; tests/test_rl.py fails loudly if either changes.

A killed job resumes (rl.save_steps): training runs in OUT.partial/ (rere.checkpoints), with
checkpoints of the policy, optimizer, scheduler, RNG states and the reference model, and
rl_inputs.json, the signature of what the checkpoints depend on (`inputs_signature`). A
rerun resumes the newest complete checkpoint when the signature is the same, and refuses
one of other inputs or settings, naming the keys that differ; the logs are cut back to the
checkpoint's step. The resumed run then trains exactly as an uninterrupted one would.

Outputs in `--out`: the policy (HF folder, rere.json stage "rl" with the variant),
trainer_log.jsonl (every log dict: reward per function, KL, loss, rollout statistics,
periodic validation HR/NDCG), rollouts.jsonl (every group: row, target, items, ranks,
advantages), rl_inputs.json, config.yaml. `bench_rl` (`rere bench rl`) times beam rollouts
against TRL's default sampling.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from rere.checkpoints import (
    CHECKPOINTS,
    TRAINER_LOG,
    append_jsonl,
    check_or_clear,
    drop_incomplete,
    file_digest,
    folder_digest,
    jsonl_log_callback,
    last_complete_checkpoint,
    partial_dir,
    step_of,
    truncate_log,
    write_signature,
)
from rere.cli import add_stage_paths
from rere.io import atomic_path
from rere.rl.inputs import RLInputs, load_inputs
from rere.rl.settings import grpo_args

log = logging.getLogger(__name__)

ROLLOUT_LOG = "rollouts.jsonl"
INPUTS = "rl_inputs.json"  # inputs_signature of the run that made the checkpoints in OUT.partial

# rl settings that may change between a run and its resumption: they change when or how the
# work is done (validation, checkpoints, memory), not the trained weights (micro-batches: up to
# float rounding), so a job that ran out of memory can resume with smaller micro-batches.
RESUMABLE_KEYS = ("eval_every", "eval_rows", "save_steps", "micro_batch_prompts", "gradient_checkpointing")


def add_arguments(parser) -> None:
    parser.add_argument("--variant", required=True, help="name of an entry in rl.variants (e.g. rere)")
    add_stage_paths(
        parser,
        model="start model folder (models/D/sft, or models/D/base)",
        out="output model folder, e.g. models/D/rere",
    )
    parser.add_argument("--eval-out", default=None, help="also evaluate the policy here (as `rere evaluate` does)")
    parser.add_argument(
        "--sasrec",
        default=None,
        help="folder of a trained SASRec (`rere baseline --method sasrec`); reward collaborative",
    )


def build_trainer(
    inp: RLInputs, config: dict, output_dir: Path, callbacks=(), rollout_log: Path | None = None, trainer_class=None
):
    """The ReReTrainer (or a subclass of it, e.g. the benchmark's timed one) for these inputs
    (checkpoints under `output_dir`)."""
    import datasets

    s = inp.settings
    targs = grpo_args(
        s,
        output_dir,
        config["seed"],
        max(len(x) for x in inp.item_seqs),
        bool(config["model"]["trust_remote_code"]),  # the config decides, never the folder
    )
    from rere.rl.trainer import ReReTrainer

    return (trainer_class or ReReTrainer)(
        model=inp.model,
        reward_funcs=inp.funcs,
        args=targs,
        train_dataset=datasets.Dataset.from_list(inp.train),
        processing_class=inp.tokenizer,
        callbacks=list(callbacks),
        index=inp.index,
        trie=inp.trie,
        item_seqs=inp.item_seqs,
        sampling=s.sampling,
        decode_batch_prompts=s.decode_batch_prompts,
        rollout_log=rollout_log,
        filter_prompts=s.filter_max_prompts if s.filter_groups else 0,
        target_advantage=s.loss == "rft",
    )


def inputs_signature(inp: RLInputs, args, config: dict, processes: int) -> dict:
    """What an RL checkpoint depends on; a checkpoint of another signature is never resumed: the
    start model, index, train split, reward resources, seed, the variant, every rl setting that
    changes the weights, and the number of processes (the batch and RNG states are per process)."""
    rl = {k: v for k, v in dataclasses.asdict(inp.settings).items() if k not in RESUMABLE_KEYS}
    signature = {
        "index": inp.index.fingerprint,
        "start": folder_digest(Path(args.model)),
        "train": file_digest(Path(args.data) / "train.csv"),
        "seed": config["seed"],
        "variant": rl.pop("variant"),
        "rl": rl,
        "processes": processes,
    }
    if inp.settings.reward == "semantic":  # item text embeddings (rere.rl.inputs.item_vectors)
        signature["reward_inputs"] = {
            "items": file_digest(Path(args.data) / "items.jsonl"),
            "embedder": config["index"]["sid"],
        }
    if inp.settings.reward == "collaborative":
        signature["reward_inputs"] = {"sasrec": folder_digest(Path(args.sasrec))}
    return signature


def prepare_work_dir(out: Path, signature: dict, accelerator) -> tuple[Path, Path | None]:
    """OUT.partial and the checkpoint to resume from (None: start over). Checkpoints of other
    inputs or settings are refused, not resumed: RL runs for hours, and `rere.json` would
    describe a run that did not make the weights. Every process checks; the main one clears."""
    work = partial_dir(out)
    check_or_clear(work, INPUTS, signature, refuse=True, clear=accelerator.is_main_process)
    if accelerator.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        write_signature(work / INPUTS, signature)
        drop_incomplete(work / CHECKPOINTS)
        resume = last_complete_checkpoint(work / CHECKPOINTS)
        if resume is None:
            for name in (TRAINER_LOG, ROLLOUT_LOG):
                (work / name).unlink(missing_ok=True)
        else:
            # trainer_log.jsonl holds step N's log when checkpoint-N is written; rollouts.jsonl's
            # step is the one the rollout starts from, so checkpoint-N has those of steps < N.
            truncate_log(work / TRAINER_LOG, step_of(resume))
            truncate_log(work / ROLLOUT_LOG, step_of(resume) - 1)
    accelerator.wait_for_everyone()
    return work, last_complete_checkpoint(work / CHECKPOINTS)


def run(args, config) -> int:
    from transformers import set_seed

    from rere import tracking
    from rere.model import save_model

    inp = load_inputs(args, config)
    data, out, start = Path(args.data), Path(args.out), Path(args.model)
    work = partial_dir(out)
    set_seed(config["seed"])
    trainer = build_trainer(inp, config, work / CHECKPOINTS, rollout_log=work / ROLLOUT_LOG)
    main_process = trainer.accelerator.is_main_process
    signature = inputs_signature(inp, args, config, trainer.accelerator.num_processes)
    _, resume = prepare_work_dir(out, signature, trainer.accelerator)
    if resume is not None:
        log.info("resuming from %s", resume)
    # One MLflow run per stage, opened by the main process only.
    track = config if main_process else {**config, "tracking": {**config["tracking"], "mlflow": False}}

    with tracking.stage_run(
        track, stage="rl", dataset=data.name, method=args.variant, index_kind=inp.index.kind
    ) as mlrun:
        for callback in _callbacks(work / TRAINER_LOG, inp, config, mlrun):
            trainer.add_callback(callback)
        started = time.time()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        summary = {
            "train_loss": result.training_loss,
            "global_step": trainer.state.global_step,
            "wall_s": time.time() - started,
            "train_rows": len(inp.train),
            "processes": trainer.accelerator.num_processes,
        }
        log.info("rl %s done: %s", args.variant, summary)
        mlrun.log_metrics({k: float(v) for k, v in summary.items()})

        trainer.accelerator.wait_for_everyone()
        if main_process:
            policy = trainer.accelerator.unwrap_model(trainer.model)
            policy.eval()
            policy.to(inp.save_dtype)  # the start model's dtype, whatever rl.train_dtype
            rl_meta = {**inp.meta, "stage": "rl", "variant": args.variant, "base": str(start)}
            with atomic_path(out) as tmp:
                save_model(policy, inp.tokenizer, tmp, rl_meta, config)
                for name in (TRAINER_LOG, ROLLOUT_LOG, INPUTS):
                    if (work / name).is_file():
                        shutil.copyfile(work / name, tmp / name)
                (tmp / "rl_summary.json").write_text(
                    json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
            shutil.rmtree(work, ignore_errors=True)
            mlrun.log_artifact(out / TRAINER_LOG)
        trainer.accelerator.wait_for_everyone()

    if args.eval_out and main_process:
        import argparse

        from rere import evaluate

        ev_args = argparse.Namespace(
            data=str(data), index=args.index, model=str(out), out=args.eval_out, method=args.variant
        )
        evaluate.run(ev_args, config)
    return 0


def _callbacks(log_path: Path, inp: RLInputs | None, config: dict, mlrun):
    """trainer_log.jsonl of every log dict, and (rl.eval_every) a small validation HR/NDCG."""
    from transformers import TrainerCallback

    class PeriodicEval(TrainerCallback):
        """`evaluate_model` (the code of `rere evaluate`) on rl.eval_rows validation rows."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            from rere.evaluate import evaluate_model

            every = inp.settings.eval_every
            if not state.is_world_process_zero or state.global_step % every:
                return
            _, _, m = evaluate_model(
                model,
                inp.tokenizer,
                inp.index,
                inp.valid_rows,
                config,
                style=inp.meta["prompt_style"],
                split="valid",
                trie=inp.trie,
                progress=False,
            )
            record = {f"valid/{k}": v for k, v in m.items() if k.startswith(("hr@", "ndcg@"))}
            log.info("step %d validation: %s", state.global_step, record)
            mlrun.log_metrics(record, step=state.global_step)
            append_jsonl(log_path, {"step": state.global_step, **record})

    # trainer_log.jsonl: TRL's reward per function, KL, loss, and the rollout statistics
    return [jsonl_log_callback(log_path), mlrun.callback()] + (
        [PeriodicEval()] if inp is not None and inp.settings.eval_every else []
    )
