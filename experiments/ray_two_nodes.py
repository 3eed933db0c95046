"""A simulation on a two-node Ray cluster on one machine: where the client actors ran, and whether
the result equals the same run on one node.

    python experiments/ray_two_nodes.py [--clients 4] [--rounds 2] [--seed 0]

1. Starts a Ray head (`ray start --head --num-cpus 1`) and joins a second node to it (`ray start
   --address HEAD --num-cpus 1`), each node with its own temp dir under /tmp and its own CPU.
2. Runs the tiny federation (`+experiment=smoke`, tests/harness/federation.py) with `--clients`
   clients, all sampled, and `federation.client_cpus=1` (one ClientAppActor fits each node),
   attached with `python -m fedsparse ... federation.ray_address=HEAD`. Meanwhile this script,
   a second driver of the cluster, reads Ray's GCS tables every second (`ray.nodes()` and the
   actor table): the node id of every ClientAppActor, and which node's raylet its process
   descends from (psutil), a check that does not rely on Ray's bookkeeping.
3. Runs the same command on a one-node cluster (a head with 2 CPUs, so again two actors, started
   the same way) and compares the fingerprint, the final global vector (`checkpoint.npz`) bit for
   bit, and the per-round dev metrics.
4. Stops each cluster by killing the processes that name its temp dirs and their children (not
   `ray stop`, which takes no address: it stops every Ray process on the machine, other runs'
   too) and checks that none is left.

Writes experiments/results/ray_two_nodes.{json,md}.

Every node is started with the same environment: `set_ray_defaults` (workers at nice 0),
OMP_NUM_THREADS=MKL_NUM_THREADS=1 (an attached cluster's workers inherit the raylet's
environment, not the driver's: fedsparse's own thread setting applies only to a Ray instance of
its own) and PYTHONPATH=this tree. Ray's state API (`ray.util.state.list_actors`) is served by
the dashboard, which needs `ray[default]`; fedsparse gets Ray through `flwr[simulation]` (minimal
Ray, no dashboard), so the script reads the GCS tables the state API itself reads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import ray
from common import write_result
from ray._private import state as ray_state

from fedsparse.apps.simulation import set_ray_defaults
from fedsparse.deploy.loopback import OFFLINE_ENV, free_port
from fedsparse.federation.checkpoint import load

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
ENV = {
    **OFFLINE_ENV,
    "PYTHONPATH": str(ROOT),
}
# the environment of every `ray start` (so of every worker), in both clusters
NODE_ENV = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_LOG_LEVEL": "ERROR"}


def start_node(temp_dir: Path, cpus: int, head: str | None = None) -> tuple[str, float]:
    """`ray start` a head (head=None) or a node joining `head`; returns (head address, seconds)."""
    port = None if head else free_port()
    argv = [RAY, "start", "--num-cpus", str(cpus), "--node-ip-address", "127.0.0.1"]
    argv += ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
    if head:
        argv += ["--address", head]
    else:
        argv += ["--head", "--port", str(port), "--include-dashboard", "false"]
    start = time.time()
    done = subprocess.run(argv, env={**os.environ, **NODE_ENV}, capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return head or f"127.0.0.1:{port}", round(time.time() - start, 1)


def cluster_processes(temp_dirs: list[Path]) -> set[psutil.Process]:
    """The processes whose command line names one of `temp_dirs` (gcs_server, raylet, agents,
    monitors), and their children (the workers)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        if any(str(d) in part for d in temp_dirs for part in (p.info["cmdline"] or [])):
            found.add(p)
            try:
                found |= set(p.children(recursive=True))
            except psutil.Error:
                pass
    return found


def stop_cluster(temp_dirs: list[Path], pids: list[int]) -> dict:
    """Kill this cluster's processes; what was killed, and what is still alive afterwards."""
    procs = cluster_processes(temp_dirs)
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(procs), timeout=15)
    left = cluster_processes(temp_dirs) | {psutil.Process(p) for p in pids if psutil.pid_exists(p)}
    for d in temp_dirs:
        shutil.rmtree(d, ignore_errors=True)
    return {"killed": len(procs), "left_running": sorted(p.pid for p in left)}


def raylet_temp_dir(pid: int, temp_dirs: list[Path]) -> str | None:
    """The temp dir of the raylet that process `pid` descends from."""
    try:
        for parent in psutil.Process(pid).parents():
            cmdline = " ".join(parent.cmdline())
            if "raylet" in parent.name():
                return next((str(d) for d in temp_dirs if f"={d}/" in cmdline), None)
    except psutil.Error:
        pass
    return None


def process_env(pid: int, key: str) -> str | None:
    try:
        return psutil.Process(pid).environ().get(key)
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
        return round(times.user + times.system, 1)
    except psutil.Error:
        return None


def nodes(temp_dirs: list[Path]) -> list[dict]:
    """The cluster's live nodes (ray.nodes(), the GCS node table), each with its temp dir."""
    out = []
    for n in ray.nodes():
        if n["Alive"]:
            socket = n["RayletSocketName"]
            out.append(
                {
                    "node_id": n["NodeID"],
                    "head": "node:__internal_head__" in n["Resources"],
                    "ip": n["NodeManagerAddress"],
                    "node_manager_port": n["NodeManagerPort"],
                    "object_manager_port": n["ObjectManagerPort"],
                    "cpus": n["Resources"].get("CPU"),
                    "temp_dir": next((str(d) for d in temp_dirs if socket.startswith(f"{d}/")), None),
                }
            )
    return out


def watch(proc: subprocess.Popen, temp_dirs: list[Path], timeout: float) -> dict[str, dict]:
    """Poll the GCS actor table until `proc` exits: every ClientAppActor, its node id, its pid,
    and (read while it is alive) the raylet it descends from, its OMP_NUM_THREADS and the CPU
    seconds its process has used (at the last poll: a lower bound of the work it did)."""
    actors: dict[str, dict] = {}
    deadline = time.time() + timeout
    while proc.poll() is None:
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the simulation ran past {timeout} s")
        for actor_id, a in ray_state.actors().items():
            if a["ActorClassName"] != "ClientAppActor":
                continue
            rec = actors.setdefault(actor_id, {"actor_id": actor_id, "seen_alive": False})
            rec.update(state=a["State"], pid=a["Pid"], job_id=a["JobID"])
            rec["node_id"] = a["Address"]["NodeID"] or rec.get("node_id")
            if a["State"] == "ALIVE" and not rec["seen_alive"]:
                rec["seen_alive"] = True
                rec["raylet_temp_dir"] = raylet_temp_dir(a["Pid"], temp_dirs)
                rec["omp_num_threads"] = process_env(a["Pid"], "OMP_NUM_THREADS")
            if a["State"] == "ALIVE":
                rec["cpu_seconds"] = cpu_seconds(a["Pid"]) or rec.get("cpu_seconds")
        time.sleep(1)
    return actors


def run_on_cluster(
    name: str, node_cpus: list[int], overrides: list[str], out_dir: Path, timeout: float
) -> dict:
    """Start a cluster of len(node_cpus) nodes, run the simulation on it, stop it; the figures."""
    temp_dirs = [
        Path(tempfile.mkdtemp(prefix=f"ray{name[0]}{i}-", dir="/tmp")) for i in range(len(node_cpus))
    ]
    result: dict = {"name": name, "node_cpus": node_cpus}
    actors: dict[str, dict] = {}
    try:
        address, seconds = start_node(temp_dirs[0], node_cpus[0])
        result["address"], result["start_seconds"] = address, [seconds]
        for temp_dir, cpus in zip(temp_dirs[1:], node_cpus[1:]):
            result["start_seconds"].append(start_node(temp_dir, cpus, head=address)[1])
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        result["nodes"] = nodes(temp_dirs)
        if len(result["nodes"]) != len(node_cpus):
            raise RuntimeError(
                f"{len(node_cpus)} nodes started, {len(result['nodes'])} alive: {result['nodes']}"
            )
        command = [sys.executable, "-m", "fedsparse", *overrides, f"federation.ray_address={address}"]
        command += [f"output_dir={out_dir}", f"run_name={name}"]
        result["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
        log = out_dir / f"{name}.log"
        start = time.time()
        with log.open("w") as f:
            proc = subprocess.Popen(
                command, cwd=ROOT, env={**os.environ, **ENV}, stdout=f, stderr=subprocess.STDOUT
            )
            actors = watch(proc, temp_dirs, timeout)
        result["wall_seconds"] = round(time.time() - start, 1)
        if proc.returncode:
            raise RuntimeError(f"{name}: exit {proc.returncode}\n" + log.read_text()[-4000:])
        # actors that started and ended between two polls: read the table once more
        for actor_id, a in ray_state.actors().items():
            if a["ActorClassName"] == "ClientAppActor" and actor_id not in actors:
                actors[actor_id] = {"actor_id": actor_id, "seen_alive": False, "state": a["State"]}
                actors[actor_id].update(pid=a["Pid"], job_id=a["JobID"], node_id=a["Address"]["NodeID"])
    finally:
        ray.shutdown()
        result["stop"] = stop_cluster(temp_dirs, [a["pid"] for a in actors.values() if a.get("pid")])
    by_dir = {n["temp_dir"]: n["node_id"] for n in result["nodes"]}
    for a in actors.values():  # the raylet the process descends from is its node's
        a["raylet_matches_node"] = by_dir.get(a.get("raylet_temp_dir")) == a["node_id"]
    result["actors"] = sorted(actors.values(), key=lambda a: a["node_id"])
    result["actors_per_node"] = {
        n["node_id"]: sum(a["node_id"] == n["node_id"] for a in actors.values()) for n in result["nodes"]
    }
    return result | run_figures(out_dir / name)


def run_figures(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    walls = [r["wall_seconds"] for r in rounds]
    return {
        "run_dir": str(run),
        "fingerprint": summary["fingerprint"],
        "run_wall_seconds": round(summary["wall_seconds"], 1),
        "round_seconds": [round(b - a, 1) for a, b in zip(walls, walls[1:])],
        "dev": [{"round": r["round"], **r["dev"]} for r in rounds],
    }


def compare(a: dict, b: dict) -> dict:
    va, vb = load(Path(a["run_dir"])).values, load(Path(b["run_dir"])).values
    diff = np.abs(va.astype(np.float64) - vb.astype(np.float64))
    return {
        "fingerprint_equal": a["fingerprint"] == b["fingerprint"],
        "values": int(va.size),
        "dtype": str(va.dtype),
        "global_bit_for_bit": va.dtype == vb.dtype and va.shape == vb.shape and va.tobytes() == vb.tobytes(),
        "max_abs_diff": float(diff.max()) if va.shape == vb.shape else None,
        "dev_equal": a["dev"] == b["dev"],
        "dev_loss_max_abs_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(a["dev"], b["dev"])),
    }


def markdown(results: dict) -> str:
    two, one, cmp = results["two_nodes"], results["one_node"], results["comparison"]
    lines = [
        f"Ray {results['ray']}, Flower {results['flwr']}, {os.cpu_count()} cores "
        f"(1-min load average {two['loadavg_before'][0]} before the two-node run, "
        f"{one['loadavg_before'][0]} before the one-node run).",
        f"`python -m fedsparse {' '.join(results['overrides'])} federation.ray_address=HEAD`",
        "",
        "| cluster | node | head | CPUs | ClientAppActors: pid (CPU s used; raylet it descends from is this node's) |",
        "|---|---|---|---:|---|",
    ]
    for r in (two, one):
        for n in r["nodes"]:
            here = [a for a in r["actors"] if a["node_id"] == n["node_id"]]
            text = (
                ", ".join(
                    f"{a['pid']} ({a.get('cpu_seconds')} s; {'yes' if a['raylet_matches_node'] else 'no'})"
                    for a in here
                )
                or "none"
            )
            lines.append(f"| {r['name']} | `{n['node_id'][:12]}` | {n['head']} | {n['cpus']:g} | {text} |")
    lines += [
        "",
        "| cluster | nodes | ray start (s) | simulation wall (s) | seconds per round | dev loss per round | left running |",
        "|---|---:|---|---:|---|---|---:|",
    ]
    for r in (two, one):
        losses = ", ".join(f"{d['loss']:.6f}" for d in r["dev"])
        lines.append(
            f"| {r['name']} | {len(r['nodes'])} | {r['start_seconds']} | {r['wall_seconds']} | "
            f"{r['round_seconds']} | {losses} | {len(r['stop']['left_running'])} |"
        )
    lines += [
        "",
        f"Actors on both nodes of the two-node cluster: {results['actors_on_both_nodes']}. "
        f"Same fingerprint: {cmp['fingerprint_equal']}. Final global vector ({cmp['values']} "
        f"{cmp['dtype']} values) equal bit for bit: {cmp['global_bit_for_bit']} (max abs "
        f"difference {cmp['max_abs_diff']:g}). Dev metrics of every round equal: {cmp['dev_equal']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4, help="clients, all sampled every round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per simulation")
    parser.add_argument("--out", default=str(ROOT / "experiments/results/ray_two_nodes"))
    args = parser.parse_args()
    set_ray_defaults()  # into this environment, so into every `ray start` below
    os.environ.update(ENV)
    overrides = [
        "+experiment=smoke",
        "data.max_eval_examples=32",  # tests/harness/federation.py's tiny federation
        f"federation.num_clients={args.clients}",
        f"federation.clients_per_round={args.clients}",
        f"federation.rounds={args.rounds}",
        "federation.client_cpus=1",
        f"seed={args.seed}",
    ]
    with tempfile.TemporaryDirectory(prefix="ray-two-nodes-") as tmp:
        two = run_on_cluster("two-nodes", [1, 1], overrides, Path(tmp), args.timeout)
        one = run_on_cluster("one-node", [2], overrides, Path(tmp), args.timeout)
        comparison = compare(two, one)
    for r in (two, one):
        del r["run_dir"]  # a temporary directory, gone now
    results = {
        "command": f"python experiments/ray_two_nodes.py --clients {args.clients} --rounds {args.rounds} --seed {args.seed}",
        "overrides": overrides,
        "ray": ray.__version__,
        "flwr": importlib.metadata.version("flwr"),
        "cpus": os.cpu_count(),
        "actors_on_both_nodes": {a["node_id"] for a in two["actors"]} == {n["node_id"] for n in two["nodes"]},
        "two_nodes": two,
        "one_node": one,
        "comparison": comparison,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_result(markdown(results), out.with_suffix(".md"))


if __name__ == "__main__":
    main()
