"""Multi-process training: batches dealt to processes, and 2 CPU processes (gloo, under torchrun) that
train the model one process trains on the same global batches, with fixed weights and with a gradient
method, build the feature cache once between them, leave the writing to rank 0, and resume when killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dualhead.core import distributed
from dualhead.core.config import load_config, save_config
from dualhead.core.distributed import ShardableBatchSampler, split_rounds
from dualhead.core.runtime import seed_everything
from dualhead.core.trainer import Trainer, build_experiment
from dualhead.dense.sampler import ShuffledBatchSampler
from dualhead.mtl.balancers import AGGREGATORS
from dualhead.mtl.balancers import BALANCERS as REGISTERED
from dualhead.mtl.balancers.jacobian import accumulate_combination
from dualhead.vqa.config import DataConfig
from dualhead.vqa.data import load_splits
from dualhead.vqa.data.batching import GroupedBatchSampler
from tests.conftest import tiny_run_config

PROCESSES = 2
BALANCERS = ("fixed", "pcgrad")
KILLED_AT_STEP = 4  # rank 1 dies as this step starts: mid-epoch (3 steps per epoch), after a checkpoint


# -- batches -------------------------------------------------------------------------------------------


def test_rounds_deal_whole_batches_and_pool_an_incomplete_last_round():
    batches = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13, 14]]
    assert split_rounds(batches, 1) == [[batch] for batch in batches]
    # 3 leftover samples are too few for 2 shares of 2: they join the round before, one per process
    assert split_rounds(batches, 2) == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 12, 14], [8, 9, 10, 11, 13]]]
    # 7 leftover samples (2 batches) are cut into 3 contiguous shares
    assert split_rounds(batches, 3) == [[[0, 1, 2], [3, 4, 5], [6, 7]], [[8, 9, 10], [11, 12], [13, 14]]]
    for world in (1, 2, 3, 4, 5):
        dealt = split_rounds(batches, world)
        assert all(len(round_) == world and all(round_) for round_ in dealt), "every process has samples"
        assert sorted(i for round_ in dealt for share in round_ for i in share) == list(range(15))
    with pytest.raises(ValueError, match="3 samples, fewer than the 4 processes"):
        split_rounds([[0, 1], [2]], 4)


@pytest.mark.parametrize("kind", ["grouped", "shuffled"])
def test_sharded_samplers_give_disjoint_shares_of_the_same_steps_and_skip_steps_on_resume(kind, shapes_root):
    def make() -> ShardableBatchSampler:
        if kind == "grouped":
            records = load_splits(DataConfig(format="jsonl", root=str(shapes_root))).train
            return GroupedBatchSampler(records, batch_size=16, questions_per_image=4, seed=5)
        return ShuffledBatchSampler(23, 4, seed=5)

    single = make()
    shards = [make() for _ in range(PROCESSES)]
    for rank, sampler in enumerate(shards):
        sampler.shard(rank, PROCESSES)
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for sampler in shards:
            sampler.set_epoch(epoch)
        steps = list(zip(*shards, strict=True))  # each process iterates the same number of steps
        assert len(steps) == shards[0].epoch_length == len(shards[1]) < single.epoch_length
        assert [a + b for a, b in steps] == shards[0].global_batches()
        assert all(not set(a) & set(b) for a, b in steps), "the processes' shares are disjoint"
        assert sorted(i for a, b in steps for i in a + b) == sorted(i for batch in single for i in batch)
        assert list(single) == single.epoch_batches(epoch), "one process: the batches as they were"
        for sampler in shards:
            sampler.set_epoch(epoch, skip=2)
        assert list(zip(*shards, strict=True)) == steps[2:]
    with pytest.raises(ValueError, match="rank must be in"):
        single.shard(2, 2)


# -- helpers without a process group are no-ops --------------------------------------------------------


def test_one_process_needs_no_process_group():
    assert distributed.setup("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized() and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    tensor = torch.ones(3)
    distributed.all_reduce_([tensor])
    assert torch.equal(tensor, torch.ones(3)) and distributed.broadcast_object({"a": 1}) == {"a": 1}
    param = torch.nn.Parameter(torch.zeros(2))
    accumulate_combination([param], [[torch.ones(2)], [torch.full((2,), 3.0)]], torch.tensor([0.5, 0.5]))
    assert torch.equal(param.grad, torch.full((2,), 2.0)), "one process adds the whole update"


# -- every balancer under two processes ------------------------------------------------------------------

BALANCER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from dualhead.core import distributed
    from dualhead.mtl.balancers import AGGREGATORS, BALANCERS, build_balancer

    torch.set_num_threads(1)
    distributed.setup("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    rows = [range(12)] if world == 1 else [range(0, 5), range(5, 12)]  # rank 0: 5 rows, rank 1: 7
    mine = list(rows[rank])
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(12, 6, generator=generator), torch.randn(2, 12, generator=generator)
    labelled = torch.zeros(3, 2, 12, dtype=torch.bool)  # [step, task, row]
    labelled[0, 0, [0, 1, 2, 3, 8, 9, 10, 11]] = labelled[0, 1, 2:10] = True  # both tasks, uneven counts
    labelled[1, 0, 4:12] = labelled[1, 1, 0:4] = True  # "b" on rank 0's rows only
    labelled[2, 0, :] = True  # "b" nowhere
    cases = [(name, {}) for name in sorted(BALANCERS)]
    cases += [(name, {"mode": "representation"}) for name in [*AGGREGATORS, "gradnorm"]]
    results = {}
    for name, options in cases:
        torch.manual_seed(0)
        shared = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())
        heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)})
        balancer = build_balancer(name, ["a", "b"], **options)
        params = [*shared.parameters(), *heads.parameters()]
        for step in range(3):
            features = shared(inputs[mine])
            predictions = {task: head(features).squeeze(-1) for task, head in heads.items()}
            means, counts = {}, {}
            for index, task in enumerate(heads):
                mask = labelled[step, index, mine]
                counts[task] = int(mask.sum())
                error = (predictions[task] - targets[index, mine]) ** 2
                means[task] = error[mask].mean() if counts[task] else None
            means["aux"], counts["aux"] = 0.1 * predictions["a"].pow(2).mean(), len(mine)
            if distributed.is_distributed():
                anchors = {**predictions, "aux": features}
                means = distributed.global_mean_shares(means, counts, anchors)
            extra = means.pop("aux")
            losses = {task: loss for task, loss in means.items() if loss is not None}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(100 + step)  # randomised methods draw the same in both runs
                balancer.backward(losses, shared_params=list(shared.parameters()), shared_features=features,
                                  extra_loss=extra, step=step)
            distributed.all_reduce_gradients(params)
            with torch.no_grad():
                for param in [*params, *balancer.parameters()]:
                    if param.grad is not None:
                        param -= 0.1 * param.grad
                        param.grad = None
        key = name + "/" + options.get("mode", "parameters")
        results[key] = {**{f"model.{k}": v for k, v in [*shared.state_dict().items(), *heads.state_dict().items()]},
                        **{f"balancer.{k}": v for k, v in balancer.state_dict().items()}}
    if distributed.is_main():
        torch.save(results, sys.argv[1])
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_every_balancer_gives_two_processes_the_update_of_one_over_the_union_of_their_samples(tmp_path):
    """Partial labels with uneven counts (and a task one process lacks) on a tiny shared model: after
    3 steps, every balancer's model and state under 2 processes equal one process's on all 12 rows."""
    script = tmp_path / "balancers.py"
    script.write_text(BALANCER_SCRIPT)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 0, one.stderr[-4000:]
    two = _torchrun(str(script), str(tmp_path / "two.pt"), timeout=180)
    assert two.returncode == 0, two.stderr[-4000:]
    expected, actual = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert actual.keys() == expected.keys() and len(expected) == len(REGISTERED) + len(AGGREGATORS) + 1
    for case, tensors in expected.items():
        for key, value in tensors.items():
            if value.is_floating_point():
                torch.testing.assert_close(actual[case][key], value, rtol=1e-4, atol=1e-6, equal_nan=True,
                                           msg=f"{case}: {key}")
            else:
                assert torch.equal(actual[case][key], value), f"{case}: {key}"


EXITING_SCRIPT = textwrap.dedent(
    """
    import torch
    from dualhead.core import distributed

    distributed.setup("cpu")
    tensor = torch.ones(1000)
    for _ in range(50):
        torch.distributed.all_reduce(tensor)
    """  # and ends without distributed.shutdown(), as a script looping over Trainer.fit may
)


@pytest.mark.slow
def test_a_process_that_ends_without_leaving_the_group_exits_cleanly(tmp_path):
    """gloo aborts a process that exits inside its group ("terminate called without an active exception",
    6 of 10 runs on this machine without the exit handler `setup` registers)."""
    script = tmp_path / "exits.py"
    script.write_text(EXITING_SCRIPT)
    for _ in range(3):
        result = _torchrun(str(script), timeout=120)
        assert result.returncode == 0, result.stderr[-4000:]


# -- two processes --------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from dualhead.cli import main
    from dualhead.core.config import load_config
    from dualhead.core.trainer import Trainer, new_run_dir
    from dualhead.vqa.features import EncoderFeatureCache

    out, kill_at, configs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ["RANK"])
    encoded = {"images": [], "questions": []}
    build = EncoderFeatureCache.build.__func__

    def counting_build(cls, model, records, store, device, autocast, images, texts, **options):
        records = list(records)
        if images:
            encoded["images"] += sorted({str(r.image) for r in records})
        if texts:
            encoded["questions"] += sorted({r.question for r in records})
        return build(cls, model, records, store, device, autocast, images, texts, **options)

    EncoderFeatureCache.build = classmethod(counting_build)
    train_step = Trainer.train_step

    def dying_step(self, *args, **kwargs):
        if rank == 1 and self.state["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self, *args, **kwargs)

    Trainer.train_step = dying_step
    if len(configs) == 1:  # the command line (which leaves the process group at its end)
        main(["train", configs[0]], standalone_mode=False)
    else:  # several runs in one process group
        for path in configs:
            config = load_config(path)
            Trainer(config, new_run_dir(config)).fit()
    (out / f"rank{rank}.json").write_text(json.dumps(encoded))
    """
)


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; on a timeout, torchrun and the processes it started are killed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _config(shapes_root: Path, out: Path, name: str, balancer: str):
    """Frozen encoders (their features cached), no dropout: the update depends on the batches alone.
    Two questions per image and batch: the processes' shares hold different numbers of each task's
    questions (the last step of an epoch gives one process no yes/no question at all)."""
    config = tiny_run_config(shapes_root, out, epochs=2, balancer=balancer, checkpoint_every_steps=1,
                             diagnostics_every_steps=2, device="cpu")
    config.name = name
    config.data.questions_per_image = 2
    config.model.vision.freeze = config.model.text.freeze = True
    config.model.dropout = config.model.fusion_dropout = 0.0
    return config


class GlobalBatches(ShardableBatchSampler):
    """One process that trains on the global batches of an N-process run (the union of their shares)."""

    def __init__(self, inner: ShardableBatchSampler, world: int):
        self.inner, self.world = inner, world
        super().__init__(inner.seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        rounds = split_rounds(self.inner.epoch_batches(epoch), self.world)
        return [[index for share in round_ for index in share] for round_ in rounds]


def _weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "model.safetensors"))


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def two_process_runs(shapes_root, tmp_path_factory):
    """`dualhead train` under torchrun with 2 processes, once per balancer."""
    out = tmp_path_factory.mktemp("ddp")
    paths = []
    for balancer in BALANCERS:
        config = _config(shapes_root, out, balancer, balancer)
        paths.append(out / f"{balancer}.yaml")
        save_config(config, paths[-1])
    script = out / "worker.py"
    script.write_text(WORKER)
    result = _torchrun(str(script), str(out), "-1", *map(str, paths))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("balancer", BALANCERS)
def test_two_processes_train_what_one_process_trains_on_the_global_batches(balancer, two_process_runs, tmp_path):
    config = load_config(two_process_runs / f"{balancer}.yaml")
    config.output_dir = str(tmp_path)
    seed_everything(config.train.seed)  # as the Trainer does before building the experiment
    experiment = build_experiment(config)
    experiment._sampler = GlobalBatches(experiment.train_sampler, PROCESSES)
    Trainer(config, tmp_path / "one", experiment).fit()

    run = two_process_runs / balancer
    _assert_same_weights(_weights(run), _weights(tmp_path / "one"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row["kind"] == "step"]
    assert [row["step"] for row in steps] == list(range(1, 7)), "rank 0 alone logs, each step once"
    for mine, theirs in zip(steps, (row for row in one if row["kind"] == "step"), strict=True):
        for key in ("loss/binary", "loss/open", "loss/aux"):  # losses of the global batch, not of a share
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
    conflict = [row for row in rows if row["kind"] == "diagnostics"]
    expected = [row for row in one if row["kind"] == "diagnostics"]
    assert conflict and len(conflict) == len(expected)
    assert conflict[0]["cosine/binary~open"] == pytest.approx(expected[0]["cosine/binary~open"], abs=1e-4)
    assert len(list((run / "tensorboard").iterdir())) == 1, "one TensorBoard writer"
    results = json.loads((run / "test_metrics.json").read_text())
    assert results["test"]["accuracy"] == pytest.approx(
        json.loads((tmp_path / "one" / "test_metrics.json").read_text())["test"]["accuracy"], abs=1e-9
    )


@pytest.mark.slow
def test_the_feature_cache_is_encoded_once_between_the_processes(two_process_runs, shapes_root):
    shares = [json.loads((two_process_runs / f"rank{rank}.json").read_text()) for rank in range(PROCESSES)]
    splits = load_splits(DataConfig(format="jsonl", root=str(shapes_root)))
    records = splits.train + splits.val + splits.test
    for kind, distinct in (("images", {str(r.image) for r in records}), ("questions", {r.question for r in records})):
        mine, theirs = (share[kind] for share in shares)
        assert mine and theirs and not set(mine) & set(theirs), f"each process encodes its own {kind}"
        assert Counter(mine + theirs) == dict.fromkeys(distinct, len(BALANCERS)), f"all {kind}, once per run"


@pytest.mark.slow
def test_a_killed_process_then_resume_finishes_the_run_it_would_have_been(two_process_runs, shapes_root, tmp_path):
    config = _config(shapes_root, tmp_path, "killed", "fixed")
    save_config(config, tmp_path / "killed.yaml")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    killed = _torchrun(str(script), str(tmp_path), str(KILLED_AT_STEP), str(tmp_path / "killed.yaml"))
    run = tmp_path / "killed"
    assert killed.returncode != 0
    state = torch.load(run / "last" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == PROCESSES and len(state["rank_rng"]) == PROCESSES
    assert 1 <= state["progress"]["step"] <= KILLED_AT_STEP and not (run / "test_metrics.json").exists()

    resumed = _torchrun("-m", "dualhead", "train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count("run directory:") == 1, "rank 0 alone prints the results"
    _assert_same_weights(_weights(run), _weights(two_process_runs / "fixed"))
    _assert_same_weights(_weights(run, "best"), _weights(two_process_runs / "fixed", "best"))
    with pytest.raises(ValueError, match="trained by 2 process"):
        Trainer.resume(run)  # one process cannot continue a 2-process run: its batches differ
