"""`python -m yaie_jax.cli` and `yaie` scripts installed before the CLI moved: the code is
yaie_jax/server/cli.py; importing this module gives that one."""
import sys

from .server import cli as _cli

if __name__ == "__main__":
    sys.exit(_cli.main())
sys.modules[__name__] = _cli
