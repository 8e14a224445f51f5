"""Toy scaffolding: local tokenizers, tiny models and datasets for the tests, the demo and the benches."""
