"""FDS and LDS inside training code: torch.compile, depth maps (the NYUD2-DIR setting)."""

import pytest
import torch

import dirfast
from benchmarks.published import PublishedFDS
from testing import DEVICES


class Regressor(torch.nn.Module):
    """The published recipe: encoder, FDS smoothing of the features in training, regressor."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.encoder = torch.nn.Linear(5, dim)
        self.fds = dirfast.FDS(dim, bucket_num=20, bucket_start=2)
        self.head = torch.nn.Linear(dim, 1)

    def forward(self, x, labels, epoch: int):
        features = self.encoder(x)
        if self.training:
            features = self.fds.smooth(features, labels, epoch)
            self.fds.accumulate(features, labels)
        return self.head(features)


def _fitted_model(device):
    torch.manual_seed(0)
    model = Regressor().to(device)
    with torch.no_grad():
        x, y = torch.randn(200, 5, device=device), torch.randint(0, 20, (200, 1), device=device).float()
        model.fds.update_running_stats(model.encoder(x), y, 0)
        model.fds.update_last_epoch_stats(1)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_matches_eager(device):
    """A model whose forward calls FDS.accumulate and FDS.smooth compiles with fullgraph=True
    and gives the eager loss, gradients and accumulated statistics."""
    x = torch.randn(32, 5, device=device)
    y = torch.randint(0, 20, (32, 1), device=device).float()
    results = []
    for compiled in (False, True):
        model = _fitted_model(device)
        step = torch.compile(model, fullgraph=True) if compiled else model
        loss = dirfast.losses.weighted_mse_loss(step(x, y, 1), y)
        loss.backward()
        results.append((loss.detach(), model.encoder.weight.grad.clone(), model.fds.accumulated_mean.clone()))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_accumulate_keeps_every_statistic(device):
    """FDS.accumulate and clear_accumulated compiled with fullgraph=True (aot_eager: torch's
    functionalization, without inductor's compile time) write what eager writes, the 0-dim count
    of rows left out included (a NaN label, a bucket with an infinite feature): torch drops an
    in-place update of a 0-dim tensor attribute there, not of a 1-D view of it."""
    x = torch.randn(32, 8, device=device)
    y = torch.randint(0, 20, (32,), device=device).float()
    y[0], x[1, 2] = float("nan"), float("inf")
    fdss = [dirfast.FDS(8, bucket_num=20, bucket_start=2).to(device) for _ in range(2)]
    states = []
    for fds, compiled in zip(fdss, (False, True)):
        options = dict(fullgraph=True, backend="aot_eager")
        accumulate = torch.compile(fds.accumulate, **options) if compiled else fds.accumulate
        clear = torch.compile(fds.clear_accumulated, **options) if compiled else fds.clear_accumulated
        accumulate(x, y)
        accumulate(x, y)
        states.append([getattr(fds, name).clone() for name in ("num_samples_skipped", "accumulated_count",
                                                               "accumulated_mean", "accumulated_m2")])
        clear()
        assert int(fds.num_samples_skipped) == 0 and not fds.accumulated_count.any(), compiled
    for eager, compiled in zip(*states):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert int(states[0][0]) > 2  # the NaN label's row and the infinite feature's bucket, twice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("binning, backend", [(dirfast.Binning.integer(121), "inductor"),
                                              (dirfast.Binning.uniform(0, 120, 60), "eager")], ids=["integer", "uniform"])
def test_compiled_lds_weights(device, binning, backend):
    """LDS.weights compiles with fullgraph=True; a uniform binning fitted on float64 labels traces
    too on the first float32 labels it sees (its float32 edges are built with it, not while
    tracing: the eager backend checks the tracing, without inductor's 12 s of compiling here)."""
    lds = dirfast.LDS(binning).fit(torch.randint(0, 100, (500,)).double())
    y = torch.randint(0, 120, (64,), device=device).float()
    weights = torch.compile(lambda t: lds.weights(t), fullgraph=True, backend=backend)(y)
    torch.testing.assert_close(weights, lds.weights(y), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_depth_maps_match_the_flattened_published_module(device):
    """NYUD2-DIR: [B, C, H, W] features with [B, 1, H, W] depths, Binning.uniform(0, 10, 100),
    bucket_start=7. dirfast reads the dense maps in place; the published module needs them
    flattened to per-pixel rows (with integer bucket labels). Depths stay inside the bucket range
    (0.7 .. 9.9), where the published module's out-of-range rule cannot differ."""
    g = torch.Generator().manual_seed(70)
    b, c, h, w = 2, 6, 8, 10
    binning = dirfast.Binning.uniform(0, 10, 100)
    fds = dirfast.FDS(c, bucket_num=100, bucket_start=7, binning=binning).to(device)
    published = PublishedFDS(c, bucket_num=100, bucket_start=7, device=device)
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    for epoch in range(2):
        feats = (torch.randn(b, c, h, w, generator=g) * 2 + 1).to(device)
        depth = (torch.rand(b, 1, h, w, generator=g) * 9.2 + 0.7).to(device)
        fds.update_running_stats(feats, depth, epoch)
        published.update_running_stats(flat(feats), binning(depth).reshape(-1).float(), epoch)
        fds.update_last_epoch_stats(epoch + 1)
        published.update_last_epoch_stats(epoch + 1)
    torch.testing.assert_close(fds.running_mean, published.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fds.running_var, published.running_var, rtol=1e-4, atol=1e-5)
    feats = (torch.randn(b, c, h, w, generator=g)).to(device)
    depth = (torch.rand(b, 1, h, w, generator=g) * 9.2 + 0.7).to(device)
    got = fds.smooth(feats.clone(), depth, 2)
    expected = published.smooth(flat(feats), binning(depth).reshape(-1, 1).float(), 2)
    torch.testing.assert_close(flat(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["focal_l1", "focal_mse", "huber", "rnc", "conr", "calibrate"])
def test_float_arguments_compile_with_dynamic_shapes(name):
    """Under torch.compile(dynamic=True) a float argument left at its default (beta, a
    temperature, a clip) is symbolic: its checks take it (NaN and inf found by comparisons, not math.isnan), the call
    compiles with fullgraph=True and gives eager's values at every batch size."""
    from dirfast import losses

    stats = (torch.zeros(4, 3), torch.ones(4, 3), torch.ones(4, 3), torch.full((4, 3), 2.0))
    calls = {"focal_l1": lambda p, y, f: losses.weighted_focal_l1_loss(p, y),
             "focal_mse": lambda p, y, f: losses.weighted_focal_mse_loss(p, y),
             "huber": lambda p, y, f: losses.weighted_huber_loss(p, y),
             "rnc": lambda p, y, f: losses.rnc_loss(torch.stack([f, f], 1), y),
             "conr": lambda p, y, f: losses.conr_loss(f, y, p),
             "calibrate": lambda p, y, f: dirfast.ops.calibrate(f, y[:, 0].long() % 4, *stats)}
    torch._dynamo.reset()
    compiled = torch.compile(calls[name], fullgraph=True, dynamic=True, backend="eager")
    g = torch.Generator().manual_seed(3)
    for n in (32, 20, 7):
        p, y, f = torch.randn(n, 1, generator=g), torch.randint(0, 8, (n, 1), generator=g).float(), \
            torch.randn(n, 3, generator=g)
        torch.testing.assert_close(compiled(p, y, f), calls[name](p, y, f), rtol=0, atol=0)
