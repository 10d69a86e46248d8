"""The `floe` executable (and `python -m floe`): holds SIGTERM while the CLI loads (see floe.infra.signals)."""

from __future__ import annotations

from floe.infra.signals import hold_sigterm


def main() -> None:
    hold_sigterm()
    from floe.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
