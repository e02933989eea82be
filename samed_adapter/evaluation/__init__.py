"""Metrics (Dice, HD95, summaries) and the evaluation protocols; imports segment, the core and the stages below them."""
