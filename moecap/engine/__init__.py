"""moecap's own MoE serving engine: expert store, quantization, offloading, planner."""
