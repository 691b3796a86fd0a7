"""The kdcore command line (cli) and the commands that are more than a call into training: kdcore
eval (evaluate, run_summary), kdcore cache-teacher (cache_teacher), kdcore plot (plot), and what
every command prints and exits with when it fails (errors). See docs/architecture.md."""
