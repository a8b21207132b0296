"""Evaluation of (pruned) models: perplexity by the papers' protocol."""

from .perplexity import PerplexityResult, perplexity, wikitext2_test_text

__all__ = ["PerplexityResult", "perplexity", "wikitext2_test_text"]
