"""Experiments over records: the engine's throughput / perplexity frontier (``pareto``), the consolidation
curve (``consolidation``), the multi-tenant comparison (``tenants``). They run suites or read records and
read every figure through ``moecap.figures``; the serving engine never imports them."""
