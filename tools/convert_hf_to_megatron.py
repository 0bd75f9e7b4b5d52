"""Checkpoint conversion, see megatron_hapo.models.convert (also: megatron-hapo convert hf-to-megatron)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hapo.models.convert import main_hf_to_megatron  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_hf_to_megatron())
