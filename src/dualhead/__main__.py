"""`python -m dualhead ...` runs the `dualhead` command (what `torchrun -m dualhead train ...` starts)."""

from dualhead.cli import main

if __name__ == "__main__":
    main(prog_name="dualhead")
