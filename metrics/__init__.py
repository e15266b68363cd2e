"""Pure functions from traces to figures: model accounting, S-MBU/S-MFU, latency statistics.

Nothing here touches a model; nothing here imports torch.
"""
