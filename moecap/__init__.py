"""moecap: Cost / Accuracy / Performance benchmarking of Mixture-of-Experts LLM serving."""

__version__ = "0.1.0"
