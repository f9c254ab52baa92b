"""Balanced MSE (dirfast.losses.bmc_loss / bni_loss / gai_loss and their modules) against the
published functions (benchmarks/published_balanced_mse.py): losses and gradients in the predictions
and the noise scale, 1-D and multi-dimensional; the priors built from LDS and fitted mixtures."""

import math

import numpy as np
import pytest
import torch

import dirfast
from benchmarks import published_balanced_mse as published
from dirfast.losses import BMCLoss, BNILoss, GAILoss, bmc_loss, bni_loss, gai_loss
from dirfast.mixture import GaussianMixture, fit_gmm
from testing import DEVICES, backend_device_params, gen

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def batch(shape, seed, device, dtype):
    g = gen(seed)
    target = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
    pred = target + torch.randn(*shape, generator=g, dtype=torch.float64)
    return pred.to(device, dtype).requires_grad_(), target.to(device, dtype)


def mixture(k, d, seed):
    """A random mixture as the published pickle holds it (scikit-learn's full covariances)."""
    g = gen(seed)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    return {"means": torch.randn(k, d, generator=g, dtype=torch.float64) * 2,
            "variances": a @ a.transpose(1, 2) + 0.3 * torch.eye(d, dtype=torch.float64),
            "weights": weights / weights.sum()}  # scikit-learn's weights sum to 1


def compare(ours, theirs, pred, sigma, dtype):
    """Loss, d loss / d pred and d loss / d sigma of two formulations at the same inputs, and the
    loss where no gradient is wanted (ours computes none then)."""
    results = []
    for fn in (ours, theirs):
        p = pred.detach().clone().requires_grad_()
        s = sigma.detach().clone().requires_grad_()
        loss = fn(p, s ** 2)
        loss.backward()
        with torch.no_grad():
            results.append((loss.detach(), p.grad, s.grad, fn(p, s ** 2)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got.to(dtype), expected.to(dtype), **TOL[dtype])


def sigma_like(pred, value=0.8):
    return torch.tensor(value, dtype=pred.dtype, device=pred.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 3])
def test_bmc_matches_published(device, dtype, d):
    pred, target = batch((48, d), seed=d, device=device, dtype=dtype)
    theirs = published.bmc_loss if d == 1 else published.bmc_loss_md
    compare(lambda p, nv: bmc_loss(p, target, nv), lambda p, nv: theirs(p, target, nv), pred, sigma_like(pred), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_bmc_md_over_several_row_blocks(device):
    """BMC in d > 1 dimensions takes a block of rows at a time against the whole prior: 700 rows
    of 3 dimensions are two blocks (and a partial one on its own), the published loss and
    gradients."""
    from dirfast import balanced_mse

    pred, target = batch((700, 3), seed=44, device=device, dtype=torch.float64)
    assert balanced_mse._BLOCK_ELEMENTS // (700 * 3) < 700  # more than one block
    compare(lambda p, nv: bmc_loss(p, target, nv), lambda p, nv: published.bmc_loss_md(p, target, nv), pred,
            sigma_like(pred), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_bmc_md_form_reduces_to_1d(device):
    pred, target = batch((32, 1), seed=4, device=device, dtype=torch.float64)
    torch.testing.assert_close(bmc_loss(pred, target, 0.5), published.bmc_loss_md(pred, target, torch.tensor(0.5)))
    torch.testing.assert_close(bmc_loss(pred.reshape(-1), target.reshape(-1), 0.5), bmc_loss(pred, target, 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bni_matches_published(device, dtype):
    pred, target = batch((300, 1), seed=5, device=device, dtype=dtype)
    centers = torch.linspace(-4, 6, 41, dtype=torch.float64)
    weights = torch.rand(41, generator=gen(6), dtype=torch.float64)
    weights[[3, 17]] = 0  # empty buckets: log 0 in the published code
    theirs_tables = centers.to(device, dtype), weights.to(device, dtype)
    compare(lambda p, nv: bni_loss(p, target, nv, centers, weights),
            lambda p, nv: published.bni_loss(p, target, nv, *theirs_tables), pred, sigma_like(pred), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gai_matches_published(device, dtype):
    pred, target = batch((300, 1), seed=7, device=device, dtype=dtype)
    gmm = mixture(5, 1, seed=8)
    theirs_gmm = {k: v.to(device, dtype) for k, v in gmm.items()}
    compare(lambda p, nv: gai_loss(p, target, gmm, nv), lambda p, nv: published.gai_loss(p, target, theirs_gmm, nv),
            pred, sigma_like(pred), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_gai_md_matches_published(device, dtype, d):
    pred, target = batch((64, d), seed=9 + d, device=device, dtype=dtype)
    gmm = mixture(3, d, seed=10 + d)
    theirs_gmm = {k: v.to(device, dtype) for k, v in gmm.items()}
    compare(lambda p, nv: gai_loss(p, target, gmm, nv), lambda p, nv: published.gai_loss_md(p, target, theirs_gmm, nv),
            pred, sigma_like(pred), dtype)


@pytest.mark.parametrize("backend, device", list(backend_device_params(op="mixture_logpdf")))
def test_scalar_losses_on_every_backend(backend, device):
    """BMC, BNI and GAI on scalar targets run the mixture (with each element's gradients where
    one is wanted) on the selected backend: the published loss and gradients on each."""
    pred, target = batch((24, 1), seed=41, device=device, dtype=torch.float32)
    centers, weights = torch.linspace(-4, 6, 11), torch.rand(11, generator=gen(42)) + 0.1
    gmm = mixture(3, 1, seed=43)
    theirs_gmm = {k: v.to(device, torch.float32) for k, v in gmm.items()}
    pairs = [(lambda p, nv: bmc_loss(p, target, nv), lambda p, nv: published.bmc_loss(p, target, nv)),
             (lambda p, nv: bni_loss(p, target, nv, centers, weights),
              lambda p, nv: published.bni_loss(p, target, nv, centers.to(device), weights.to(device))),
             (lambda p, nv: gai_loss(p, target, gmm, nv), lambda p, nv: published.gai_loss(p, target, theirs_gmm, nv))]
    with dirfast.use_backend(backend):
        for ours, theirs in pairs:
            compare(ours, theirs, pred, sigma_like(pred), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_target_gradients(device):
    """BNI and GAI (in 1 and 2 dimensions) give targets that require grad the published gradient
    (their MSE term's); BMC's prior is detached, as before the matrix-free form: no gradient."""
    pred, target = batch((40, 1), seed=38, device=device, dtype=torch.float64)
    pred2, target2 = batch((40, 2), seed=41, device=device, dtype=torch.float64)
    centers, weights = torch.linspace(-4, 6, 21, dtype=torch.float64), torch.rand(21, generator=gen(39)) + 0.1
    gmm, gmm2 = mixture(3, 1, seed=40), mixture(3, 2, seed=42)
    theirs_gmm, theirs_gmm2 = ({k: v.to(device) for k, v in g.items()} for g in (gmm, gmm2))
    nv = torch.tensor(0.7, dtype=torch.float64, device=device)
    pairs = [(pred, target, lambda p, t: bni_loss(p, t, 0.7, centers, weights),
              lambda p, t: published.bni_loss(p, t, nv, centers.to(device), weights.to(device))),
             (pred, target, lambda p, t: gai_loss(p, t, gmm, 0.7), lambda p, t: published.gai_loss(p, t, theirs_gmm, nv)),
             (pred2, target2, lambda p, t: gai_loss(p, t, gmm2, 0.7),
              lambda p, t: published.gai_loss_md(p, t, theirs_gmm2, nv))]
    for p, target_rows, ours, theirs in pairs:
        grads = []
        for fn in (ours, theirs):
            t = target_rows.detach().clone().requires_grad_()
            fn(p.detach(), t).backward()
            grads.append(t.grad)
        torch.testing.assert_close(grads[0], grads[1], **TOL[torch.float64])
    t = target.detach().clone().requires_grad_()
    bmc_loss(pred, t, 0.7).backward()
    assert t.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_dense_predictions_go_in_as_they_are(device):
    """A [B, 1, H, W] depth map gives the loss of its flattened [N, 1] pixels (as the published
    NYUD2-DIR training reshapes them), without an N x K matrix."""
    pred, target = batch((2, 1, 12, 10), seed=11, device=device, dtype=torch.float32)
    centers, weights = torch.linspace(0.05, 9.95, 100), torch.rand(100, generator=gen(12)) + 0.01
    gmm = mixture(4, 1, seed=13)
    flat = pred.detach().reshape(-1, 1), target.reshape(-1, 1)
    nv = torch.tensor(0.6, device=device)
    torch.testing.assert_close(bni_loss(pred, target, nv, centers, weights),
                               published.bni_loss(*flat, nv, centers.to(device), weights.to(device)))
    torch.testing.assert_close(gai_loss(pred, target, gmm, nv),
                               published.gai_loss(*flat, {k: v.to(device).float() for k, v in gmm.items()}, nv))


@pytest.mark.parametrize("name", ["bmc", "bni", "gai"])
def test_modules_learn_the_noise_scale(name):
    """The module's loss is the functional one at noise_sigma ** 2; its gradient reaches
    noise_sigma, unless learn_noise=False; the prior moves with .to() (buffers)."""
    pred, target = batch((40, 1), seed=14, device="cpu", dtype=torch.float32)
    centers, weights = torch.arange(-3.0, 5.0), torch.rand(8, generator=gen(15)) + 0.1
    gmm = fit_gmm(target.reshape(-1), 2)
    make = {"bmc": lambda **kw: BMCLoss(1.5, **kw), "bni": lambda **kw: BNILoss(1.5, centers, weights, **kw),
            "gai": lambda **kw: GAILoss(1.5, gmm, **kw)}[name]
    functional = {"bmc": lambda nv: bmc_loss(pred, target, nv), "bni": lambda nv: bni_loss(pred, target, nv, centers, weights),
                  "gai": lambda nv: gai_loss(pred, target, gmm, nv)}[name]
    module = make()
    loss = module(pred, target)
    torch.testing.assert_close(loss, functional(torch.tensor(1.5) ** 2))
    loss.backward()
    assert module.noise_sigma.grad is not None and torch.isfinite(module.noise_sigma.grad)
    assert make(learn_noise=False).noise_sigma.requires_grad is False
    assert {n for n, _ in module.named_parameters()} == {"noise_sigma"}
    assert module.double().noise_sigma.dtype == torch.float64


@pytest.mark.parametrize("name", ["bni", "gai"])
def test_dtype_casts_move_the_prior_but_keep_its_dtype(name):
    """model.half() with the criterion inside cast the prior's buffers: weights of 1e-9 flushed to
    0 in float16 (a -inf loss) and the centres and means were rounded. Casts leave them float64
    (noise_sigma is cast), the loss is the float32 module's for float16 and float32 predictions,
    and moves still move them."""
    pred, target = batch((32, 1), seed=72, device="cpu", dtype=torch.float32)
    pred = pred.detach()
    make = {"bni": lambda: BNILoss(1.0, torch.linspace(-3, 3, 10) + 0.01, torch.full((10,), 1e-9)),
            "gai": lambda: GAILoss(1.0, mixture(3, 1, seed=73))}[name]
    reference, module = make(), make().half()
    assert module.noise_sigma.dtype == torch.float16
    expected = dict(reference.named_buffers())
    for key, value in module.named_buffers():
        assert value.dtype == torch.float64 and torch.equal(value, expected[key]), key
    for dtype in (torch.float16, torch.float32):
        p, t = pred.to(dtype), target.to(dtype)
        loss = module(p, t)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, reference(p.float(), t.float()))
    module.to("meta", torch.bfloat16)
    assert module.noise_sigma.device.type == "meta" and module.noise_sigma.dtype == torch.bfloat16
    assert all(buffer.device.type == "meta" and buffer.dtype == torch.float64 for buffer in module.buffers())


@pytest.mark.parametrize("name", ["bni", "gai"])
def test_priors_fitted_under_a_meta_default_device(name):
    """A model built under ``torch.device("meta")`` (deferred init) can hold the criterion: the
    prior is fitted on the host as without the context, noise_sigma follows the context, and
    after to_empty and a load the loss is the one built without it."""
    ages = torch.randint(0, 50, (512,), generator=gen(74)).float()
    make = {"bni": lambda: BNILoss.from_lds(dirfast.LDS(dirfast.Binning.integer(60)).fit(ages)),
            "gai": lambda: GAILoss.from_labels(ages, 3)}[name]
    reference = make()
    with torch.device("meta"):
        module = make()
    assert module.noise_sigma.is_meta
    for key, value in reference.named_buffers():
        assert torch.equal(dict(module.named_buffers())[key], value), key
    module.to_empty(device="cpu").load_state_dict(reference.state_dict())
    pred, target = batch((32, 1), seed=75, device="cpu", dtype=torch.float32)
    assert torch.equal(module(pred, target), reference(pred, target))


@pytest.mark.parametrize("name", ["bmc", "bni", "gai"])
def test_double_backward_raises(name):
    """A backward that builds its own graph (create_graph=True: a gradient penalty, a Hessian)
    raises NotImplementedError: each loss forms its first derivatives only (a gradient penalty's
    gradient had come back wrong, and a Hessian 0, silently). First derivatives as ever."""
    pred, target = batch((16, 1), seed=88, device="cpu", dtype=torch.float64)
    loss = {"bmc": lambda p: bmc_loss(p, target, 0.7),
            "bni": lambda p: bni_loss(p, target, 0.7, torch.linspace(-2, 2, 9), torch.full((9,), 1 / 9)),
            "gai": lambda p: gai_loss(p, target, mixture(3, 1, seed=89), 0.7)}[name]
    (first,) = torch.autograd.grad(loss(pred), pred)
    assert torch.isfinite(first).all()
    with pytest.raises(NotImplementedError, match="the Balanced MSE losses give first derivatives only"):
        torch.autograd.grad(loss(pred), pred, create_graph=True)


@pytest.mark.parametrize("name", ["bmc", "bni", "gai"])
def test_reset_parameters_gives_the_loss_as_built(name):
    """reset_parameters(), which FSDP and init loops call: after noise_sigma moved and a load
    replaced the prior, and after to_empty from the meta device (every value NaN), the
    module is the one built: the same state, and the same loss and gradients."""
    ages = torch.randint(0, 50, (512,), generator=gen(78)).float()
    other = torch.randint(10, 60, (512,), generator=gen(79)).float()
    make = {"bmc": lambda labels: BMCLoss(0.8),
            "bni": lambda labels: BNILoss.from_lds(dirfast.LDS(dirfast.Binning.integer(60)).fit(labels), 0.8),
            "gai": lambda labels: GAILoss.from_labels(labels, 3, 0.8)}[name]
    built, trained = make(ages), make(ages)
    pred, target = batch((32, 1), seed=80, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        trained.noise_sigma.mul_(1.5)  # as training moves it
    trained.load_state_dict({**make(other).state_dict(), "noise_sigma": trained.noise_sigma.detach()})
    assert any(not torch.equal(value, built.state_dict()[key]) for key, value in trained.state_dict().items())
    with torch.device("meta"):
        deferred = make(ages)
    deferred.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in list(deferred.parameters()) + list(deferred.buffers()):
            tensor.fill_(float("nan"))
    for module in (trained, deferred):
        module.reset_parameters()
        for key, value in built.state_dict().items():
            assert torch.equal(module.state_dict()[key], value), key
        assert module.noise_sigma.requires_grad
        p = pred.detach().requires_grad_()
        loss = module(p, target)
        loss.backward()
        q = pred.detach().requires_grad_()
        want = built(q, target)
        want.backward()
        assert torch.equal(loss, want) and torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("name", ["bmc", "bni", "gai"])
def test_a_parametrized_noise_scale_loads_and_resets(name):
    """noise_sigma under torch.nn.utils.parametrize (say, learned as its log): the state_dict
    round trip loads (the parametrization holds the entry) and reset_parameters sets
    init_noise_sigma through the parametrization's inverse (a load raised KeyError, and a reset
    wrote into the computed value, silently)."""
    class Exp(torch.nn.Module):
        def forward(self, log_sigma):
            return log_sigma.exp()

        def right_inverse(self, sigma):
            return sigma.log()

    module = {"bmc": lambda: BMCLoss(0.8), "bni": lambda: BNILoss(0.8, torch.arange(4.0), torch.full((4,), 0.25)),
              "gai": lambda: GAILoss(0.8, mixture(2, 1, seed=93))}[name]()
    torch.nn.utils.parametrize.register_parametrization(module, "noise_sigma", Exp())
    state = {key: value.clone() for key, value in module.state_dict().items()}
    with torch.no_grad():
        module.parametrizations.noise_sigma.original.fill_(0.3)
    module.load_state_dict(state)
    torch.testing.assert_close(module.noise_sigma.detach(), torch.tensor(0.8))
    with torch.no_grad():
        module.parametrizations.noise_sigma.original.fill_(0.3)
    module.reset_parameters()
    torch.testing.assert_close(module.noise_sigma.detach(), torch.tensor(0.8))


def test_noise_scale_converges_on_its_own_gradient():
    """With the predictions fixed at the targets plus N(0, 0.5^2) noise and a flat prior, the
    learned noise_sigma approaches the true noise scale (the point of learning it)."""
    g = gen(16)
    target = torch.rand(4096, 1, generator=g) * 20
    pred = target + 0.5 * torch.randn(4096, 1, generator=g)
    criterion = BNILoss(2.0, torch.arange(-5.0, 26.0, 0.25), torch.ones(124))
    opt = torch.optim.Adam(criterion.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        criterion(pred, target).backward()
        opt.step()
    assert abs(float(criterion.noise_sigma.detach()) - 0.5) < 0.05


# -- priors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lds", [False, True])
def test_bni_from_lds_matches_imdb_wiki_bucket_info(lds):
    ages = np.clip(np.random.default_rng(17).gamma(6, 6, 3000).round(), 0, 130)
    window = dirfast.get_lds_kernel_window("gaussian", 5, 2) if lds else None
    centers, weights = published.imdb_wiki_bucket_info(ages, window)
    fitted = dirfast.LDS(dirfast.Binning.integer(121), reweight="inverse", lds=lds, inverse_clip=None,
                         sigma=2).fit(ages[ages < 121])  # the published loop skips ages >= 121
    module = BNILoss.from_lds(fitted, smoothed=lds)
    np.testing.assert_array_equal(module.bucket_centers.numpy(), centers)
    np.testing.assert_allclose(module.bucket_weights.numpy(), weights, rtol=1e-12)


@pytest.mark.parametrize("lds", [False, True])
def test_bni_from_lds_matches_nyud2_bucket_info(lds):
    rng = np.random.default_rng(18)
    depths = np.concatenate([rng.uniform(0.7, 10, 20000), rng.normal(2.5, 0.4, 30000).clip(0.7, 9.99)])
    counts = np.bincount((depths * 10).astype(int), minlength=100).tolist()
    window = dirfast.get_lds_kernel_window("gaussian", 5, 2) if lds else None
    centers, weights = published.nyud2_bucket_info(counts, 7, window)
    fitted = dirfast.LDS(dirfast.Binning.integer(100, scale=10), reweight="inverse", lds=lds, inverse_clip=None,
                         padding="symmetric", bucket_start=7).fit(torch.from_numpy(depths))
    module = BNILoss.from_lds(fitted, smoothed=lds)
    keep = weights > 0
    np.testing.assert_allclose(module.bucket_centers.numpy(), centers[keep], rtol=1e-12)
    np.testing.assert_allclose(module.bucket_weights.numpy(), weights[keep], rtol=1e-12)


def test_fit_gmm_recovers_a_mixture():
    g = gen(19)
    labels = torch.cat([torch.randn(40000, generator=g) * 3 + 20, torch.randn(20000, generator=g) * 1 + 45,
                        torch.randn(40000, generator=g) * 6 + 70])
    fit = fit_gmm(labels, 3)
    order = torch.argsort(fit.means.reshape(-1))
    torch.testing.assert_close(fit.means.reshape(-1)[order], torch.tensor([20.0, 45, 70], dtype=torch.float64), atol=0.15, rtol=0)
    torch.testing.assert_close(fit.variances.reshape(-1)[order].sqrt(), torch.tensor([3.0, 1, 6], dtype=torch.float64), atol=0.15, rtol=0)
    torch.testing.assert_close(fit.weights[order], torch.tensor([0.4, 0.2, 0.4], dtype=torch.float64), atol=0.01, rtol=0)
    assert torch.equal(fit_gmm(labels, 3).means, fit.means)  # deterministic


def test_fit_gmm_on_the_histogram_is_em_on_the_samples():
    """Integer labels (one histogram bin per value) give the samples' maximum-likelihood fit:
    the histogram fit's likelihood is not below that of EM on the individual labels."""
    ages = torch.from_numpy(np.random.default_rng(20).gamma(5, 7, 5000).round())
    binned = fit_gmm(ages, 4, tol=1e-8, max_iter=500)
    samples = fit_gmm(torch.stack([ages, torch.zeros_like(ages)], 1), 4, tol=1e-8, max_iter=500)  # EM per sample
    one_dim = GaussianMixture(samples.means[:, :1], samples.variances[:, :1, :1], samples.weights)
    assert binned.log_prob(ages).mean() >= one_dim.log_prob(ages).mean() - 1e-3


def test_fit_gmm_keeps_the_spread_inside_each_bin():
    """One component on a coarse histogram: by the law of total variance, the between-bin
    variance plus each bin's own spread is the labels' variance, exactly (continuous labels,
    8 bins)."""
    labels = torch.from_numpy(np.random.default_rng(22).normal(3.0, 2.0, 4000))
    fit = fit_gmm(labels, 1, num_bins=8, reg_covar=0.0)
    assert fit.means.item() == pytest.approx(labels.mean().item(), rel=1e-12)
    assert fit.variances.item() == pytest.approx(labels.var(correction=0).item(), rel=1e-9)


@pytest.mark.parametrize("d", [2, 3])
def test_fit_gmm_in_several_dimensions(d):
    g = gen(21 + d)
    centres = torch.eye(d, dtype=torch.float64) * 8
    labels = torch.cat([torch.randn(3000, d, generator=g, dtype=torch.float64) * 0.5 + c for c in centres[:2]])
    fit = fit_gmm(labels, 2)
    order = torch.argsort(fit.means[:, 0], descending=True)
    torch.testing.assert_close(fit.means[order], centres[:2], atol=0.05, rtol=0)
    torch.testing.assert_close(fit.variances[order], 0.25 * torch.eye(d, dtype=torch.float64).expand(2, d, d), atol=0.03, rtol=0)


def test_gai_accepts_the_published_pickle_layouts():
    """scikit-learn's means_ [K, 1] and covariances_ [K, 1, 1] (the published pickle), or flat
    [K] tables, or a GaussianMixture: the same loss."""
    pred, target = batch((20, 1), seed=22, device="cpu", dtype=torch.float64)
    full = mixture(3, 1, seed=23)
    flat = {k: v.reshape(-1) for k, v in full.items()}
    expected = gai_loss(pred, target, GaussianMixture.from_dict(full), 0.7)
    for gmm in (full, flat, {k: v.numpy() for k, v in full.items()}):
        torch.testing.assert_close(gai_loss(pred, target, gmm, 0.7), expected)


@pytest.mark.parametrize("name", ["bmc", "bni", "gai", "gai-2d"])
def test_modules_compile_fullgraph(name):
    """torch.compile(fullgraph=True) traces each loss module whole, backward included."""
    pred, target = batch((40, 2 if name == "gai-2d" else 1), seed=24, device="cpu", dtype=torch.float32)
    module = {"bmc": lambda: BMCLoss(), "bni": lambda: BNILoss(1.0, torch.linspace(-3, 5, 17), torch.rand(17) + 0.1),
              "gai": lambda: GAILoss(1.0, mixture(3, 1, seed=25)),
              "gai-2d": lambda: GAILoss(1.0, mixture(3, 2, seed=25))}[name]()
    assert_compiled_matches_eager(module, torch.compile(module, backend="aot_eager", fullgraph=True), pred, target)


def assert_compiled_matches_eager(module, compiled, pred, target):
    """The loss and its gradients (in pred and in the noise) of ``compiled`` are ``module``'s."""
    results = []
    for fn in (compiled, module):
        p = pred.detach().clone().requires_grad_()
        module.zero_grad()
        loss = fn(p, target)
        loss.backward()
        results.append((loss.detach(), p.grad, module.noise_sigma.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func.jvp's own
def test_torch_func_transforms_raise_naming_the_loss():
    """torch.func's gradient transforms and forward mode through a Balanced MSE loss raise
    NotImplementedError naming it (torch's own errors spoke of an autograd.Function's
    setup_context and jvp); torch.autograd.grad gives the gradient as ever."""
    pred, target = batch((8, 1), seed=31, device="cpu", dtype=torch.float32)
    losses = {"bmc_loss": lambda p: bmc_loss(p, target, 0.5),
              "bni_loss": lambda p: bni_loss(p, target, 0.5, torch.linspace(-2, 2, 5), torch.ones(5)),
              "gai_loss": lambda p: gai_loss(p, target, mixture(2, 1, seed=32), 0.5)}
    for name, loss in losses.items():
        for transform in (torch.func.grad, torch.func.jacrev):
            with pytest.raises(NotImplementedError, match=f"dirfast.losses.{name} cannot be differentiated by"):
                transform(loss)(pred.clone())
        with pytest.raises(NotImplementedError, match=f"dirfast.losses.{name} has no forward-mode derivative"):
            torch.func.jvp(loss, (pred.clone(),), (torch.ones_like(pred),))
        p = pred.clone().requires_grad_()
        assert torch.isfinite(torch.autograd.grad(loss(p), p)[0]).all()


def test_bmc_on_several_dimensions_compiles_once_for_every_batch_size():
    """Traced with dynamic shapes, BMC on [N, d] targets is one graph for any batch size, and its
    loss and gradients are eager's (its loop over blocks of rows fixed N: a graph per batch size,
    until torch's recompile limit sent it back to eager)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    module = BMCLoss()
    step = torch.compile(lambda p, t: module(p, t), backend=counter, dynamic=True)
    for n in (10, 13, 17, 24):
        pred, target = batch((n, 2), seed=n, device="cpu", dtype=torch.float32)
        assert_compiled_matches_eager(module, step, pred, target)
    assert counter.frame_count == 1


# -- the functions check what the modules check ---------------------------------------------------
@pytest.mark.parametrize("name, centers, weights", [
    ("negative weight", [0.0, 1.0, 2.0], [1.0, -1.0, 1.0]), ("NaN weight", [0.0, 1.0, 2.0], [1.0, float("nan"), 1.0]),
    ("all weights 0", [0.0, 1.0, 2.0], [0.0, 0.0, 0.0]), ("NaN centre", [0.0, float("nan"), 2.0], [1.0, 1.0, 1.0])])
def test_bni_loss_refuses_the_histograms_its_module_refuses(name, centers, weights):
    """bni_loss used to return -inf or NaN where BNILoss raised: both raise, with one message."""
    pred, target = batch((16, 1), seed=26, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="bucket_") as functional:
        bni_loss(pred, target, 1.0, torch.tensor(centers), torch.tensor(weights))
    with pytest.raises(ValueError) as module:
        BNILoss(1.0, torch.tensor(centers), torch.tensor(weights))
    assert str(functional.value) == str(module.value)


LOSSES = {"bmc": lambda p, t, nv: bmc_loss(p, t, nv),
          "bni": lambda p, t, nv: bni_loss(p, t, nv, torch.linspace(-4, 6, 21), torch.ones(21)),
          "gai": lambda p, t, nv: gai_loss(p, t, mixture(3, 1, seed=27), nv)}


@pytest.mark.parametrize("name", list(LOSSES))
def test_noise_var_is_checked_against_the_prediction_dtype(name):
    """A float32 loss cannot hold noise_var 1e39 (inf) or 1e-50 (0): refused there, valid with
    float64 predictions. The float32 range's ends, sqrt(tiny) and sqrt(max), give finite losses."""
    loss = LOSSES[name]
    pred32, target32 = batch((32, 1), seed=28, device="cpu", dtype=torch.float32)
    pred64, target64 = batch((32, 1), seed=28, device="cpu", dtype=torch.float64)
    for value in (1e39, 1e-50):
        with pytest.raises(ValueError, match="noise_var"):
            loss(pred32, target32, value)
        assert torch.isfinite(loss(pred64, target64, value))
    info = torch.finfo(torch.float32)
    for value in (math.sqrt(info.tiny), math.sqrt(info.max)):
        assert torch.isfinite(loss(pred32, target32, value))


@pytest.mark.parametrize("make", [lambda s: BMCLoss(s), lambda s: BNILoss(s, torch.arange(3.0), torch.ones(3)),
                                  lambda s: GAILoss(s, mixture(2, 1, seed=29))], ids=["bmc", "bni", "gai"])
def test_module_noise_sigma_is_checked_against_its_float32_parameter(make):
    """noise_sigma is a float32 parameter, and its square the noise variance: 1e20 squared
    overflows float32 (the loss was inf), 1e-25 squared underflows it (NaN)."""
    for sigma in (1e20, 1e-25):
        with pytest.raises(ValueError, match="init_noise_sigma"):
            make(sigma)
    pred, target = batch((32, 1), seed=30, device="cpu", dtype=torch.float32)
    info = torch.finfo(torch.float32)
    for sigma in (info.tiny ** 0.25, info.max ** 0.25):
        assert torch.isfinite(make(sigma)(pred, target))


def test_bni_from_lds_refuses_a_grid():
    """BNI's histogram has one dimension; an LDS over a GridBinning raised an AttributeError."""
    grid = dirfast.GridBinning(dirfast.Binning.integer(3), dirfast.Binning.integer(4))
    lds = dirfast.LDS(grid).fit(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="lds must be over a Binning"):
        BNILoss.from_lds(lds)


# -- mixtures ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 3])
def test_log_prob_is_the_mixture_density(d):
    """GaussianMixture.log_prob (the whitening shared with GAI in d dimensions) against torch's
    MixtureSameFamily of MultivariateNormal."""
    gmm = mixture(5, d, 37)
    x = torch.randn(200, d, generator=gen(38), dtype=torch.float64) * 3
    oracle = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(gmm["weights"]),
                                                   torch.distributions.MultivariateNormal(gmm["means"], gmm["variances"]))
    torch.testing.assert_close(GaussianMixture.from_dict(gmm).log_prob(x), oracle.log_prob(x), rtol=1e-12, atol=1e-12)


def test_log_prob_takes_rows_of_the_mixture_dimension():
    """A 2-D mixture at x [4, 3] gave 6 values (the 12 numbers read as rows of 2): refused."""
    gmm = GaussianMixture(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2), covariance_type="diag")
    x = torch.randn(4, 2, generator=gen(31), dtype=torch.float64)
    assert gmm.log_prob(x).shape == (4,)
    for bad in (torch.randn(4, 3), x[:, 0], x.T):
        with pytest.raises(ValueError, match=r"x must be \[N, 2\]"):
            gmm.log_prob(bad)
    scalar = GaussianMixture(torch.zeros(2), torch.ones(2), torch.ones(2))
    assert scalar.log_prob(torch.zeros(3, 4)).shape == (12,)  # d = 1: every element a point


def test_from_dict_asks_for_the_covariance_type_when_the_shape_does_not_tell():
    """[d, d] variances with K == d are diagonal [K, d] or tied [d, d] covariances: from_dict
    read them as diagonal; now it asks, and each type gives its covariances."""
    table = torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=torch.float64)
    gmm = {"means": torch.zeros(2, 2), "variances": table, "weights": torch.ones(2)}
    with pytest.raises(ValueError, match="covariance_type"):
        GaussianMixture.from_dict(gmm)
    tied = GaussianMixture.from_dict(gmm, covariance_type="tied")
    assert torch.equal(tied.variances, table.expand(2, 2, 2))
    diag = GaussianMixture.from_dict(gmm, covariance_type="diag")
    assert torch.equal(diag.variances, torch.diag_embed(table))
    three = GaussianMixture.from_dict(dict(gmm, means=torch.zeros(3, 2), weights=torch.ones(3)))  # K != d: tied
    assert torch.equal(three.variances, table.expand(3, 2, 2))
    with pytest.raises(ValueError, match="covariance_type='full'"):
        GaussianMixture.from_dict(gmm, covariance_type="full")


def test_mixture_weights_are_normalised():
    """Weights that do not sum to 1 are normalised: the GAI loss does not shift by log(sum)."""
    gmm = mixture(3, 1, seed=32)
    scaled = dict(gmm, weights=gmm["weights"] * 7)
    torch.testing.assert_close(GaussianMixture.from_dict(scaled).weights, gmm["weights"])
    pred, target = batch((24, 1), seed=33, device="cpu", dtype=torch.float64)
    torch.testing.assert_close(gai_loss(pred, target, scaled, 0.5), gai_loss(pred, target, gmm, 0.5))


def test_fit_gmm_of_labels_a_few_ulps_apart():
    """A span too narrow for num_bins distinct edges is binned as finely as it allows (it raised
    an error about a range the caller never passed)."""
    labels = 1.0 + torch.tensor([0.0, 1e-13, 1e-13, 2e-13] * 25, dtype=torch.float64)
    fit = fit_gmm(labels, 1)
    assert float(fit.means) == pytest.approx(float(labels.mean()), rel=1e-15)


def test_fit_gmm_of_equal_labels():
    """Equal labels are one occupied bin, whatever their magnitude (1.7e18 + 1 == 1.7e18 had
    made an empty range); with reg_covar=0 their variance is singular, which says so."""
    for value in (3.0, 1.7e18):
        fit = fit_gmm(torch.full((100,), value, dtype=torch.float64), 2)
        assert float(fit.log_prob(torch.tensor([value], dtype=torch.float64))) > 0  # all the mass, variance reg_covar
        assert float((fit.weights * fit.means.reshape(-1)).sum()) == pytest.approx(value, rel=1e-12)
    with pytest.raises(ValueError, match="reg_covar > 0"):
        fit_gmm(torch.full((100,), 3.0, dtype=torch.float64), 1, reg_covar=0)
    line = torch.arange(100.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="reg_covar > 0"):
        fit_gmm(torch.stack([line, 2 * line], 1), 2, reg_covar=0)


# -- state dicts and priors -------------------------------------------------------------------------
MODULES = {"bmc": lambda: BMCLoss(0.8), "bni": lambda: BNILoss(0.8, torch.arange(3.0), torch.ones(3)),
           "gai": lambda: GAILoss(0.8, mixture(2, 1, seed=34))}


@pytest.mark.parametrize("name", list(MODULES))
def test_missing_keys_are_reported_not_loaded(name):
    """As BatchNorm: missing keys go to missing_keys (strict=False loads, strict=True raises
    nn.Module's RuntimeError); the loss loads none of its entries when one is missing."""
    loss = MODULES[name]()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    assert loss.load_state_dict({}, strict=False).missing_keys == list(before)
    other = {k: v + 1 if k != "noise_sigma" else v * 2 for k, v in before.items()}
    partial = dict(list(other.items())[:-1])
    result = loss.load_state_dict(partial, strict=False)
    assert result.missing_keys == list(before)[-1:] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="Missing key"):
        loss.load_state_dict(partial)
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key
    model = torch.nn.ModuleDict({"head": torch.nn.Linear(2, 1), "loss": loss})
    result = model.load_state_dict({f"head.{k}": torch.zeros_like(v) for k, v in model.head.state_dict().items()},
                                   strict=False)
    assert result.missing_keys == [f"loss.{k}" for k in before] and not model.head.weight.any()


@pytest.mark.parametrize("name", list(MODULES))
def test_a_load_into_a_loss_made_in_inference_mode_is_refused_whole(name):
    """A loss built under torch.inference_mode, loaded outside it: torch copied the buffers in
    place, then refused the parameter (or the reverse), leaving a half-loaded loss; the load is
    refused before any copy, naming the cause. Assigned (assign=True), it loads."""
    with torch.inference_mode():
        loss = MODULES[name]()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    other = {k: v + 1 if k != "noise_sigma" else v * 2 for k, v in before.items()}
    with pytest.raises(RuntimeError, match="made under torch.inference_mode"):
        loss.load_state_dict(other)
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key
    loss.load_state_dict(other, assign=True)
    for key, value in loss.state_dict().items():
        assert torch.equal(value, other[key]), key


def test_modules_copy_the_callers_prior():
    """A load writes into the module's buffers, never into the caller's tensors or mixture."""
    centers, weights = torch.linspace(-3, 3, 10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    bni = BNILoss(1.0, centers, weights)
    bni.load_state_dict(BNILoss(1.0, centers + 5, weights * 2).state_dict())
    assert torch.equal(centers, torch.linspace(-3, 3, 10, dtype=torch.float64)) and torch.equal(weights, torch.ones(10))
    gmm = GaussianMixture.from_dict(mixture(2, 1, seed=35))
    saved = gmm.state_dict()
    gai = GAILoss(1.0, gmm)
    gai.load_state_dict(GAILoss(1.0, mixture(2, 1, seed=36)).state_dict())
    for key, value in saved.items():
        assert torch.equal(getattr(gmm, key), value), key


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_computed_in_float32(name, dtype):
    """float16 predictions with a small noise_var gave NaN (BMC) or inf (BNI, GAI): the loss is
    computed in float32, as the predictions cast to float32 give."""
    pred, target = batch((32, 1), seed=37, device="cpu", dtype=torch.float32)
    pred, target = pred.detach().to(dtype), target.to(dtype)
    for noise_var in (1e-6, 1e-8, 0.7):
        got, expected = LOSSES[name](pred, target, noise_var), LOSSES[name](pred.float(), target.float(), noise_var)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, expected)


def test_module_priors_beyond_float32_are_refused_for_float32_predictions():
    """A float64 centre, mean or variance beyond float32's range made NaN losses: ValueError for
    float32 predictions (checked without reading the buffers), a loss for float64 ones; a load
    updates the check."""
    pred, target = batch((16, 1), seed=38, device="cpu", dtype=torch.float32)
    big = torch.tensor([1e39, 0.0, 1.0], dtype=torch.float64)
    modules = {"bucket_centers": BNILoss(1.0, big, torch.ones(3)),
               "gmm": GAILoss(1.0, {"means": torch.zeros(3), "variances": big.abs() + 1, "weights": torch.ones(3)})}
    for words, module in modules.items():
        with pytest.raises(ValueError, match=words):
            module(pred, target)
        assert torch.isfinite(module(pred.double(), target.double()))
    bni = BNILoss(1.0, torch.arange(3.0), torch.ones(3))
    bni.load_state_dict(modules["bucket_centers"].state_dict())
    with pytest.raises(ValueError, match="bucket_centers"):
        bni(pred, target)


def test_covariances_must_be_symmetric():
    """An asymmetric covariance was read by its lower triangle: refused; one asymmetric in the
    last bits (scikit-learn's covariances_) is kept, mirrored from its lower triangle."""
    cov = torch.tensor([[[2.0, 0.5], [0.5, 1.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="variances must be symmetric"):
        GaussianMixture(torch.zeros(1, 2), cov.triu(), torch.ones(1))
    rounded = cov.clone()
    rounded[0, 0, 1] = torch.nextafter(rounded[0, 0, 1], torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(GaussianMixture(torch.zeros(1, 2), rounded, torch.ones(1)).variances, cov)


def test_bni_loss_takes_the_weights_log_in_the_wider_dtype():
    """float32 weights with float64 predictions give the loss of the same weights in float64
    (their log is taken in float64, as BNILoss's float64 buffers are)."""
    g = gen(71)
    pred, target = torch.randn(32, 1, generator=g, dtype=torch.float64), torch.randn(32, 1, generator=g, dtype=torch.float64)
    centers, weights = torch.linspace(-3, 3, 10), torch.rand(10, generator=g) + 0.1
    narrow = bni_loss(pred, target, 1.0, centers, weights)
    assert torch.equal(narrow, bni_loss(pred, target, 1.0, centers.double(), weights.double()))
    assert torch.equal(narrow, BNILoss(1.0, centers, weights)(pred, target))
