"""Learning-to-Cache: schedule (:mod:`.schedule`), compute budgets (:mod:`.budget`), the policy
(:mod:`.policy`) and the official router checkpoint formats (:mod:`.checkpoint`)."""
from .budget import DEFAULT_SITE_COST, budget_masks, site_costs, theta_for_budget
from .checkpoint import OfficialRouters, RouterCheckpointError, load_official, save_official
from .policy import L2CPolicy
from .schedule import L2CSchedule, alternating_schedule, make_schedule, shifted_schedule

__all__ = ["DEFAULT_SITE_COST", "L2CPolicy", "L2CSchedule", "OfficialRouters", "RouterCheckpointError",
           "alternating_schedule", "budget_masks", "load_official", "make_schedule", "save_official",
           "shifted_schedule", "site_costs", "theta_for_budget"]
