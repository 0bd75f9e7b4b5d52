"""On PYTHONPATH, makes the modules named in HAPO_BLOCK_MODULES (comma-separated) look not installed, as on
a machine without them: `import` raises ModuleNotFoundError and `importlib.util.find_spec` returns None
(how transformers and megatron-core probe optional libraries). The device script's tests run the real
interpreter that way."""
import os
import sys

for _name in filter(None, os.environ.get("HAPO_BLOCK_MODULES", "").split(",")):
    sys.modules[_name] = None
