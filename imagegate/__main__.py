"""`python -m imagegate …` is the `imagegate` command."""

from imagegate.router.cli import main

main()
