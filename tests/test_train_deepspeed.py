"""The trainer under the deepspeed launcher: 2 CPU processes (gloo), ZeRO 0-3, growth + freezing +
full-rank finish, exact resume after SIGKILL, zero_to_fp32 on our checkpoints.

Each run is ~12 optimizer steps of a 3-block model; runs are shared between tests (module fixtures)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch_trainer
from distributed import checkpoint as ckpt
from distributed.export import load_final
from distributed.metrics import read_metrics
from wandb_records import read_offline_run

pytestmark = pytest.mark.slow

STAGE_ENDS = [3, 6, 9, 12]   # the tiny plan: 4 stages of 3 steps (see conftest.TINY_TRAINER)
CHECKPOINT_INTERVAL = 4
TRAIN_KEYS = {"step", "stage", "loss", "lr", "tokens", "flops", "tokens_per_s", "step_time",
              "peak_memory_bytes", "params_total", "params_trainable", "grad_norm",
              "optimizer_state_bytes"}


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def reference_runs(tiny_trainer_config, tmp_path_factory):
    """Uninterrupted runs, one per ZeRO stage; ZeRO-1 also logs to wandb (offline) and offloads the
    optimizer to the CPU."""
    runs = {}
    shm_before = _shm_allreduce_buffers()
    for zero in (0, 1, 2, 3):
        run_dir = tmp_path_factory.mktemp(f"zero{zero}") / "run"
        extra = ["wandb.enabled=true", "deepspeed.offload_optimizer=true"] if zero == 1 else []
        result = launch_trainer(tiny_trainer_config, run_dir, f"deepspeed.zero_stage={zero}", *extra)
        runs[zero] = (run_dir, result)
    runs["shm_left_behind"] = _shm_allreduce_buffers() - shm_before
    return runs


def _shm_allreduce_buffers() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_runs_leave_no_shared_memory_behind(reference_runs):
    """DeepSpeed's CPU all-reduce makes a 66 MB /dev/shm buffer per rank and never removes it; the
    trainer unlinks its own once every rank has mapped them (distributed/engine.py)."""
    assert reference_runs["shm_left_behind"] == set()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_every_zero_stage_runs_growth_freezing_and_the_full_rank_finish(reference_runs, zero):
    run_dir, result = reference_runs[zero]
    _ok(result)
    train = read_metrics(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(TRAIN_KEYS <= set(r) and math.isfinite(r["loss"]) for r in train)
    assert train[-1]["tokens"] == 12 * 4 * 2 * 2 * 32  # steps x micro-batch x accum x ranks x T
    assert all(a["flops"] < b["flops"] for a, b in zip(train, train[1:]))
    ends = read_metrics(run_dir, "stage_end")
    assert [r["step"] for r in ends] == STAGE_ENDS
    assert [r["structure"]["n_blocks"] for r in ends] == [1, 2, 3, 3]
    assert [r["structure"]["realized"] for r in ends] == [False, False, False, True]
    assert all(r["weights_identical_across_ranks"] for r in ends)

    # Frozen weights stay bit-identical: block 0 and the embeddings freeze after stage 0 ...
    digests = [r["block_digests"] for r in ends]
    assert digests[0]["0"] == digests[1]["0"] == digests[2]["0"]
    assert digests[0]["emb"] == digests[1]["emb"] == digests[2]["emb"]
    assert digests[1]["1"] == digests[2]["1"]
    # ... while the newest block trains, and the finish trains everything again.
    assert digests[1]["1"] != read_metrics(run_dir, "stage_start")[0]["block_digests"]["1"]
    assert digests[3]["emb"] != digests[2]["emb"]

    # Validation at every stage end, and right after realizing (before it = the stage-2 end).
    evals = read_metrics(run_dir, "eval")
    assert {r["step"] for r in evals if r["when"] == "stage_end"} == set(STAGE_ENDS)
    realized = [r for r in evals if r["when"] == "realized"]
    assert len(realized) == 1 and realized[0]["step"] == 9 and realized[0]["stage"] == 3
    # Compressed attention's slot diagnostics: every block present at the eval, none once realized.
    before = next(r for r in evals if r["step"] == STAGE_ENDS[2] and r["when"] == "stage_end")
    assert {k for k in before if k.startswith("attn/")} == {
        f"attn/{name}/{i}" for name in ("slot_cosine", "slot_mass") for i in range(3)}
    assert all(0 < before[f"attn/slot_mass/{i}"] < 1 for i in range(3))
    assert not any(k.startswith("attn/") for k in realized[0])

    model, meta = load_final(run_dir)
    assert len(model.transformer.h) == 3 and meta["meta"]["steps"] == 12
    assert not any(model.transformer.h[i].approx.approximated for i in range(3))
    assert "Traceback" not in result.stderr


def test_compiled_run_repeats_the_eager_losses_with_one_graph_per_mode(reference_runs, tiny_trainer_config,
                                                                     tmp_path):
    """train.compile=true (inductor, 2 processes, ZeRO-2) over growth, freezing and the finish: the
    same losses as the eager run up to float reassociation, and per stage exactly two graphs (training,
    and evaluation under no_grad): no graph break, no recompilation."""
    run_dir = tmp_path / "run"
    _ok(launch_trainer(tiny_trainer_config, run_dir, "deepspeed.zero_stage=2", "train.compile=true"))
    eager_dir = reference_runs[2][0]
    assert [r["compiled_graphs"] for r in read_metrics(eager_dir, "stage_end")] == [0, 0, 0, 0]
    assert [r["compiled_graphs"] for r in read_metrics(run_dir, "stage_end")] == [2, 2, 2, 2]
    compiled, eager = _losses(run_dir), _losses(eager_dir)
    assert compiled.keys() == eager.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
    evals = {(r["step"], r["when"]): r["val_loss"] for r in read_metrics(run_dir, "eval")}
    eager_evals = {(r["step"], r["when"]): r["val_loss"] for r in read_metrics(eager_dir, "eval")}
    assert evals.keys() == eager_evals.keys()
    assert all(evals[k] == pytest.approx(eager_evals[k], rel=1e-5) for k in evals)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_frozen_parameters_get_no_optimizer_state(reference_runs, zero):
    run_dir, _ = reference_runs[zero]
    ends = read_metrics(run_dir, "stage_end")
    for record in ends:
        per_rank, trainable = record["optimizer_state_bytes_per_rank"], record["params_trainable"]
        assert len(per_rank) == 2
        if zero == 0:  # Adam's two fp32 moments per trainable parameter, on every rank
            assert per_rank == [8 * trainable] * 2
        else:  # moments + fp32 master copy, partitioned over the 2 ranks (+ alignment padding)
            assert 12 * trainable <= sum(per_rank) <= 12 * trainable + 12 * 64
            assert max(per_rank) <= 0.6 * 12 * trainable
    # Freezing block 0 and the embeddings at stage 1 shrinks the state; the finish unfreezes all.
    state = [sum(r["optimizer_state_bytes_per_rank"]) for r in ends]
    assert state[1] < state[0] / 2 and state[3] > state[0]


def test_offloaded_optimizer_trains_like_the_one_on_the_device(reference_runs):
    """ZeRO-1 with deepspeed.offload_optimizer: the same AdamW steps ZeRO's fp32 partitions in CPU
    memory, so the losses are ZeRO-2's (same partitioned math) up to float reassociation."""
    offloaded, on_device = _losses(reference_runs[1][0]), _losses(reference_runs[2][0])
    assert offloaded.keys() == on_device.keys() == set(range(1, 13))
    for step in on_device:
        assert offloaded[step] == pytest.approx(on_device[step], rel=1e-5), step


def test_wandb_offline_run_lands_in_the_run_directory(reference_runs):
    run_dir, result = reference_runs[1]
    _ok(result)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    (run_file,) = offline[0].glob("*.wandb")
    # Rank 0's wandb run holds the run's config and every evaluation the metrics file holds, the one
    # right after the full-rank finish included (it shares its step with the stage-end one).
    run = read_offline_run(run_file)
    assert run["finished"] and run["config"]["deepspeed"]["zero_stage"] == 1
    rows = {h["_step"]: h for h in run["history"]}
    evaluations = read_metrics(run_dir, "eval")
    assert any(r["when"] == "realized" for r in evaluations)
    for r in evaluations:
        key = "eval/val_loss_realized" if r["when"] == "realized" else "eval/val_loss"
        assert rows[r["step"]][key] == r["val_loss"], (r, rows.get(r["step"]))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_to_fp32_consolidates_our_checkpoints(reference_runs, zero):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, _ = reference_runs[zero]
    root = ckpt.checkpoint_root(run_dir)
    assert (root / "latest").read_text() == ckpt.tag_for_step(12)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(root))
    final = load_file(run_dir / "final" / "model.safetensors")
    assert set(final) - set(consolidated) <= {"lm_head.weight"}  # tied to wte
    for key, value in consolidated.items():
        assert torch.equal(value, final[key]), key


@pytest.fixture(scope="module")
def resumed_runs(tiny_trainer_config, tmp_path_factory):
    """For ZeRO-2 and ZeRO-3: killed mid-stage (rank 1 SIGKILLs itself after step 5; the newest
    checkpoint is step 4, one step into stage 1), resumed and killed again right after a stage
    boundary (rank 0, after step 7, the first step of stage 2: the newest checkpoint is the stage-1
    end at step 6), resumed to the end."""
    runs = {}
    for zero in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"resume-zero{zero}") / "run"
        z = f"deepspeed.zero_stage={zero}"
        first = launch_trainer(tiny_trainer_config, run_dir, z, "debug.kill_at_step=5", "debug.kill_rank=1")
        latest_after_first = (ckpt.checkpoint_root(run_dir) / "latest").read_text()
        second = launch_trainer(tiny_trainer_config, run_dir, z, "debug.kill_at_step=7", "debug.kill_rank=0")
        latest_after_second = (ckpt.checkpoint_root(run_dir) / "latest").read_text()
        third = launch_trainer(tiny_trainer_config, run_dir, z)
        runs[zero] = (run_dir, [first, second, third], [latest_after_first, latest_after_second])
    return runs


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_after_sigkill_repeats_the_uninterrupted_losses(reference_runs, resumed_runs, zero):
    run_dir, (first, second, third), latest = resumed_runs[zero]
    assert first.returncode != 0 and second.returncode != 0
    _ok(third)
    assert latest == [ckpt.tag_for_step(4), ckpt.tag_for_step(6)]
    records = read_metrics(run_dir, "train")
    # Steps 5-6 were recomputed by the first resume, steps 7-12 by the second.
    assert [r["attempt"] for r in records] == [0] * 4 + [1] * 2 + [2] * 6
    starts = read_metrics(run_dir, "run_start")
    assert [r["resumed_from"] for r in starts] == [None, ckpt.tag_for_step(4), ckpt.tag_for_step(6)]
    reference = _losses(reference_runs[zero][0])
    resumed = _losses(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])
    final = load_file(run_dir / "final" / "model.safetensors")
    expected = load_file(reference_runs[zero][0] / "final" / "model.safetensors")
    assert all(torch.allclose(final[k], expected[k], atol=1e-6, rtol=0) for k in expected)


@pytest.mark.parametrize("zero", [2, 3])
def test_checkpoints_keep_the_newest_complete_tags(resumed_runs, zero):
    run_dir, _, _ = resumed_runs[zero]
    root = ckpt.checkpoint_root(run_dir)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert tags == [ckpt.tag_for_step(9), ckpt.tag_for_step(12)]  # keep_checkpoints = 2
    meta = json.loads((root / ckpt.tag_for_step(12) / ckpt.META_FILE).read_text())
    assert meta["step"] == 12 and meta["stage"] == 3 and meta["stage_complete"]
    assert meta["structure"]["realized"] and meta["world_size"] == 2
    assert sorted(p.name for p in (root / ckpt.tag_for_step(12)).glob("rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
