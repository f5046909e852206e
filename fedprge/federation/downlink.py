"""The server's train and evaluate messages, and the choice between seed catch-up and the dense B.

Catch-up (``downlink=seeds``): a client gets the seed lists of every round since its last sync, or the dense B
when that is cheaper (``federation.catchup=auto``: when the seed record is at least as many bytes as B, or the
replay exceeds ``catchup_max_seeds`` directions). After a resume, and after a client's ClientApp failed with
anything but ``NODE_UNAVAILABLE`` (an offline node keeps its state), the node counts as unsynced (synced round 0).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedprge.federation.protocol import GlobalState, content_bytes


def weights_bytes(num_params: int) -> int:
    """Payload bytes of the dense-B state of ``num_params`` entries."""
    dense = ArrayRecord(array_dict={"b": Array(np.zeros(num_params, dtype=np.float32))})
    return content_bytes(RecordDict({"state": dense}))


def weights_cheaper(state: GlobalState, dense_bytes: int, max_seeds: int) -> bool:
    """Whether the dense B (``dense_bytes``) beats the seed catch-up ``state`` (rule in the module docstring)."""
    n_seeds = sum(len(u.seeds) for u in state.updates)
    if max_seeds and n_seeds > max_seeds:
        return True
    # a seed entry alone takes 8 bytes, so a long list needs no serializing to lose
    return 8 * n_seeds >= dense_bytes or content_bytes(RecordDict({"state": state.to_record()})) >= dense_bytes


def replay_directions(msg: Message) -> int:
    """How many directions a seed catch-up message makes its client regenerate (0 for the other forms)."""
    if str(msg.content["round"]["downlink"]) != "seeds":
        return 0
    return sum(int(n) for n in msg.content["state"]["sizes"])  # the record's seed count per round (protocol.py)


def message(node_id: int, rnd: int, message_type: str, state: GlobalState) -> Message:
    """A ``train`` or ``evaluate`` message of round ``rnd`` carrying ``state`` (wire format in ``protocol.py``)."""
    content = RecordDict({"round": ConfigRecord({"round": rnd, "downlink": state.kind}), "state": state.to_record()})
    return Message(content, dst_node_id=node_id, message_type=message_type, group_id=str(rnd))


def evaluate_message(
    node_id: int,
    rnd: int,
    state: GlobalState,
    methods: list[str],
    sync: bool,
    attempt: int,
    save: str,
    validate: bool = False,
) -> Message:
    """An ``evaluate`` message: ``message`` plus the ``eval`` record (``save`` and ``validate`` only when set;
    ``validate``: the client also reports the validation loss of the global B, ``global_val_loss``)."""
    msg = message(node_id, rnd, "evaluate", state)
    fields: dict = {"methods": methods, "sync": sync, "attempt": attempt}
    fields.update({"save": save} if save else {})
    fields.update({"validate": True} if validate else {})
    msg.content["eval"] = ConfigRecord(fields)
    return msg
