"""``python -m diffem_cli`` (also what ``accelerate launch -m diffem_cli`` runs)."""

from diffem_cli.cli.app import main

main()
