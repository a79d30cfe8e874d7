"""Empirical privacy auditing in one training run (Steinke, Nasr and Jagielski, 2023).

:mod:`dpvision.audit.stats` turns canary scores into an ε lower bound;
:mod:`dpvision.audit.runner` trains with canaries (white-box gradient canaries
through the fast engine's ``canary_gradients`` hook, or black-box mislabelled
images) and scores them. ``dpvision audit`` is the command line.
"""

from dpvision.audit.runner import AuditConfig, run_audit
from dpvision.audit.stats import AuditBound, audit_scores, epsilon_lower_bound, p_value

__all__ = ["AuditBound", "AuditConfig", "audit_scores", "epsilon_lower_bound", "p_value", "run_audit"]
