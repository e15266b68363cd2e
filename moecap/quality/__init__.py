"""Accuracy: token perplexity and lm-eval tasks through a live runner."""
