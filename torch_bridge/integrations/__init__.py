"""Adapters that plug the torch face into other libraries' extension points (transformers)."""
