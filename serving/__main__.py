"""``python -m serving``: the serve command alone, until the lead wires ``bladeflow serve``."""

import typer

from serving.cli import serve

if __name__ == "__main__":
    typer.run(serve)
