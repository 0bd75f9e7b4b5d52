"""GGUF file → Hugging Face folder, see megatron_hapo.models.gguf (also: megatron-hapo convert gguf-to-hf)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_hapo.models.gguf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
