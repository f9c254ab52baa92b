"""The published Balanced MSE code, transcribed as the oracle of the parity tests.

From github.com/jiawei-ren/BalancedMSE (MIT licence, Copyright (c) 2022 Jiawei Ren):
``imdb-wiki-dir/balanaced_mse.py`` (the 1-D losses, identical in ``nyud2-dir/``),
``synthetic_benchmark/loss.py`` (the multi-dimensional losses), and the bucket priors of
``imdb-wiki-dir/datasets.py`` and ``nyud2-dir/loaddata.py`` (``get_bucket_info``).

Faithful but for one change: the hard-coded ``.cuda()`` is the device of the inputs. Do not fix
or vectorise anything here.
"""

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import convolve1d
from torch.distributions import MultivariateNormal as MVN


def gai_loss(pred, target, gmm, noise_var):
    gmm = {k: gmm[k].reshape(1, -1).expand(pred.shape[0], -1) for k in gmm}
    mse_term = F.mse_loss(pred, target, reduction='none') / 2 / noise_var + 0.5 * noise_var.log()
    sum_var = gmm['variances'] + noise_var
    balancing_term = - 0.5 * sum_var.log() - 0.5 * (pred - gmm['means']).pow(2) / sum_var + gmm['weights'].log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()

    return loss.mean()


def bmc_loss(pred, target, noise_var):
    logits = - 0.5 * (pred - target.T).pow(2) / noise_var
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))
    loss = loss * (2 * noise_var).detach()

    return loss


def bni_loss(pred, target, noise_var, bucket_centers, bucket_weights):
    mse_term = F.mse_loss(pred, target, reduction='none') / 2 / noise_var

    num_bucket = bucket_centers.shape[0]
    bucket_center = bucket_centers.unsqueeze(0).repeat(pred.shape[0], 1)
    bucket_weights = bucket_weights.unsqueeze(0).repeat(pred.shape[0], 1)

    balancing_term = - 0.5 * (pred.expand(-1, num_bucket) - bucket_center).pow(2) / noise_var + bucket_weights.log()
    balancing_term = torch.logsumexp(balancing_term, dim=-1, keepdim=True)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()
    return loss.mean()


def gai_loss_md(pred, target, gmm, noise_var):
    I = torch.eye(pred.shape[-1], dtype=pred.dtype, device=pred.device)
    mse_term = -MVN(pred, noise_var*I).log_prob(target)
    balancing_term = MVN(gmm['means'], gmm['variances']+noise_var*I).log_prob(pred.unsqueeze(1)) + gmm['weights'].log()
    balancing_term = torch.logsumexp(balancing_term, dim=1)
    loss = mse_term + balancing_term
    loss = loss * (2 * noise_var).detach()
    return loss.mean()


def bmc_loss_md(pred, target, noise_var):
    I = torch.eye(pred.shape[-1], dtype=pred.dtype, device=pred.device)
    logits = MVN(pred.unsqueeze(1), noise_var*I).log_prob(target.unsqueeze(0))
    loss = F.cross_entropy(logits, torch.arange(pred.shape[0], device=pred.device))
    loss = loss * (2 * noise_var).detach()
    return loss


def imdb_wiki_bucket_info(labels, lds_kernel_window=None, max_target=121):
    """``IMDBWIKI.get_bucket_info`` (``self.df['age'].values`` is ``labels``; the window is
    ``get_lds_kernel_window(...)``, or None without LDS)."""
    value_dict = {x: 0 for x in range(max_target)}
    for label in labels:
        if int(label) < max_target:
            value_dict[int(label)] += 1
    bucket_centers = np.asarray([k for k, _ in value_dict.items()])
    bucket_weights = np.asarray([v for _, v in value_dict.items()])
    if lds_kernel_window is not None:
        bucket_weights = convolve1d(bucket_weights, weights=lds_kernel_window, mode='constant')

    bucket_centers = np.asarray([bucket_centers[k] for k, v in enumerate(bucket_weights) if v > 0])
    bucket_weights = np.asarray([bucket_weights[k] for k, v in enumerate(bucket_weights) if v > 0])
    bucket_weights = bucket_weights / bucket_weights.sum()
    return bucket_centers, bucket_weights


def nyud2_bucket_info(train_bucket_num, bucket_start=7, lds_kernel_window=None):
    """``loaddata.get_bucket_info`` with ``reweight='none'`` (``TRAIN_BUCKET_NUM`` is
    ``train_bucket_num``, a list of 100 integer counts)."""
    if lds_kernel_window is not None:
        value_lst = train_bucket_num[bucket_start:]
        smoothed_value = convolve1d(np.asarray(value_lst), weights=lds_kernel_window, mode='reflect')
        smoothed_value = [smoothed_value[0]] * bucket_start + list(smoothed_value)
        bucket_weights = np.asarray(smoothed_value)
    else:
        value_lst = [train_bucket_num[bucket_start]] * bucket_start + train_bucket_num[bucket_start:]
        bucket_weights = np.asarray(value_lst)

    bucket_centers = np.linspace(0, 10, 101)[:-1] + 0.05
    bucket_weights = bucket_weights / bucket_weights.sum()
    return bucket_centers, bucket_weights
