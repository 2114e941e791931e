"""The sweep half: grid files expanded into runs, submitted through an executor, tracked in a ledger."""
