"""`python -m trimodal` is `mm`."""

from trimodal.cli.main import run

if __name__ == "__main__":
    run()
