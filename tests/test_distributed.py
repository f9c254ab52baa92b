"""Two processes (gloo, CPU): FDS statistics and LDS counts of the whole training set on
every rank, equal to the single-process result, also inside DistributedDataParallel; BMC's
prior gathered from both ranks; deep copies that share their process group; an FDS that FSDP
materialises from the meta device."""

import copy
import datetime
import gc
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dirfast

WORLD = 2
N, D, BUCKETS = 240, 6, 20

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _data():
    g = torch.Generator().manual_seed(80)
    x = torch.randn(N, D, generator=g) * 3 + 20
    y = torch.randint(0, BUCKETS, (N,), generator=g).float()
    return x, y


BMC_SPLIT = 37  # rank 0 holds 37 rows of the BMC batch, rank 1 the other 63


def _bmc_data():
    g = torch.Generator().manual_seed(81)
    target = torch.rand(100, 2, generator=g) * 10
    return target + torch.randn(100, 2, generator=g), target


def _single_process():
    """Reference results, computed in this process on all the data."""
    x, y = _data()
    whole = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)
    whole.update_running_stats(x, y, 0)
    lds = dirfast.LDS(dirfast.Binning.integer(BUCKETS), reweight="inverse", inverse_clip=None).fit(y)
    return {"running_mean": whole.running_mean, "running_var": whole.running_var,
            "num_samples_tracked": whole.num_samples_tracked, "lds_counts": lds.empirical}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(D, D)
        self.fds = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)

    def forward(self, x, y):
        features = self.encoder(x)
        self.fds.accumulate(features, y)
        return features.sum()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        shard = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        result = {}
        # 1. one call on each rank's shard
        fds = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)
        fds.update_running_stats(x[shard], y[shard], 0)
        result.update(running_mean=fds.running_mean, running_var=fds.running_var,
                      num_samples_tracked=fds.num_samples_tracked)
        # 2. streaming, in batches
        streamed = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)
        xs, ys = x[shard], y[shard]
        for start in range(0, xs.shape[0], 50):
            streamed.accumulate(xs[start:start + 50], ys[start:start + 50])
        streamed.update_running_stats(epoch=0)
        result.update(streamed_mean=streamed.running_mean, streamed_var=streamed.running_var)
        # 3. sync=False keeps the shard's own statistics
        local = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2, sync=False)
        local.update_running_stats(xs, ys, 0)
        result.update(local_tracked=local.num_samples_tracked)
        # 4. LDS counts
        lds = dirfast.LDS(dirfast.Binning.integer(BUCKETS), reweight="inverse", inverse_clip=None).fit(ys)
        result.update(lds_counts=lds.empirical)
        # 5. inside DDP (which broadcasts buffers from rank 0 at every forward)
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(_Model())
        for start in range(0, xs.shape[0], 40):
            model(xs[start:start + 40], ys[start:start + 40]).backward()
        model.module.fds.update_running_stats(epoch=0)
        with torch.no_grad():
            features = model.module.encoder(x)
        result.update(ddp_mean=model.module.fds.running_mean, ddp_var=model.module.fds.running_var,
                      ddp_features=features)
        # 6. BMC with the targets of every rank as its prior (shards of unequal sizes)
        pred, target = _bmc_data()
        rows = slice(0, BMC_SPLIT) if rank == 0 else slice(BMC_SPLIT, None)
        local_pred = pred[rows].clone().requires_grad_()
        noise_var = torch.tensor(0.7, requires_grad=True)
        loss = dirfast.losses.bmc_loss(local_pred, target[rows], noise_var, all_ranks=True)
        loss.backward()
        alone = dirfast.losses.bmc_loss(pred[rows], target[rows], 0.7)  # all_ranks off: the local prior
        result.update(bmc_loss=loss.detach(), bmc_grad=local_pred.grad, bmc_noise_grad=noise_var.grad, bmc_alone=alone)
        # 7. groups given: the world's, a new group of both ranks, and one of rank 0 alone (new_group
        # gives rank 1 GroupMember.NON_GROUP_MEMBER: its calls stay local, as torch's collectives do)
        pair, solo = dist.new_group([0, 1]), dist.new_group([0])  # every rank calls new_group
        for key, group in (("world", dist.group.WORLD), ("pair", pair), ("solo", solo)):
            grouped = dirfast.LDS(dirfast.Binning.integer(BUCKETS), reweight="inverse", inverse_clip=None,
                                  process_group=group)
            result[f"lds_counts_{key}"] = grouped.fit(ys).empirical
        paired = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2, process_group=pair)
        paired.update_running_stats(xs, ys, 0)
        result.update(pair_mean=paired.running_mean, pair_var=paired.running_var)
        # 8. a deep copy (an EMA or AveragedModel of the model) shares the group; the copy's FDS syncs
        losses = dirfast.losses
        holders = [paired, grouped, losses.BMCLoss(process_group=pair), losses.RnCLoss(process_group=pair),
                   losses.ConRLoss(process_group=pair), losses.RankSimLoss(process_group=pair)]
        copies = [copy.deepcopy(holder) for holder in holders]
        result["copies_share_the_group"] = [c.process_group is h.process_group for c, h in zip(copies, holders)]
        averaged = torch.optim.swa_utils.AveragedModel(torch.nn.ModuleDict({"fds": paired}))
        averaged.module["fds"].update_running_stats(xs, ys, 1)
        result.update(copy_mean=averaged.module["fds"].running_mean, original_mean=paired.running_mean.clone())
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        del model  # DDP sits in a reference cycle: collect it while its process group lives
        gc.collect()  # (collected at interpreter exit, it aborts the worker now and then)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
    expected = _single_process()
    for got in ranks:
        for name in ("running_mean", "running_var", "num_samples_tracked"):
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got["streamed_mean"], expected["running_mean"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["streamed_var"], expected["running_var"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["lds_counts"], expected["lds_counts"], rtol=0, atol=0)
        for key in ("world", "pair"):
            torch.testing.assert_close(got[f"lds_counts_{key}"], expected["lds_counts"], rtol=0, atol=0)
        torch.testing.assert_close(got["pair_mean"], expected["running_mean"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pair_var"], expected["running_var"], rtol=1e-5, atol=1e-5)
        assert all(got["copies_share_the_group"]), got["copies_share_the_group"]  # deepcopy raised before
        torch.testing.assert_close(got["copy_mean"], expected["running_mean"], rtol=1e-5, atol=1e-5)  # synced
        torch.testing.assert_close(got["original_mean"], got["pair_mean"], rtol=0, atol=0)
        # DDP: the statistics of the encoder's features of all the data, on every rank
        whole = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)
        whole.update_running_stats(got["ddp_features"], _data()[1], 0)
        torch.testing.assert_close(got["ddp_mean"], whole.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["ddp_var"], whole.running_var, rtol=1e-4, atol=1e-5)
    # BMC over the ranks: each rank's rows against all 100 targets (labels offset by the rank's first row)
    pred, target = _bmc_data()
    for rank, rows in ((0, slice(0, BMC_SPLIT)), (1, slice(BMC_SPLIT, None))):
        local_pred = pred[rows].clone().requires_grad_()
        noise_var = torch.tensor(0.7, requires_grad=True)
        logits = -0.5 * (local_pred.unsqueeze(1) - target.unsqueeze(0)).pow(2).sum(-1) / noise_var
        labels = torch.arange(rows.indices(100)[0], rows.indices(100)[1])
        expected_loss = torch.nn.functional.cross_entropy(logits, labels) * (2 * noise_var).detach()
        expected_loss.backward()
        torch.testing.assert_close(ranks[rank]["bmc_loss"], expected_loss.detach())
        torch.testing.assert_close(ranks[rank]["bmc_grad"], local_pred.grad)
        torch.testing.assert_close(ranks[rank]["bmc_noise_grad"], noise_var.grad)
        assert not torch.allclose(ranks[rank]["bmc_alone"], expected_loss.detach())  # the gather changed the prior
    # ranks agree bit for bit, and sync=False really kept each rank's own shard
    for name in ("running_mean", "running_var", "streamed_mean", "ddp_mean"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert float(ranks[0]["local_tracked"].sum()) == N // WORLD
    for rank in range(WORLD):  # a group of rank 0 alone: each rank's counts are its own shard's
        assert float(ranks[rank]["lds_counts_solo"].sum()) == N // WORLD


def _refusal(call):
    """The message of the ValueError ``call()`` raises, or None."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None


def _refusing_worker(rank, init_file, out_dir):
    """Rank 1's data holds a NaN label; rank 0's is fine."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting fails the test, not CI
    try:
        x, y = _data()
        y = y[:60].clone()
        if rank == 1:
            y[7] = float("nan")
        result = {}
        fds = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)
        before = {key: value.clone() for key, value in fds.state_dict().items()}
        lds = dirfast.LDS(dirfast.Binning.integer(BUCKETS))
        result["fds"] = _refusal(lambda: fds.update_running_stats(x[:60], y, 0))
        result["lds"] = _refusal(lambda: lds.fit(y))
        result["fds_unchanged"] = all(torch.equal(value, before[key]) for key, value in fds.state_dict().items())
        result["lds_unfitted"] = lds._fit is None
        behind = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)  # rank 1's resumed at epoch 2: 1 is ignored there
        if rank == 1:
            behind.epoch.fill_(2)
        before = {key: value.clone() for key, value in behind.state_dict().items()}
        clean = _data()[1][:60]
        result["ignored_streamed"] = _refusal(lambda: behind.update_running_stats(epoch=1))
        result["ignored_batch"] = _refusal(lambda: behind.update_running_stats(x[:60], clean, 1))
        result["behind_unchanged"] = all(torch.equal(v, before[k]) for k, v in behind.state_dict().items())
        try:  # rank 1 alone passes an epoch of the wrong type
            fds.update_running_stats(epoch="1" if rank == 1 else 1)
        except (TypeError, ValueError) as exc:
            result["bad_epoch"] = f"{type(exc).__name__}: {exc}"
        # Warnings as errors (python -W error, pytest's filterwarnings): rank 1 alone has fractional
        # labels for an integer binning, whose warning is then an exception of its own type, not a
        # ValueError
        fractional = clean + (0.5 if rank == 1 else 0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for name, call in (("fds_warning", lambda: fds.update_running_stats(x[:60], fractional, 0)),
                               ("lds_warning", lambda: lds.fit(fractional))):
                try:
                    call()
                except (UserWarning, ValueError) as exc:
                    result[name] = f"{type(exc).__name__}: {exc}"
        torch.save(result, os.path.join(out_dir, f"refused{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_refused_on_one_rank_raises_on_every_rank():
    """A NaN label on one rank: FDS.update_running_stats and LDS.fit raise there with their
    usual message, and on the other rank a ValueError saying so -- before, that rank waited in
    the next collective until the process group timed out -- and neither changes anything. An
    epoch that one rank's FDS ignores (it is ahead), and an epoch of the wrong type on one rank,
    raise on every rank too."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_refusing_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"refused{r}.pt")) for r in range(WORLD)]
    for name in ("fds", "lds"):
        assert "another rank's data was refused" in ranks[0][name], ranks[0][name]
        assert "NaN" in ranks[1][name], ranks[1][name]
    for got in ranks:
        assert got["fds_unchanged"] and got["lds_unfitted"] and got["behind_unchanged"]
        for name in ("ignored_streamed", "ignored_batch"):  # before: the ranks that did not ignore it waited
            assert "update_running_stats(epoch=1) is ignored" in got[name] and "on 1 of 2 ranks" in got[name], got[name]
    assert ranks[1]["bad_epoch"].startswith("TypeError") and "epoch" in ranks[1]["bad_epoch"], ranks[1]["bad_epoch"]
    assert "another rank's data was refused" in ranks[0]["bad_epoch"], ranks[0]["bad_epoch"]  # it had waited
    for name in ("fds_warning", "lds_warning"):  # before: rank 1 raised past the vote, rank 0 waited in it
        assert ranks[1][name].startswith("UserWarning") and "fractional" in ranks[1][name], ranks[1][name]
        assert "another rank's data was refused" in ranks[0][name], ranks[0][name]


def _fsdp_worker(rank, init_file, out_dir):
    """A model built on the meta device, materialised by FullyShardedDataParallel."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        with torch.device("meta"):
            model = _Model()
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
        fds = wrapped.module.fds
        torch.save({**fds.state_dict(), "kernel_window": fds.kernel_window}, os.path.join(out_dir, f"fsdp{rank}.pt"))
        del wrapped, model
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_materialises_an_fds_from_the_meta_device():
    """FSDP calls reset_parameters() on each module it materialises from the meta device (before
    FDS had one, the wrap raised AttributeError): every rank's FDS is a new one."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_fsdp_worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"fsdp{r}.pt")) for r in range(WORLD)]
    fresh = dirfast.FDS(D, bucket_num=BUCKETS, bucket_start=2)
    expected = {**fresh.state_dict(), "kernel_window": fresh.kernel_window}
    for got in ranks:
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(got[name], value), name


def test_votes_under_nccl_go_to_the_data_device(monkeypatch):
    """The one-number votes before FDS and LDS collectives: under NCCL on the CUDA device of the
    data they guard (a rank that never called torch.cuda.set_device votes on its own GPU, not on
    cuda:0 with every other rank), else the current CUDA device; under gloo on the CPU. (No GPU
    here: the backend and the current device are stood in for.)"""
    from dirfast.distributed import _vote_device

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert _vote_device(None, torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert _vote_device(None, torch.device("cpu")) == torch.device("cuda", 0)
    assert _vote_device(None, None) == torch.device("cuda", 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _vote_device(None, torch.device("cuda", 3)) == torch.device("cpu")
