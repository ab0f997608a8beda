"""The training loop: walk the stage plan with one DeepSpeed engine per stage. Every launcher ends here.

    python -m distributed.train --config configs/experiments/tiny.yaml [--resume] [--run-dir DIR] [key=value ...]
    deepspeed --num_gpus 2 --module distributed.train --config ... [key=value ...]
    run(cfg, run_dir, report=callback)          # e.g. inside a Ray Train worker

Per stage: mutate a plain model (append a block, freeze, realize; see apply_stage), build the engine
over its trainable parameters, train the stage's steps on per-rank deterministic batches, evaluate on
the fixed validation set, checkpoint. Between stages the full weights are gathered (ZeRO-3) into a
fresh plain model, so no mutation ever touches a partitioned module.

Exact resume: batches are a function of (seed, step, rank), the LR a function of the step, new blocks
are initialised from a seed derived from (seed, block index), and the checkpoint holds the weights,
optimizer state and every rank's RNG states, so a resumed run repeats the uninterrupted run's losses.

Host syncs: the loss stays on the device between syncs, every `train.log_interval` steps and at
every step an evaluation, checkpoint or stage end follows; the train record of a sync is the mean
over its window of steps. Stop requests and the loss check are read at syncs.

Faults: SIGTERM (preemption) stops at the next sync, checkpoints and returns normally (exit 0); a
non-finite loss raises NonFiniteLossError at the sync that sees it, naming the steps and stage,
before that step is applied and without saving, so the last good checkpoint stays `latest`. `debug.kill_at_step` makes a rank SIGKILL
itself after a step (and its checkpoint): tests of recovery use it.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import yaml

from data import build_token_cache, get_encoding, train_batch, validation_batches
from distributed import checkpoint as ckpt
from distributed.config import ConfigError, ExperimentConfig, load_config
from distributed.engine import (block_digests, build_engine, carries_optimizer_state, compiled_graph_count,
                                destroy_engine, full_state_dict, init_distributed, load_optimizer_moments,
                                optimizer_moments, optimizer_state_bytes, quiet_deepspeed_logging,
                                same_on_every_rank, set_learning_rate)
from distributed.metrics import MetricsLogger, peak_memory_bytes
from distributed.preflight import preflight
from distributed.schedule import (Stage, build_plan, format_budgets, format_plan, learning_rate,
                                  new_parameter_names, new_parameter_warmup, plan_record, tokens_per_step)
from model import GPT

# DeepSpeed (imported lazily by distributed/engine.py) picks its accelerator at import time and warns
# when it falls back to the CPU; name it instead.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
# torch.distributed's deprecation notices for the collectives DeepSpeed calls, once per call site.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.")

ReportFn = Callable[[dict, "str | None"], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; nothing of that step was applied or saved."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    step: int
    completed: bool      # every step of the plan is done and final/ is written
    preempted: bool      # stopped early by SIGTERM or stop_event, after a checkpoint
    val_loss: float | None
    final_dir: Path | None


def block_seed(seed: int, index: int) -> int:
    """The seed a grown block is initialised from: the same whenever and wherever it is added."""
    return int(np.random.SeedSequence([seed, 0x626C6F636B, index]).generate_state(1)[0])


def apply_stage(model: GPT, stage: Stage, seed: int) -> None:
    """Make `model`'s structure and trainability those of `stage` (idempotent)."""
    if stage.realize:
        model.realize()  # a no-op on an already dense model
    while model.n_blocks < stage.n_blocks:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(seed, model.n_blocks))
            model.add_block()
    model.requires_grad_(True)
    for i in stage.frozen_blocks:
        model.freeze_layer(i)
    if stage.embeddings_frozen:
        model.freeze_embeddings()


def initial_model(cfg: ExperimentConfig, plan: list[Stage]) -> GPT:
    """The model as a fresh run starts: a function of the config's seed alone, so its initial
    weights can be regenerated after training (the rank advisor analyses W - W0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model, n_initial_layers=plan[0].n_blocks)
    apply_stage(model, plan[0], cfg.seed)
    return model


class Trainer:
    """State of one run on one rank; `run()` below is the public entry point."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, report: ReportFn | None,
                 stop_event: threading.Event | None):
        self.cfg, self.run_dir, self.report, self.stop_event = cfg, run_dir, report, stop_event
        self.info = init_distributed(cfg.deepspeed.backend)
        self.rank, self.world_size, self.device = self.info.rank, self.info.world_size, self.info.device
        quiet_deepspeed_logging(self.rank)
        self.plan = build_plan(cfg, self.world_size)
        self.tokens_per_step = tokens_per_step(cfg, self.world_size)
        self.signalled = False
        self.engine = None
        self.structure: dict = {}
        self.stage_index = 0
        self.step = self.tokens = 0
        self.flops = 0
        self.val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        # The loss window since the last host sync (see _train_step).
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.window_micro_steps = self.window_steps = 0
        self.window_started: float | None = None

    # ------------------------------------------------------------ set-up

    def prepare(self, resume: bool | str) -> None:
        cfg = self.cfg
        # preflight() has checked the resume flag, the config and the world size against the newest
        # complete checkpoint; rank 0 now also checks the files against its manifest (falling back
        # past a damaged one) and every rank resumes from its choice.
        choice = [ckpt.latest_checkpoint(self.run_dir, verify=True) if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0)
        found = choice[0]
        if resume is True and found is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {ckpt.checkpoint_root(self.run_dir)}")
        resuming = found is not None
        config_file = self.run_dir / "config.yaml"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resuming or not config_file.is_file():  # a copy for people; checkpoints hold theirs
                config_file.write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        dist.barrier()

        # Every rank opens (or, the first, builds) the token cache; a file lock serialises builders.
        self.cache = build_token_cache(cfg.data)
        self.val_batches = validation_batches(
            self.cache.val, batch_size=cfg.train.micro_batch_size, block_size=cfg.model.block_size,
            num_tokens=cfg.data.val_tokens, rank=self.rank, world_size=self.world_size)

        self.log = MetricsLogger(cfg, self.run_dir, self.rank, start_step=found[1]["step"] if resuming else 0)
        if resuming:
            tag, meta = found
            self.step, self.tokens, self.flops = meta["step"], meta["tokens"], meta["flops"]
            self.stage_index, self.val_loss = meta["stage"], meta.get("val_loss")
            model = ckpt.build_model(cfg, meta["structure"])
            self._build(model, realized=meta["structure"]["realized"], stage=self.plan[self.stage_index])
            ckpt.load_checkpoint(self.engine, self.run_dir, tag)
            self.last_checkpoint = ckpt.checkpoint_root(self.run_dir) / tag
        else:
            model = initial_model(cfg, self.plan)
            self._build(model, realized=self.plan[0].realize, stage=self.plan[0])
            # The training streams (dropout, ...) differ per rank and are saved with every checkpoint.
            torch.manual_seed(cfg.seed + 1 + self.rank)
            np.random.seed((cfg.seed + 1 + self.rank) % 2**32)
            random.seed(cfg.seed + 1 + self.rank)
        record = plan_record(cfg, self.plan)  # stages, per-block budgets, the dense baseline's
        self.log.log("run_start", self.step, self.stage_index, world_size=self.world_size,
                     resumed_from=found[0] if resuming else None, plan=record["stages"],
                     lr_schedule=record["lr_schedule"], blocks=record["blocks"],
                     dense_lr_integral=record["dense_lr_integral"])
        self.log.write(f"run dir: {self.run_dir}  (world size {self.world_size}, ZeRO-{cfg.deepspeed.zero_stage}, "
                       f"{cfg.deepspeed.precision}, {self.tokens_per_step:,} tokens/step)\n"
                       + format_plan(self.plan) + "\n" + format_budgets(record)
                       + (f"\nresuming from {found[0]} (step {self.step})" if resuming else ""))
        if cfg.train.compile and cfg.deepspeed.zero_stage == 3:
            self.log.write("train.compile with ZeRO-3: DeepSpeed's parameter-gathering hooks break the "
                           "compiled graph at every module (tens of graphs per stage), so expect little gain")

    def _build(self, model: GPT, realized: bool, stage: Stage) -> None:
        """Record what the plain model is (structure, counts, FLOPs), then wrap it in an engine whose
        optimizer groups mark the parameters that are new in `stage` (a function of the plan, so a
        resumed engine has the same groups as the saved one)."""
        self.structure = ckpt.describe_structure(model, realized)
        self.params = model.param_counts()
        self.flops_per_token = model.training_flops_per_token().training
        self.new_params = new_parameter_names(self.cfg, self.plan, stage, carries_optimizer_state(self.cfg))
        self.engine = build_engine(model, self.cfg, self.device, self.new_params)
        self.opt_bytes: int | None = None
        self.graphs_before_stage = compiled_graph_count()

    def _enter_stage(self, stage: Stage) -> None:
        """Rebuild for the next stage: gather full weights, drop the engine, mutate a fresh model."""
        # Adam's moments of the parameters that survive the boundary carry over (no re-warm-up, no
        # loss spike at the realize); see engine.carries_optimizer_state for where they cannot.
        moments = optimizer_moments(self.engine) if carries_optimizer_state(self.cfg) else {}
        state = full_state_dict(self.engine)
        destroy_engine(self.engine)
        self.engine = None
        model = ckpt.build_model(self.cfg, self.structure)
        model.load_state_dict(state)
        del state
        apply_stage(model, stage, self.cfg.seed)
        self._build(model, realized=stage.realize, stage=stage)
        carried = load_optimizer_moments(self.engine, moments, set(moments) - self.new_params)
        del moments
        self.stage_index = stage.index
        self._log_stage("stage_start", stage, carried_optimizer_state=carried,
                        new_parameters=len(self.new_params))
        if stage.realize:
            # Realizing makes compressed attention exact: the function changes, so measure it again.
            record = self._evaluate("realized", stage)
            if self.report is not None:
                self.report(record, None)

    # ------------------------------------------------------------ steps

    def _stop_requested(self) -> bool:
        return self.signalled or (self.stop_event is not None and self.stop_event.is_set())

    def _sync_due(self, number: int, stage: Stage) -> bool:
        """Whether step `number` brings the loss to the host: every train.log_interval steps, and at
        every step an evaluation, a checkpoint or a stage boundary follows, so no step with a
        non-finite loss is ever evaluated or saved, and a run resumed from any checkpoint logs the
        same windows of steps as the uninterrupted run."""
        t = self.cfg.train
        return (number % t.log_interval == 0 or number == stage.end_step or number % t.eval_interval == 0
                or bool(t.checkpoint_interval and number % t.checkpoint_interval == 0))

    def _train_step(self, stage: Stage) -> bool:
        """One optimizer step; returns whether any rank was asked to stop (known at syncs only).

        Between syncs the loss stays on the device (summed into self.loss_sum): reading it every
        micro-step would make the host wait for the GPU each time."""
        cfg, engine = self.cfg, self.engine
        number = self.step + 1
        sync = self._sync_due(number, stage)
        lr = learning_rate(cfg, self.plan, number)
        set_learning_rate(engine, lr, new_parameter_warmup(cfg, self.plan, number))
        engine.train()
        if self.window_started is None:
            self.window_started = time.perf_counter()
        stop, mean_loss = False, math.nan
        for micro in range(cfg.train.grad_accum_steps):
            x, y = train_batch(self.cache.train, seed=cfg.seed, step=self.step, rank=self.rank,
                               world_size=self.world_size, batch_size=cfg.train.micro_batch_size,
                               block_size=cfg.model.block_size, micro_step=micro)
            _, loss = engine(x.to(self.device), y.to(self.device))
            if cfg.debug.nan_at_step == number:
                loss = loss * float("nan")
            self.loss_sum += loss.detach().double()
            self.window_micro_steps += 1
            if sync and micro == cfg.train.grad_accum_steps - 1:
                # One all-reduce gives every rank the window's mean loss (to check and log) and any
                # stop request; before the last backward, so this step is not applied if it diverged.
                shared = torch.stack([self.loss_sum, torch.tensor(float(self._stop_requested()),
                                                                  dtype=torch.float64, device=self.device)])
                dist.all_reduce(shared)
                mean_loss = shared[0].item() / (self.world_size * self.window_micro_steps)
                if not math.isfinite(mean_loss):
                    first = number - self.window_steps
                    steps = f"step {number}" if first == number else f"steps {first}..{number}"
                    raise NonFiniteLossError(
                        f"non-finite training loss ({mean_loss}) in {steps}, stage {stage.index} "
                        f"({stage.name}); step {number} was not applied and nothing since the last "
                        f"checkpoint was saved; the last good checkpoint is "
                        f"{self.last_checkpoint or 'none (no checkpoint yet)'}")
                stop = shared[1].item() > 0
            engine.backward(loss)
            engine.step()
        if cfg.debug.step_delay_s:
            time.sleep(cfg.debug.step_delay_s)
        self.step = number
        self.window_steps += 1
        self.tokens += self.tokens_per_step
        self.flops += self.flops_per_token * self.tokens_per_step
        if self.opt_bytes is None:  # optimizer state exists once the stage's first step ran
            self.opt_bytes = optimizer_state_bytes(engine)
        if sync:
            self._log_window(stage, lr, mean_loss)
        return stop

    def _log_window(self, stage: Stage, lr: float, loss: float) -> None:
        """The train record of the steps since the last sync (their mean loss; this step's LR and
        gradient norm), then a fresh window."""
        window_time = time.perf_counter() - self.window_started
        grad_norm = self.engine.get_global_grad_norm()
        self.log.log("train", self.step, stage.index, loss=loss, lr=lr, tokens=self.tokens, flops=self.flops,
                     steps_averaged=self.window_steps,
                     tokens_per_s=self.tokens_per_step * self.window_steps / window_time,
                     step_time=window_time / self.window_steps,
                     peak_memory_bytes=peak_memory_bytes(), params_total=self.params["total"],
                     params_trainable=self.params["trainable"],
                     grad_norm=None if grad_norm is None else float(grad_norm),
                     optimizer_state_bytes=self.opt_bytes)
        self.log.progress(self.step, loss=f"{loss:.4f}", stage=stage.index,
                          val=f"{self.val_loss:.4f}" if self.val_loss is not None else "-")
        self.loss_sum.zero_()
        self.window_micro_steps = self.window_steps = 0
        self.window_started = None

    @torch.no_grad()
    def _evaluate(self, when: str, stage: Stage) -> dict:
        """Mean loss over the fixed validation set. Every rank runs the same number of forward passes
        (ZeRO-3 gathers parameters collectively); padding passes carry weight 0."""
        engine = self.engine
        engine.eval()
        count = torch.tensor([len(self.val_batches)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(int(count.item())):
            if i < len(self.val_batches):
                (x, y), weight = self.val_batches[i], self.val_batches[i][0].size(0)
            else:
                (x, y), weight = train_batch(self.cache.train, seed=0, step=0, rank=0, world_size=1,
                                             batch_size=1, block_size=self.cfg.model.block_size), 0
            _, loss = engine(x.to(self.device), y.to(self.device))
            totals += torch.tensor([loss.item() * weight, weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        engine.train()
        self.val_loss = (totals[0] / totals[1]).item()
        # Compressed attention's per-layer slot diagnostics from the last eval forward (this rank's).
        diagnostics = self.engine.module.attention_diagnostics()
        record = self.log.log("eval", self.step, stage.index, when=when, val_loss=self.val_loss,
                              tokens=self.tokens, flops=self.flops, **diagnostics)
        self.log.write(f"step {self.step} stage {stage.index} ({stage.name}) {when}: val_loss {self.val_loss:.4f}")
        return record

    def _log_stage(self, event: str, stage: Stage, **extra) -> dict:
        digests = block_digests(self.engine)
        if not same_on_every_rank(digests):
            raise RuntimeError(f"{event} of stage {stage.index}: model weights differ between ranks")
        if event == "stage_end":  # the optimizer state exists once the stage has stepped
            per_rank = [None] * self.world_size
            dist.all_gather_object(per_rank, self.opt_bytes)
            extra["optimizer_state_bytes_per_rank"] = per_rank
            extra["compiled_graphs"] = compiled_graph_count() - self.graphs_before_stage
        return self.log.log(event, self.step, stage.index, name=stage.name, structure=self.structure,
                            params_total=self.params["total"], params_trainable=self.params["trainable"],
                            flops_per_token=self.flops_per_token, block_digests=digests,
                            weights_identical_across_ranks=True, **extra)

    def _save(self, stage: Stage) -> Path:
        meta = {"step": self.step, "stage": stage.index, "stage_complete": self.step == stage.end_step,
                "structure": self.structure, "tokens": self.tokens, "flops": self.flops,
                "val_loss": self.val_loss, "zero_stage": self.cfg.deepspeed.zero_stage,
                "config": self.cfg.to_yaml_dict()}  # resume refuses another config, config.yaml or not
        self.last_checkpoint = ckpt.save_checkpoint(self.engine, self.run_dir, meta,
                                                    keep=self.cfg.train.keep_checkpoints)
        return self.last_checkpoint

    # ------------------------------------------------------------ the loop

    def train(self) -> bool:
        """Walk the plan from the current step; False when stopped early (after a checkpoint)."""
        cfg = self.cfg
        for stage in self.plan:
            if self.step >= stage.end_step:
                continue
            if stage.index != self.stage_index:
                self._enter_stage(stage)
            while self.step < stage.end_step:
                stop = self._train_step(stage)
                stage_end = self.step == stage.end_step
                record = None
                if stage_end or self.step % cfg.train.eval_interval == 0:
                    record = self._evaluate("stage_end" if stage_end else "interval", stage)
                if stage_end:
                    self._log_stage("stage_end", stage)
                saved = None
                interval = cfg.train.checkpoint_interval
                if stage_end or stop or (interval and self.step % interval == 0):
                    saved = self._save(stage)
                if record is not None and self.report is not None:
                    self.report(record, str(saved) if saved else None)
                if cfg.debug.kill_at_step == self.step and cfg.debug.kill_rank == self.rank:
                    self.log.close()
                    os.kill(os.getpid(), signal.SIGKILL)
                if stop:
                    self.log.log("stopped", self.step, stage.index, checkpoint=str(saved))
                    self.log.write(f"stopped at step {self.step}; checkpoint {saved}")
                    return False
        return True

    def export(self) -> Path:
        """Write the realized dense model to RUN_DIR/final (rank 0) and return its path."""
        from distributed.export import save_final

        state = full_state_dict(self.engine)
        final = self.run_dir / "final"
        if self.rank == 0:
            model = ckpt.build_model(self.cfg, self.structure)
            model.load_state_dict(state)
            model.realize()  # a no-op after the full-rank finish
            encoding = get_encoding(self.cfg.data.tokenizer)
            save_final(model, final, encoding_name=self.cfg.data.tokenizer, encoding=encoding,
                       extra_meta={"run": self.cfg.name, "steps": self.step, "tokens": self.tokens,
                                   "training_flops": self.flops, "val_loss": self.val_loss,
                                   "realized_by_finish": bool(self.structure["realized"])})
        dist.barrier()
        return final

    def close(self) -> None:
        if self.engine is not None:
            destroy_engine(self.engine)
            self.engine = None
        if hasattr(self, "log"):
            self.log.close()


def run(cfg: ExperimentConfig, run_dir: str | Path | None = None, resume: bool | str = "auto",
        report: ReportFn | None = None, stop_event: threading.Event | None = None) -> RunResult:
    """Train `cfg` in `run_dir` (default cfg.out_dir) as one rank of the current process group.

    resume: "auto" continues from the run directory's latest complete checkpoint if there is one;
    True requires one; False requires that there is none (never trains over an existing run).
    report(metrics, checkpoint_dir): called on EVERY rank, with identical metrics (the eval record),
    after each evaluation (interval, stage end, right after realizing); checkpoint_dir is the
    checkpoint written at that step or None. Ray Train's `train.report` fits (it wants all ranks).
    stop_event: set it (or send SIGTERM) to stop after the current step with a checkpoint.
    The process group is created when none exists and left initialised on return."""
    preflight(cfg, Path(run_dir or cfg.out_dir), resume)  # before the process group and any file
    trainer = Trainer(cfg, Path(run_dir or cfg.out_dir), report, stop_event)
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_sigterm(signum, frame):
            trainer.signalled = True
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        trainer.prepare(resume)
        finished = trainer.train()
        final = trainer.export() if finished else None
        if finished:
            trainer.log.write(f"done: metrics {trainer.log.path}, checkpoints "
                              f"{ckpt.checkpoint_root(trainer.run_dir)}, final model {final}")
        return RunResult(trainer.run_dir, trainer.step, finished, not finished, trainer.val_loss, final)
    finally:
        trainer.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/experiments/tiny.yaml")
    parser.add_argument("--run-dir", default=None, help="run directory (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint to resume from (default: resume when one exists)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment is used")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 deepspeed.zero_stage=3")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg, run_dir=args.run_dir, resume=True if args.resume else "auto")
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if result.preempted:
        print(f"stopped early at step {result.step}; resume with the same command", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
