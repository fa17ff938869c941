"""The engine: admission on model queues (`admission`), resolution of query types and references
(`resolve`), the reward backends (`backends`) over a pool of models (`pool`), each behind one
cross-request batching scheduler (`scheduler`); `engine.RewardEngine` assembles them."""
