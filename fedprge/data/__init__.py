"""Federated datasets: Shakespeare roles (LM), sentiment tweets (classification) and local JSONL files."""

from fedprge.data.encode import encode, sample_indices
from fedprge.data.federated import load_federated
from fedprge.data.types import ClientDataset, Example, FederatedDataset

__all__ = ["ClientDataset", "Example", "FederatedDataset", "encode", "load_federated", "sample_indices"]
