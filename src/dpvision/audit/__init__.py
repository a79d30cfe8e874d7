"""Empirical privacy auditing in one training run.

:mod:`dpvision.audit.stats` (Steinke, Nasr and Jagielski, 2023) and :mod:`dpvision.audit.fdp`
(Mahloujifar, Melis and Chaudhuri, 2025) turn correct guesses into ε lower bounds;
:mod:`dpvision.audit.analysis` applies both to canary scores and gives the verdict, with
:mod:`dpvision.audit.checks` (the white-box canaries' noise and clipping against the claim);
:mod:`dpvision.audit.instrument` is the one module that talks to the engine (INTERFACES.md §3);
:mod:`dpvision.audit.runner` trains with canaries and scores them; ``dpvision audit`` is the
command line (:mod:`dpvision.audit.cli`).
"""

from dpvision.audit.analysis import AuditAnalysis, analyse
from dpvision.audit.runner import AuditConfig, run_audit
from dpvision.audit.stats import AuditBound, audit_scores, epsilon_lower_bound, p_value

__all__ = ["AuditAnalysis", "AuditBound", "AuditConfig", "analyse", "audit_scores", "epsilon_lower_bound",
           "p_value", "run_audit"]
