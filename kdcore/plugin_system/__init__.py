"""The plugin system: every extension point (hookspecs, the plugin-author docs), the plugin manager
that loads entry points and in-process plugins (manager), and the typed registries with their
option schemas (registry). See docs/architecture.md."""
