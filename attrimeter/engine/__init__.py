"""Training and evaluation engines (target training, Market-protocol evaluation)."""
