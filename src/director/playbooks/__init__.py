"""Playbooks: the model, its storage, the cache every instance keeps, YAML documents."""
