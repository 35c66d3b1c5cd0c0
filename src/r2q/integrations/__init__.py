"""Adapters that put r2q into other people's training loops (TRL's trainers: `r2q.integrations.trl`)."""
