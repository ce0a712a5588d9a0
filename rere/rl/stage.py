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
reference model (beta), reference sync, logging, checkpoints.

Several processes (`accelerate launch --num_processes N`): TRL's sampler spreads a prompt's G
copies over consecutive positions of the global batch, so a group can straddle two processes.
The rollout therefore gathers every process's prompts, decodes each group once (groups are
shared out between processes), gathers the results and gives each process its own slice; the
columns that need the whole group (does it contain the target?) are computed there, before
TRL gathers the rewards and normalises them per group.

Pinned to trl 1.16.0: the rollout goes through GRPOTrainer's `rollout_func` hook, and
`_generate_and_score_completions(inputs)` is wrapped to hand the batch's rows to the rollout
and to log it; tests/test_rl.py fails loudly if either changes.

Outputs in `--out`: the policy (HF folder, rere.json stage "rl" with the variant),
trainer_log.jsonl (every log dict: reward per function, KL, loss, rollout statistics,
periodic validation HR/NDCG), rollouts.jsonl (every group: row, target, items, ranks,
advantages), config.yaml. `bench_rl` (`rere bench rl`) times beam rollouts against TRL's
default sampling.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from rere.checkpoints import (
    CHECKPOINTS,
    TRAINER_LOG,
    append_jsonl,
    jsonl_log_callback,
    last_complete_checkpoint,
    partial_dir,
)
from rere.cli import add_stage_paths
from rere.io import atomic_path
from rere.rl.inputs import RLInputs, load_inputs
from rere.rl.settings import grpo_args

log = logging.getLogger(__name__)

ROLLOUT_LOG = "rollouts.jsonl"


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


def build_trainer(inp: RLInputs, config: dict, output_dir: Path, callbacks=(), rollout_log: Path | None = None):
    """The ReReTrainer for these inputs (checkpoints under `output_dir`)."""
    import datasets

    s = inp.settings
    targs = grpo_args(
        s, output_dir, config["seed"], max(len(x) for x in inp.item_seqs), bool(inp.meta.get("trust_remote_code"))
    )
    from rere.rl.trainer import ReReTrainer

    return ReReTrainer(
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
    )


def run(args, config) -> int:
    from transformers import set_seed

    from rere import tracking
    from rere.model import save_model

    inp = load_inputs(args, config)
    data, out, start = Path(args.data), Path(args.out), Path(args.model)
    work = partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    resume = last_complete_checkpoint(work / CHECKPOINTS)
    set_seed(config["seed"])
    trainer = build_trainer(inp, config, work / CHECKPOINTS, rollout_log=work / ROLLOUT_LOG)
    main_process = trainer.accelerator.is_main_process
    if resume is not None:
        log.info("resuming from %s", resume)
    elif main_process:
        for name in (TRAINER_LOG, ROLLOUT_LOG):
            (work / name).unlink(missing_ok=True)
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
            rl_meta = {**inp.meta, "stage": "rl", "variant": args.variant, "base": str(start)}
            with atomic_path(out) as tmp:
                save_model(policy, inp.tokenizer, tmp, rl_meta, config)
                for name in (TRAINER_LOG, ROLLOUT_LOG):
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
