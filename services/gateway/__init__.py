"""The gRPC gateway: validates queries, enqueues jobs, and answers from each job's event stream."""
