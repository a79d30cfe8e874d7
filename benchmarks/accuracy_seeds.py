"""Final test accuracy of the default ``mnist.py`` run over several seeds, per engine.

Trains exactly what ``python mnist.py`` trains (SampleConvNet, k = 30,000, batch 256, σ = 1.3,
C = 1, lr = 0.15, 30 epochs) with each chosen engine and seed: one run is one draw of the
run-to-run noise, so engines are compared by the spread over seeds. Prints a table; ``--json``
writes the numbers.

    python benchmarks/accuracy_seeds.py --device cuda --engines fast opacus --seeds 0 1 2 3 4 --data-root data
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dpvision.data.mnist import load_mnist, random_subset
from dpvision.models import SampleConvNet
from dpvision.privacy.accounting import PrivacyLedger
from dpvision.seeding import make_generator, seed_everything
from dpvision.engines import OptimizerSpec, build_engine, evaluate
from dpvision.privacy.plan import DPSettings, make_plan


def one_run(engine_name: str, seed: int, args, train_all, test_data, device) -> dict:
    seed_everything(seed)
    train_data = random_subset(train_all, args.k, make_generator(seed, "subset"))
    settings = DPSettings(noise_multiplier=args.sigma, max_grad_norm=1.0)
    plan = make_plan(settings.deactivated() if args.disable_dp else settings, num_train=len(train_data),
                     batch_size=256, epochs=args.epochs)
    engine = build_engine(engine_name, model=SampleConvNet(), train_data=train_data, plan=plan,
                          optimizer=OptimizerSpec(lr=0.15), seed=seed, device=device)
    ledger = PrivacyLedger()
    start = time.perf_counter()
    for _ in range(args.epochs):
        result = engine.train_epoch()
        ledger.record(noise_multiplier=args.sigma, sample_rate=plan.sample_rate, steps=result.steps)
    seconds = time.perf_counter() - start
    row = {"seed": seed, "engine": engine.name, "seconds": seconds,
           "epsilon": ledger.epsilon(delta=1e-5) if dp else float("inf"),
           "test_accuracy": evaluate(engine.model, test_data, device=device)[1]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engines", nargs="+", default=["fast"], choices=("fast", "opacus"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--k", type=int, default=30_000)
    parser.add_argument("--sigma", type=float, default=1.3)
    parser.add_argument("--disable-dp", action="store_true")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    train_all = load_mnist(args.data_root, train=True)
    test_data = load_mnist(args.data_root, train=False)
    rows = []
    for engine_name in args.engines:
        for seed in args.seeds:
            rows.append(one_run(engine_name, seed, args, train_all, test_data, device))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    print(f"\nfinal test accuracy on {device} over seeds {args.seeds} (epsilon = {rows[0]['epsilon']:.4f})")
    for engine_name in args.engines:
        values = [r["test_accuracy"] for r in rows if r["engine"] == engine_name]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{engine_name:>8}: mean {statistics.mean(values):.4f} sd {spread:.4f} min {min(values):.4f} "
              f"max {max(values):.4f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
