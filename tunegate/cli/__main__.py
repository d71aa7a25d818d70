"""`python -m tunegate.cli ...`: the same command line as the `tunegate` script."""

from tunegate.cli import app

app(prog_name="tunegate")
