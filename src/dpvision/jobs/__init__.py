"""Jobs: the one training loop and what runs through it."""
