"""The classifier (encoders -> pooling -> fusion -> head) and what of it trains."""
