"""Write the bytecode of the modules that stmvl's own processes import, once, after `make install`.

`make install` installs with `pip --no-compile`: pip would otherwise compile every file of torch and the rest, most
of them never imported, and Python compiles a module on its first import anyway. Where PYTHONDONTWRITEBYTECODE is
set (the Makefile unsets it for this one command), that first import never writes its bytecode, so each new Python
process compiles torch's imported modules again: about 3 s for every stmvl or torchrun subprocess the test suite
starts. `make test` runs this script first; importing what those processes use writes just that bytecode.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

# imported inside functions (lazily) by stmvl or its test workers, so a walk over stmvl's modules alone misses them
LAZY = ("av", "PIL.Image", "PIL.PngImagePlugin", "tokenizers", "safetensors.torch", "webdataset",
        "torch.utils.tensorboard", "torch.utils.flop_counter", "torch.distributed.run",
        "torch.distributed.algorithms.ddp_comm_hooks", "torch.nn.parallel", "matplotlib.pyplot")


def main() -> int:
    if sys.dont_write_bytecode:
        print("warm_imports: bytecode writing is off (PYTHONDONTWRITEBYTECODE or -B); nothing to do", file=sys.stderr)
        return 0
    import stmvl

    names = [info.name for info in pkgutil.walk_packages(stmvl.__path__, "stmvl.")] + list(LAZY)
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:  # an optional extra that is not installed: nothing to compile
            missing.append(f"{name} ({error})")
    if missing:
        print("warm_imports: not installed, skipped: " + "; ".join(missing), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
