"""Export one partition's data for the native client: tokenized examples and the Python client's minibatches.

    python clients/native/client_data.py --config configs/smoke.yaml --partition 0 --out data-0.json

The file holds the partition's train, validation and test examples as token ids (prompt length and ids, encoded
exactly as ``fedprge.data.encode`` does, truncated to ``data.max_len``), the tokenizer's pad id, the resolved run
config it was made for, and the indices of every minibatch the Python client draws: local step t of round r
(``sample_indices`` with ``derive_seed(seed, BATCH, r, p, t)``, rounds 1..``federation.rounds`` or ``--rounds``)
and personalization step t with tags 1 (finetune) and 2 (local). A native client therefore needs no tokenizer and
no NumPy generator, and trains on the very batches a Python client would. It refuses a run whose data settings
differ from the file's (naming the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMAT = "fedprge-client-data/1"


def encoded(tokenizer, examples, max_len: int) -> list[list]:
    """``[prompt_tokens, ids]`` of each example, as ``encode`` tokenizes and truncates it."""
    from fedprge.data import encode

    rows = []
    for ex in examples:
        enc = encode(tokenizer, [ex], max_len)
        ids, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
        prompt = next((i for i, v in enumerate(labels) if v != -100), len(ids))
        rows.append([prompt, ids])
    return rows


def client_data(cfg, partition: int, rounds: int | None = None) -> dict:
    """The native client's data file content for ``partition`` of the run ``cfg``."""
    from fedprge.config import to_yaml
    from fedprge.data import sample_indices
    from fedprge.engine import rng
    from fedprge.engine.seeds import BATCH, PERSONAL
    from fedprge.models import load_tokenizer
    from fedprge.task import load_data

    data = load_data(cfg)
    if not 0 <= partition < len(data.clients):
        raise ValueError(f"--partition {partition} does not exist; this run has {len(data.clients)} clients")
    c = data.clients[partition]
    if any(ex.choices for ex in [*c.train, *c.val, *c.test]):
        raise ValueError(
            f"data.task={cfg.data.task!r} has label choices; the native client implements language-modelling "
            "tasks only (use a Python SuperNode)"
        )
    tok = load_tokenizer(cfg.model.name)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    fed, n = cfg.federation, len(c.train)

    def draw(*key: int) -> list[int]:
        return sample_indices(n, fed.batch_size, rng.derive_seed(cfg.seed, *key))

    rounds = rounds or fed.rounds
    return {
        "format": FORMAT,
        "partition": partition,
        "config": to_yaml(cfg),
        "pad_token_id": int(pad),
        "train": encoded(tok, c.train, cfg.data.max_len),
        "val": encoded(tok, c.val, cfg.data.max_len),
        "test": encoded(tok, c.test, cfg.data.max_len),
        "train_batches": [[draw(BATCH, r, partition, t) for t in range(fed.local_steps)] for r in range(1, rounds + 1)],
        "personal_batches": {
            str(tag): [draw(PERSONAL, tag, partition, t) for t in range(cfg.eval.personal_steps)] for tag in (1, 2)
        },
    }


def write(cfg, partition: int, out: str | Path, rounds: int | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(client_data(cfg, partition, rounds), separators=(",", ":")) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", default=[], help="YAML file(s) merged onto the defaults, in order")
    p.add_argument("--partition", type=int, required=True, help="the client's partition id")
    p.add_argument("--rounds", type=int, help="rounds of minibatches to include (default: federation.rounds)")
    p.add_argument("--out", required=True, help="the data file to write")
    p.add_argument("overrides", nargs="*", help="dotted fedprge config overrides, e.g. federation.rounds=5")
    args = p.parse_args(argv)
    from fedprge.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        out = write(cfg, args.partition, args.out, args.rounds)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"client_data: {e}\n")
    print(f"wrote {out} (partition {args.partition})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
