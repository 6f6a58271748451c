"""Searched static cache schedules (beyond L2C's gradient training; issue 12): measure a per-(cache
evaluation, site) error table on the teacher's own trajectories (:mod:`.table`), pick the least-error
mask under a MAC budget with a greedy pass or an exact DP (:mod:`.select`), and run it as an ordinary
L2C router (:mod:`.searcher`)."""
from .searcher import ScheduleSearch, SearchResult, mask_logits, searched_policy, site_macs
from .select import brute_force, dynamic_programme, greedy, proxy_of, saved_of
from .table import ErrorTable, measure_error_table

__all__ = ["ErrorTable", "ScheduleSearch", "SearchResult", "brute_force", "dynamic_programme", "greedy",
           "mask_logits", "measure_error_table", "proxy_of", "saved_of", "searched_policy", "site_macs"]
