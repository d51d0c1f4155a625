"""The teacher worker: drains the query stream in dynamic batches and publishes guidance."""
