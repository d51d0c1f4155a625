"""GKT Serve shared core: the vocabulary, queue layout, prompts and models the services share."""
