"""The paper's rule, in pure Python (no torch, no web framework): query types, the text features,
chat templates, the presets with the relevance S, and datasets of queries. Everything else in r3
builds on this package; the trainer imports only it."""
