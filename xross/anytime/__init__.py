"""xross.anytime: Answering within a budget: the any-time runner, its curves and report, budgeted classification,
the latency table and the query table. May import ``xross.methods`` and everything below it.
"""
