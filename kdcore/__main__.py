"""``python -m kdcore`` (what ``torchrun ... -m kdcore train RECIPE`` runs on every rank)."""

from kdcore.commands.cli import main

raise SystemExit(main())
