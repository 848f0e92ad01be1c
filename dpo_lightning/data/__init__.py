"""Preference data: reading rows (formats), tokenizing pairs, the batch contract (collate), the data module."""
