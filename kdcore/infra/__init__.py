"""Process infrastructure every layer uses: rank helpers and collectives (distributed), the
settings a kdflow process starts with (process_env), the shared-memory hidden-state channel, the
one-line exception helpers, progress lines for slow phases. See docs/architecture.md."""
