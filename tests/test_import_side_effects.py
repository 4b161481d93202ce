"""Importing yaie_jax (every module) changes nothing in the process: no gc hook or threshold, no logging handler
or level, no jax.config value, no environment variable. What the engine needs it sets up when it starts."""
import subprocess
import sys

CODE = """
import gc, importlib, logging, os, pkgutil
import jax
import jax.experimental.pallas, jax.experimental.pallas.mosaic_gpu  # noqa (JAX's own set-up: MOSAIC_GPU_CUDA_ROOT)
before = (list(gc.callbacks), gc.get_threshold(), list(logging.root.handlers), logging.root.level,
          dict(jax.config.values), dict(os.environ))
import yaie_jax, pallas_kernels
names = []
for pkg in (yaie_jax, pallas_kernels):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
            names.append(info.name)
after = (list(gc.callbacks), gc.get_threshold(), list(logging.root.handlers), logging.root.level,
         {k: v for k, v in jax.config.values.items() if k in before[4]}, dict(os.environ))
for what, b, a in zip(("gc.callbacks", "gc threshold", "root handlers", "root level", "jax.config", "environ"),
                      before, after):
    if isinstance(b, dict):
        a, b = ({k: v for k, v in a.items() if b.get(k) != v}, {k: v for k, v in b.items() if a.get(k) != v})
    assert a == b, (what, b, a)
print("IMPORTED", len(names))
"""


def test_importing_every_module_changes_nothing():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split("IMPORTED")[-1]) > 40
