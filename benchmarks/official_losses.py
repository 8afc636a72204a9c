"""The successors' losses as their official code computes them: eager, naive, batch-mean.

Written from the formulas of docs/sources.md ("The successors"), not from the repositories' code (they have no
licence): a softmax, the same clamps, the same detached factors, the same constants, each term averaged over the
batch and scaled, in the order the official classes do it. They are the oracle of tests/test_successors.py (what
``get_loss(name, **official_config)`` must equal) and the eager and compiled contenders of bench_losses.py.
``official_loss(name, logits, target, **params)`` takes the parameters with ``get_loss``'s names and defaults.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from apl.losses.spec import spec_for

__all__ = ["official_loss", "OFFICIAL_NAMES"]


def _onehot(target, c, dtype):
    return F.one_hot(target, c).to(dtype)


def _nce(z, t):
    log_p = F.log_softmax(z, dim=1)
    return (-(_onehot(t, z.shape[1], z.dtype) * log_p).sum(1) / -log_p.sum(1)).mean()


def _nfl(z, t, gamma):
    log_p = F.log_softmax(z, dim=1)
    norm = (-(1 - log_p.detach().exp()) ** gamma * log_p).sum(1)
    log_py = log_p.gather(1, t[:, None]).squeeze(1)
    return (-(1 - log_py.detach().exp()) ** gamma * log_py / norm).mean()


def _p_y(z, t):
    return (_onehot(t, z.shape[1], z.dtype) * F.softmax(z, dim=1)).sum(1)


def _agce(z, t, a, q):
    return (((a + 1) ** q - (a + _p_y(z, t)) ** q) / q).mean()


def _aul(z, t, a, q):
    return (((a - _p_y(z, t)) ** q - (a - 1) ** q) / q).mean()


def _ael(z, t, a):
    return torch.exp(-_p_y(z, t) / a).mean()


def _mae(z, t, scale):
    return scale * (1 - _p_y(z, t)).mean()


def _nnce(z, t, min_prob):
    p = F.softmax(z, dim=1).clamp(min=min_prob, max=1.0)
    v = -math.log(min_prob) + torch.log(p)
    return (1 - (_onehot(t, z.shape[1], z.dtype) * v).sum(1) / v.sum(1)).mean()


def _nnfl(z, t, gamma, min_prob):
    c = z.shape[1]
    log_p = F.log_softmax(z, dim=1).clamp(min=math.log(min_prob))
    fl = -(1 - log_p.detach().exp()) ** gamma * log_p
    big_a = -((1 - min_prob) ** gamma) * math.log(min_prob)
    fl_y = (_onehot(t, c, z.dtype) * fl).sum(1)
    return (1 - (big_a - fl_y) / (c * big_a - fl.sum(1))).mean()


def _amse(z, t, a):
    return ((F.softmax(z, dim=1) - a * _onehot(t, z.shape[1], z.dtype)) ** 2).mean()


def _eps_q(z, t, m):
    p = F.softmax(z, dim=1)
    top = _onehot(p.argmax(dim=1), z.shape[1], z.dtype)
    q = ((p + m * top) / (1 + m)).clamp(min=1e-8)
    return (_onehot(t, z.shape[1], z.dtype) * q).sum(1)


def _ece(z, t, m):
    return (-torch.log(_eps_q(z, t, m))).mean()


def _efl(z, t, m, gamma):
    q_y = _eps_q(z, t, m)
    return (-(1 - q_y.detach()) ** gamma * torch.log(q_y)).mean()


def _ngce(z, t, q):
    p = F.softmax(z, dim=1).clamp(min=1e-7, max=1.0)
    num = 1 - (_onehot(t, z.shape[1], z.dtype) * p).sum(1) ** q
    return (num / (z.shape[1] - p.pow(q).sum(1))).mean()


def _rce(z, t):
    p = F.softmax(z, dim=1).clamp(min=1e-7, max=1.0)
    label = _onehot(t, z.shape[1], z.dtype).clamp(min=1e-4, max=1.0)
    return (-(p * torch.log(label)).sum(1)).mean()


def _nrce(z, t):
    return 1 / 4 * (z.shape[1] - 1) * _rce(z, t)  # the official normaliser, as its code writes it


def _nmae(z, t):
    return 1 / (2 * (z.shape[1] - 1)) * (1 - _p_y(z, t)).mean()


#: name -> the batch loss from (logits, target, spec) of get_loss's spec for the same parameters.
_OFFICIAL = {
    "agce": lambda z, t, s: s.alpha * _agce(z, t, s.a, s.q),
    "aul": lambda z, t, s: s.alpha * _aul(z, t, s.a, s.q),
    "ael": lambda z, t, s: s.alpha * _ael(z, t, s.a),
    "nce+agce": lambda z, t, s: s.alpha * _nce(z, t) + s.beta * _agce(z, t, s.a, s.q),
    "nce+aul": lambda z, t, s: s.alpha * _nce(z, t) + s.beta * _aul(z, t, s.a, s.q),
    "nce+ael": lambda z, t, s: s.alpha * _nce(z, t) + s.beta * _ael(z, t, s.a),
    "nnce": lambda z, t, s: s.alpha * _nnce(z, t, s.min_prob),
    "nnfl": lambda z, t, s: s.alpha * _nnfl(z, t, s.gamma, s.min_prob),
    "anl-ce": lambda z, t, s: s.alpha * _nce(z, t) + s.beta * _nnce(z, t, s.min_prob),
    "anl-fl": lambda z, t, s: s.alpha * _nfl(z, t, s.gamma) + s.beta * _nnfl(z, t, s.gamma, s.min_prob),
    "amse": lambda z, t, s: s.alpha * _amse(z, t, s.a),
    "nce+amse": lambda z, t, s: s.alpha * _nce(z, t) + s.beta * _amse(z, t, s.a),
    "nfl+amse": lambda z, t, s: s.alpha * _nfl(z, t, s.gamma) + s.beta * _amse(z, t, s.a),
    "ece": lambda z, t, s: s.alpha * _ece(z, t, s.m),
    "efl": lambda z, t, s: s.alpha * _efl(z, t, s.m, s.gamma),
    "ece+mae": lambda z, t, s: s.alpha * _ece(z, t, s.m) + s.beta * _mae(z, t, 2.0),
    "efl+mae": lambda z, t, s: s.alpha * _efl(z, t, s.m, s.gamma) + s.beta * _mae(z, t, 2.0),
    "ngce": lambda z, t, s: s.alpha * _ngce(z, t, s.q),
    "nmae": lambda z, t, s: s.alpha * _nmae(z, t),
    "nrce": lambda z, t, s: s.alpha * _nrce(z, t),
    "ngce+mae": lambda z, t, s: s.alpha * _ngce(z, t, s.q) + s.beta * _mae(z, t, 1.0),
    "ngce+rce": lambda z, t, s: s.alpha * _ngce(z, t, s.q) + s.beta * _rce(z, t),
}
#: The names official_loss computes: every successor of apl.losses.spec.SUCCESSOR_NAMES.
OFFICIAL_NAMES = tuple(_OFFICIAL)


def official_loss(name: str, logits: torch.Tensor, target: torch.Tensor, **params) -> torch.Tensor:
    """The batch-mean loss ``name`` as its official code computes it, with ``get_loss``'s parameters."""
    spec = spec_for(name, **params)
    return _OFFICIAL[name](logits, target, spec)
