"""`python -m surgery ...` is the `surgery` command; torchrun starts it as `torchrun ... -m surgery calibrate`."""

from surgery.cli import main

if __name__ == "__main__":
    main(prog_name="surgery")
