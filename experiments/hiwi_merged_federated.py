"""Why does HiWi's merged exchange fail under federation? An in-process FedAvg over a few
label-skewed (Dirichlet) MiniLM clients, no Ray: each round every client unpacks the global
vector, trains `steps` local steps, packs; the server averages the packed vectors (weighted by
shard size). Per round: dev accuracy, the spread of the dev predictions (fraction predicted
positive), the norm of each client's bias delta (this round's change of p'), of their mean, their
mean pairwise cosine, the same for the head, and the size of h = f(p' W_down) (the scale that
multiplies every W_up step). Small: 4 clients, 1,000 training examples, 300 dev examples.

    python experiments/hiwi_merged_federated.py --exchange merged [--rounds 5] [--lr 3e-2 --head-lr-scale 0.1 method.train_down=false]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from fedsparse.data.glue import dev_split, partition, train_split
from fedsparse.methods import build_method
from fedsparse.methods.model import load_model, load_tokenizer
from fedsparse.run import compose_config
from fedsparse.training.train import client_seed, evaluate, make_loader, train


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


@torch.no_grad()
def biases(method) -> np.ndarray:
    """The current (merged) values p' of every adapted parameter, flat."""
    return torch.cat([getattr(m, a).reshape(-1) for _, m, a in method.sites]).numpy().copy()


def run(args) -> None:
    overrides = [
        "method=hiwi",
        f"method.exchange={args.exchange}",
        f"method.lr={args.lr}",
        f"data.max_train_examples={args.examples}",
        "data.max_eval_examples=300",
        *args.override,
    ]
    cfg = compose_config(overrides)
    tok = load_tokenizer(cfg.model.name)
    method = build_method(load_model(cfg.model.name, 2, 0), cfg.method)
    data = train_split(cfg)
    fed = cfg.federation
    loaders, sizes = [], []
    for pid in range(args.clients):
        shard = partition(data, args.clients, pid, fed.partitioner, float(args.alpha), 0, 10)
        labels = np.asarray(shard["label"])
        print(f"client {pid}: {len(labels)} examples, {labels.mean():.2f} positive", flush=True)
        loaders.append(make_loader(shard, tok, 64, 16, shuffle=True, seed=pid))
        sizes.append(len(labels))
    dev = make_loader(dev_split(cfg), tok, 64, 64, shuffle=False)
    weights = np.asarray(sizes, float) / sum(sizes)
    g = method.initial_state().copy()
    nb = g.size - method.head_size  # merged: bias deltas first, head last
    for r in range(1, args.rounds + 1):
        vecs, losses, bias_deltas = [], [], []
        for pid in range(args.clients):
            method.unpack(g)
            if args.exchange == "merged":
                h = [
                    a.act(m.parametrizations[at].original @ a.down)
                    for a, (_, m, at) in zip(method.adapters, method.sites)
                ]
                hnorm = float(np.mean([x.abs().sum().item() for x in h]))
            else:
                hnorm = float("nan")
            down0 = [a.down.detach().clone() for a in method.adapters]
            b_before = biases(method)
            losses.append(
                train(
                    method,
                    loaders[pid],
                    args.lr,
                    steps=args.steps,
                    seed=client_seed(0, r, pid),
                    head_lr_scale=args.head_lr_scale,
                )
            )
            if args.exchange == "merged" and pid == 0:
                with torch.no_grad():
                    h_end = [
                        a.act(m.parametrizations[at].original @ a.down).abs().sum().item()
                        for a, (_, m, at) in zip(method.adapters, method.sites)
                    ]
                    dd = [(a.down - a0).abs().mean().item() for a, a0 in zip(method.adapters, down0)]
                print(
                    f"  client 0 after training: |h|_1 {np.mean(h_end):.3f}, mean |W_down - W_down0| {np.mean(dd):.4f} (init scale {method.adapters[0].down.shape[0] ** -0.5:.4f})",
                    flush=True,
                )
            vecs.append(method.pack())
            bias_deltas.append(biases(method) - b_before)
        new = np.average(np.stack(vecs), axis=0, weights=weights)
        line = f"round {r}: train loss {np.mean(losses):.3f}"
        if args.exchange == "factors":  # the change of the merged biases p' each client made
            pair = np.mean([cos(a, b) for a, b in itertools.combinations(bias_deltas, 2)])
            line += (
                f" | bias delta/client {np.mean([np.linalg.norm(x) for x in bias_deltas]):.3f}"
                f" cos {pair:+.2f} mean {np.linalg.norm(np.average(bias_deltas, axis=0, weights=weights)):.3f}"
            )
        if args.exchange == "merged":
            d = [v[:nb] - g[:nb] for v in vecs]
            dh = [v[nb:] - g[nb:] for v in vecs]
            mean_d = new[:nb] - g[:nb]
            pair = np.mean([cos(a, b) for a, b in itertools.combinations(d, 2)])
            pairh = np.mean([cos(a, b) for a, b in itertools.combinations(dh, 2)])
            line += (
                f" | |h|_1 {hnorm:.3f} | bias delta/client {np.mean([np.linalg.norm(x) for x in d]):.3f}"
                f" max {max(np.abs(x).max() for x in d):.3f} mean-delta {np.linalg.norm(mean_d):.3f}"
                f" cos {pair:+.2f} | head delta/client {np.mean([np.linalg.norm(x) for x in dh]):.3f}"
                f" mean {np.linalg.norm(new[nb:] - g[nb:]):.3f} cos {pairh:+.2f}"
                f" | |p'-p| {np.linalg.norm(new[:nb]):.2f}"
            )
        g = new
        method.unpack(g)
        logits = []
        with torch.no_grad():
            for b in dev:
                logits.append(method.model(**b).logits)
        lg = torch.cat(logits)
        with torch.no_grad():
            moved = torch.cat(
                [(getattr(m, a) - p0).reshape(-1) for (_, m, a), p0 in zip(method.sites, method.pretrained)]
            )
        line += f" | global |p'-p| {moved.norm():.2f} max {moved.abs().max():.2f}"
        acc = evaluate(method.model, dev, "sst2")
        margin = lg[:, 1] - lg[:, 0]
        line += (
            f" | dev acc {acc['accuracy']:.3f} loss {acc['loss']:.3f} pos-frac {(margin > 0).float().mean():.2f}"
            f" margin {margin.mean():+.2f}+-{margin.std():.2f}"
        )
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exchange", default="merged")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--head-lr-scale", type=float, default=1.0)
    p.add_argument("override", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(1)
    run(args)


if __name__ == "__main__":
    main()
