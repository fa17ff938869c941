"""The models the engine batches: an embedding model (texts) and a reward model ((query,
response) pairs), both behind one `BatchModel` contract (tokenize on any thread, forward on one)."""
