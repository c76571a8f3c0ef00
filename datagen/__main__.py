"""`python -m datagen`: the same entry point as the `datagen` command."""
from datagen.cli import main

main()
