"""Text recipes: classification, causal-lm, data-to-text and multiple-choice, with the prompt → response
fine-tuning (``lm``) and decoding (``generation``) they share."""
