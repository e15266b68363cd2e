"""Runners: one module per backend, each a ``Runner`` producing raw traces (see ``base.py``).

Registered in ``moecap.registry`` as ``"module:Class"`` strings and imported on first use.
"""
