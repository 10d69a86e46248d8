"""`floe chaos`: exactly-once proven on the user's own config (see trials)."""
