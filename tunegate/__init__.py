"""tunegate's spine: typed settings, the database (models, migrations, jobs), vLLM processes, the CLI.

Every other package may import this one; it imports none of them, except the CLI and the demo,
which compose the packages lazily inside their commands.
"""

__version__ = "0.1.0"
