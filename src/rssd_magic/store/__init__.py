"""A store, written once over every backend: the contract, the journal, the tables reports read."""
