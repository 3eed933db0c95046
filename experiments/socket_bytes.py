"""Socket bytes vs the project's per-message accounting, on a loopback deployment.

Runs fedsparse.deploy.loopback's deployment (a real SuperLink and two SuperNodes on
127.0.0.1, `flwr run`, tiny model, 2 rounds: the run of tests/test_deployment.py) for PaFi and
full fine-tuning, plain and TLS, with the SuperNodes connected through fedsparse.deploy.relay.
Per round and direction it prints the bytes the ledger accounts
(`message_to_proto(m).ByteSize()` summed over the round's messages, rounds.jsonl `comm`) and
the bytes that crossed the SuperNode <-> SuperLink sockets. A few minutes per run.

    python experiments/socket_bytes.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import write_result

from fedsparse.deploy.loopback import ROOT, deploy
from fedsparse.deploy.relay import DOWN, UP
from fedsparse.report.results import read_run

OUT = Path(__file__).parent / "results" / "socket_bytes.md"
# The tiny federation (`+experiment=smoke`, 32 dev examples) on two SuperNodes, both sampled:
# the tests' loopback deployment (DEPLOYMENT in tests/harness/federation.py).
SETTINGS = [
    "+experiment=smoke",
    "data.max_eval_examples=32",
    "federation.num_clients=2",
    "federation.clients_per_round=2",
    "data.max_train_examples=400",
]


def accounted(record: dict, direction: str) -> int:
    """Bytes the ledger counts for one round and direction (train and client-eval messages)."""
    comm = record["comm"]
    return comm[direction]["bytes"] + comm[f"eval_{direction}"]["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    rows = [
        "| method | transport | window | dir | messages | accounted B | socket B | socket - accounted | "
        "socket / accounted | new TCP conns | window s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certificates"
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "generate-certs.sh"), str(certs)],
            check=True,
            capture_output=True,
        )
        for method in ("pafi", "full"):
            for tls in (None, certs):
                work = Path(tempfile.mkdtemp(dir=tmp))
                extra = ["method=full"] if method == "full" else ["method.density=0.05"]
                start = time.time()
                done = deploy(work, [*SETTINGS, f"federation.rounds={rounds}", *extra], tls=tls)
                if done.run.returncode != 0:
                    raise SystemExit(done.run.stdout + done.run.stderr)
                run, windows = done.run_dir, done.socket
                print(f"{method} {'TLS' if tls else 'plain'}: {time.time() - start:.0f} s", flush=True)
                _, records, _ = read_run(run)
                names = ["start (register, round 0)"] + [f"round {r}" for r in range(1, rounds + 1)]
                ends = [0.0] + [r["wall_seconds"] for r in records]  # cumulative in rounds.jsonl
                for i, (name, record, sock) in enumerate(
                    zip([*names, "shutdown"], [*records, None], windows)
                ):
                    for d in (DOWN, UP):
                        acc = accounted(record, d) if record else 0
                        msgs = record["comm"][d]["messages"] if record else 0
                        ratio = f"{sock[d] / acc:.2f}" if acc else "-"
                        secs = f"{ends[i + 1] - ends[i]:.0f}" if record else "-"
                        rows.append(
                            f"| {method} | {'TLS' if tls else 'plain'} | {name} | {d} | {msgs} | {acc:,} | "
                            f"{sock[d]:,} | {sock[d] - acc:+,} | {ratio} | {sock['connections']} | {secs} |"
                        )
                shutil.rmtree(work, ignore_errors=True)
    write_result(
        f"Socket bytes vs accounted bytes, loopback deployment (tiny model, 2 SuperNodes, {rounds} rounds; "
        "`python experiments/socket_bytes.py`). down = SuperLink -> SuperNodes, up = SuperNodes -> "
        "SuperLink, both nodes together; a window ends when rounds.jsonl gains the round's line. "
        "What each figure counts: docs/deployment.md.\n\n" + "\n".join(rows),
        OUT,
    )


if __name__ == "__main__":
    main()
