"""BALD mutual information of a Bernoulli preference outcome from ensemble predictions.

BALD (Houlsby et al., "Bayesian Active Learning for Classification and Preference
Learning", 2011): I[y; theta | x] = H[E_theta p(y | x, theta)] - E_theta H[p(y | x, theta)].

The formula has one implementation, `balpm_server.bernoulli` (shared with the
posterior's Predict and Evaluate); this module gives it its acquisition names.

Letter legend: N pool items, E ensemble members.
"""

from __future__ import annotations

from balpm_server.bernoulli import bald as bald_from_probs
from balpm_server.bernoulli import binary_entropy

__all__ = ["bald_from_probs", "binary_entropy"]
