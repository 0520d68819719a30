"""``python -m xross`` (and ``torchrun ... -m xross train``) runs the xross CLI."""

from xross.cli.main import main

main()
