"""Checkpoint conversion, see megatron_hapo.models.convert (also: megatron-hapo convert megatron-to-hf)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hapo.models.convert import main_megatron_to_hf  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_megatron_to_hf())
