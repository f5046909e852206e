"""The federated fine-tuning methods that ``compare`` runs and ``calculator`` prices: name -> config overrides."""

from __future__ import annotations

METHODS: dict[str, list[str]] = {
    "prge-seeds": ["federation.downlink=seeds"],
    "prge-weights": ["federation.downlink=weights"],
    "prge-pool": ["federation.downlink=pool"],
    "mezo": ["zo.q=1", "federation.downlink=seeds"],
    "fedkseed": ["zo.q=1", "federation.downlink=pool", "federation.pool_size=4096"],
    "fedavg-lora-fa": ["federation.algorithm=fedavg_lora_fa"],
    "fedavg-lora": ["federation.algorithm=fedavg_lora"],
    "fedavg-full": ["federation.algorithm=fedavg_full"],
}
