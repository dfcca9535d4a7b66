"""Rule-based planning: a dataset fingerprint in, the training plans out.

The planner is pure (no files, no environment, no GPU) and follows the nnU-Net paper's rules
with nnU-Net v1's procedure and memory model, which reproduce the paper's published plans.

Example:
    >>> from AutoSegLib.planning import plan, Plans
    >>> plans = plan(fingerprint, {0: "CT"}, {"background": 0, "liver": 1})  # doctest: +SKIP
    >>> print(plans.explain())  # doctest: +SKIP
    >>> Plans.from_dict(plans.to_dict()) == plans  # doctest: +SKIP
    True

Modules: ``topology`` (pooling, kernels, widths), ``memory`` (estimate, budget, batch from
memory), ``rules`` (the other rules), ``configure`` (one configuration), ``cascade`` (the
low-resolution stage), ``planner`` (``plan``), ``plans`` (the JSON data model), ``explain``.
"""

from AutoSegLib.planning.plans import PLANS_VERSION, Configuration, Plans, PlanningError
from AutoSegLib.planning.planner import plan

__all__ = ["plan", "Plans", "Configuration", "PlanningError", "PLANS_VERSION"]
