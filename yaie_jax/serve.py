"""`python -m yaie_jax.serve [MODEL] [flags]`, the server's documented command: the code is
yaie_jax/server/serve.py; importing this module gives that one."""
import sys

from .server import serve as _serve

if __name__ == "__main__":
    sys.exit(_serve.main())
sys.modules[__name__] = _serve
