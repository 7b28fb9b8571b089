"""``python -m rectalfl``: the same command as the ``rectalfl`` console script."""

from rectalfl import main

main()
