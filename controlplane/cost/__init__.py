"""Cost accounting (docs/cost.md): the leader's accountant, its SQLite ledger, CostService and the
consolidation recommender."""
