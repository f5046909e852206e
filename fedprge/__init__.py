"""fedprge: federated P-RGE fine-tuning of LoRA-FA adapters with only an inference engine."""

import logging as _logging
import os as _os

# torchao (pulled in by executorch, imported by transformers) logs CUDA-kernel load failures on CPU machines.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
