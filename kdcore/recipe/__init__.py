"""Recipes: loading with overrides and validation (loading), the structured schema with each
default's reason (schema), the checks beyond it (checks, switches, secret, hub_cache), and
docs/recipes.md generated from the schema (doc: python -m kdcore.recipe.doc). See
docs/architecture.md."""
